"""Dense → MoE frontier on the default model: perplexity at 25/50/75% of FFN neurons active per token.

Every split (kmeans, coact, random) × router (mlp, centroid) side by side in one run, the dense model in
the same run, and static pruning at the same share of FFN neurons kept (``moefy`` at active F against
``prune_`` removing 1 − F of the neurons) with ``--prune``: FLAP scores, widths per layer from measured
sensitivity, least-squares W_out refit (the committed best static pruning,
benchmarks/results/compress_frontier_sensitivity_h200.json; rows written before 2026-11-30 13:30 label it
"flap/global+refit", but the code ran this sensitivity allocation since it was written).

Evaluation: the README protocol (``benchmarks/compress_frontier.py``): perplexity of the last
``--eval-tokens`` tokens of Austen's Persuasion in non-overlapping 512-token windows. Calibration:
``--samples`` × ``--seq-len`` windows of Shakespeare (seed 0); one plan (split + router) per split × router
serves every active share. Rows (``kind``):

- ``router``: the conversion as ``moefy_`` leaves it (no training beyond the router's).
- ``oracle`` (``--oracle``): the same split and k, experts chosen per token by their true output norm
  (:mod:`ffnkit.moe.oracle`): the router's gap, not a conversion result.
- ``heal`` (``--heal-minutes M``): the ``--heal-split``/``--heal-router`` conversion, then ``heal_``
  (KL distillation to the dense model, experts + router + shared expert trainable, time-budgeted) at each
  active share; the row says minutes, steps and tokens, and whether save → load reproduced the logits.
  ``--prune-heal`` heals each pruned model with the same settings, so that a healed conversion is also
  compared with pruning at the same training budget (``healed_perplexity`` in ``pruning``).

Runs on ``--device cuda`` in one process (model, calibration, router training, evaluation, healing).

    python benchmarks/moe_frontier.py --out benchmarks/results/moe_frontier_cpu.json
    python benchmarks/moe_frontier.py --splits kmeans --routers mlp --active 0.5 --eval-tokens 512 \\
        --samples 4 --out /tmp/moe_smoke.json        # a smoke run

The full protocol on a GPU, in three processes of under 10 minutes each (frontier, healing, pruning):

    G="--device cuda --samples 256 --seq-len 256 --router-steps 1000 --router-batch 8192 --router-hidden 256"
    PYTHONPATH=src python benchmarks/moe_frontier.py $G --variants 80:256:norm:uniform \\
        --splits coact,kmeans,random --routers mlp,centroid --oracle --out $OUT/moe_frontier_h200.json
    PYTHONPATH=src python benchmarks/moe_frontier.py $G --variants 80:256:norm:uniform --splits coact \\
        --routers mlp --heal-minutes 2 --out $OUT/moe_frontier_heal_h200.json
    PYTHONPATH=src python benchmarks/moe_frontier.py $G --splits "" --prune --out $OUT/moe_frontier_prune_h200.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ffnkit.compress.prune import PruneConfig, prune_
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import environment
from ffnkit.io import load, save
from ffnkit.moe.convert import MoEfyConfig, moefy_, plan_moefy
from ffnkit.moe.oracle import oracle_routing
from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, evaluation_set, load_step, measure
from ffnkit.train.heal import HealConfig, heal_

COMMITTED = "benchmarks/results/compress_frontier_sensitivity_h200.json"
REFIT_MODES = {"on": (True,), "off": (False,), "both": (True, False)}


def committed_pruning() -> dict:
    """Best committed static pruning perplexity per share removed (4,096 Persuasion tokens, H200)."""
    try:
        doc = json.loads(Path(COMMITTED).read_text())
    except OSError:
        return {}
    best: dict[str, dict] = {}
    for r in doc["results"]:
        key = str(r["ratio"])
        if key not in best or r["perplexity"] < best[key]["perplexity"]:
            best[key] = {"label": r["label"], "perplexity": r["perplexity"]}
    return {"file": COMMITTED, "dense": doc["dense"]["perplexity"], "best_by_ratio_removed": best}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--active", default="0.5,0.25,0.75")
    ap.add_argument("--splits", default="kmeans,coact,random")
    ap.add_argument("--routers", default="mlp,centroid")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shared", type=int, default=0)
    ap.add_argument("--allocation", default="uniform", help="uniform or global (k per layer by mass recall)")
    ap.add_argument("--no-compensate", action="store_true", help="no output-bias compensation")
    ap.add_argument(
        "--refit",
        default="on",
        choices=["on", "off", "both"],
        help="least-squares refit of the down projections with the routing in the loop (both: one row each, one plan)",
    )
    ap.add_argument(
        "--refit-tokens", type=int, default=8192, help="calibration tokens per layer of the refit"
    )
    ap.add_argument(
        "--refit-ridge", type=float, default=1.0, help="ridge of the refit (x mean Gram diagonal)"
    )
    ap.add_argument(
        "--variants",
        default="",
        help="conversions to compare, E:S[:target[:allocation]],... (experts, shared neurons, mass|norm, "
        "uniform|global); heal rows use the first",
    )
    ap.add_argument("--router-steps", type=int, default=200)
    ap.add_argument("--router-hidden", type=int, default=128)
    ap.add_argument("--router-batch", type=int, default=1024)
    ap.add_argument("--router-lr", type=float, default=3e-3)
    ap.add_argument("--router-target", default="mass", help="mass or norm (what the MLP router ranks)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--oracle", action="store_true", help="also an oracle row per split (true output norms)")
    ap.add_argument("--heal-minutes", type=float, default=0.0, help="heal each --heal-split/router model")
    ap.add_argument("--heal-split", default="", help="split to heal (default: the first of --splits)")
    ap.add_argument("--heal-router", default="", help="router to heal (default: the first of --routers)")
    ap.add_argument("--heal-active", default="", help="active shares to heal (default: --active)")
    ap.add_argument("--heal-lr", type=float, default=3e-4)
    ap.add_argument(
        "--heal-steps", type=int, default=100000, help="step cap (the minutes usually stop first)"
    )
    ap.add_argument("--heal-samples", type=int, default=2048)
    ap.add_argument("--heal-seq-len", type=int, default=512)
    ap.add_argument("--heal-batch", type=int, default=8)
    ap.add_argument("--heal-corpus", default="shakespeare")
    ap.add_argument(
        "--heal-precision", default="highest", help="float32 matmuls while healing: highest, or high (TF32)"
    )
    ap.add_argument("--prune", action="store_true", help="also prune (flap/sensitivity+refit) at each share")
    ap.add_argument(
        "--prune-heal",
        action="store_true",
        help="heal each pruned model with the same heal settings as the MoE rows (--heal-*)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where everything runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/moe_frontier_cpu.json")
    return ap.parse_args()


def variants(args: argparse.Namespace) -> list[tuple[int, int, str, str]]:
    """(experts, shared, router target, allocation) of each conversion variant, from ``--variants``
    ``E:S[:target[:allocation]],...`` (default: ``--experts``, ``--shared``, ``--router-target``,
    ``--allocation``)."""
    if not args.variants:
        return [(args.experts, args.shared, args.router_target, args.allocation)]
    out = []
    for item in args.variants.split(","):
        parts = item.split(":")
        out.append(
            (
                int(parts[0]),
                int(parts[1]) if len(parts) > 1 else 0,
                parts[2] if len(parts) > 2 else args.router_target,
                parts[3] if len(parts) > 3 else args.allocation,
            )
        )
    return out


def reload_gap(model, tok, ids: torch.Tensor) -> float:
    """Max |logit difference| after ffnkit.save → load of ``model`` (0.0: reproduced exactly)."""
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tok, Path(tmp) / "m")
        again, _ = load(Path(tmp) / "m")
    again.to(device)
    with torch.no_grad():
        a, b = model(ids.to(device)).logits, again(ids.to(device)).logits
    return float((a - b).abs().max())


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    actives = [float(a) for a in args.active.split(",")]
    splits = [s for s in args.splits.split(",") if s]  # empty: no conversion (only --prune rows)
    routers = [r for r in args.routers.split(",") if r]
    heal_split = args.heal_split or (splits[0] if splits else "")
    heal_router = args.heal_router or (routers[0] if routers else "")
    heal_actives = [float(a) for a in args.heal_active.split(",")] if args.heal_active else actives
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)  # noqa: E731

    dense, tok = load_step(PipelineConfig(model="smollm2-135m", device=args.device))
    dense.eval()
    evaluation = evaluation_set(
        PerplexityProtocol(corpus="austen", max_tokens=args.eval_tokens, window=512), tok
    )
    calib = calibration_batches(load_corpus("shakespeare"), tok, args.samples, args.seq_len, seed=0)
    dense_m = measure(dense, evaluation)
    log(f"dense perplexity {dense_m.perplexity:.3f}")
    results, pruning = [], []

    def write(done: bool) -> None:
        doc = document(args, actives, results, pruning, evaluation, dense_m, t0)
        doc["complete"] = done
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")

    heal_ids = None
    if args.heal_minutes > 0:
        heal_ids = calibration_batches(
            load_corpus(args.heal_corpus), tok, args.heal_samples, args.heal_seq_len, seed=1
        )

    def heal(model) -> dict:
        """heal_ ``model`` towards the dense one with the --heal-* settings (the same for MoE and pruning
        rows, so the two compare at one training budget); what it did, for the row."""
        cfg = HealConfig(
            steps=args.heal_steps,
            lr=args.heal_lr,
            samples=args.heal_samples,
            seq_len=args.heal_seq_len,
            batch_size=args.heal_batch,
            max_minutes=args.heal_minutes,
            corpus=args.heal_corpus,
            matmul_precision=args.heal_precision,
        )
        healed = heal_(model, dense, cfg, calibration=heal_ids, progress=False)
        return {
            "minutes": healed.seconds / 60,
            "steps": healed.steps,
            "tokens": healed.tokens_seen,
            "stopped_by": healed.stopped_by,
            "corpus": args.heal_corpus,
            "lr": args.heal_lr,
            "matmul_precision": args.heal_precision,
            "trainable_parameters": healed.trainable_parameters,
            "kl_first_last": [healed.loss_curve[0], healed.loss_curve[-1]],
        }

    if args.prune:
        for a in actives:
            model = copy.deepcopy(dense)
            report = prune_(
                model,
                PruneConfig(
                    "flap",
                    1.0 - a,
                    allocation="sensitivity",
                    reconstruct=True,
                    samples=args.samples,
                    seq_len=args.seq_len,
                ),
                calibration=calib,
            )
            ppl = measure(model, evaluation).perplexity
            pruning.append(
                {
                    "active": a,
                    "ratio_removed": 1.0 - a,
                    "method": "flap/sensitivity+refit",
                    "perplexity": ppl,
                    "ffn_ratio_removed": report.ffn_ratio_removed,
                }
            )
            log(f"prune {1 - a:.0%} removed: ppl {ppl:.2f}")
            write(False)
            if args.prune_heal and args.heal_minutes > 0 and a in heal_actives:
                pruning[-1]["heal"] = heal(model)
                pruning[-1]["healed_perplexity"] = ppl = measure(model, evaluation).perplexity
                log(f"prune {1 - a:.0%} removed + heal: ppl {ppl:.2f}")
                write(False)
            del model

    def row(kind: str, split: str, router: str, a: float, report, ppl: float, **extra) -> None:
        results.append(
            {
                "kind": kind,
                "split": split,
                "router": router,
                "active": a,
                "active_fraction": report.active_fraction,
                "top_k": [r["top_k"] for r in report.layers],
                "perplexity": ppl,
                "perplexity_vs_dense": ppl / dense_m.perplexity,
                "mass_recall": report.mass_recall,
                "ffn_flops_per_token": report.ffn_flops_per_token_after,
                "dense_ffn_flops_per_token": report.ffn_flops_per_token_before,
                **extra,
            }
        )
        log(f"{label(results[-1])} active {a:.0%}: ppl {ppl:.2f} (x{ppl / dense_m.perplexity:.3f})")
        write(False)

    plans: dict[tuple, tuple[dict, float]] = {}
    split_plans: dict[tuple, dict] = {}
    for v, (experts, shared, target, alloc) in enumerate(variants(args) if splits else []):
        tag = {"experts": experts, "shared": shared, "router_target": target, "allocation": alloc}
        log(f"variant {tag}")
        for split in splits:
            for router in routers:
                fields = dict(
                    experts=experts,
                    split=split,
                    router=router,
                    shared=shared,
                    router_steps=args.router_steps,
                    router_hidden=args.router_hidden,
                    router_batch=args.router_batch,
                    router_lr=args.router_lr,
                    router_target=target,
                    allocation=alloc,
                    compensate=not args.no_compensate,
                    refit=args.refit != "off",
                    refit_tokens=args.refit_tokens,
                    refit_ridge=args.refit_ridge,
                    samples=args.samples,
                    seq_len=args.seq_len,
                )
                key = (experts, shared, target, split, router)  # what a plan depends on (not allocation)
                if key not in plans:
                    start = time.perf_counter()
                    same_split = split_plans.get((experts, shared, split))  # reuse the split
                    plan = plan_moefy(dense, MoEfyConfig(**fields), calibration=calib, splits=same_split)
                    plans[key] = plan, time.perf_counter() - start
                    split_plans[(experts, shared, split)] = plan
                    log(f"plan {split}/{router}: {plans[key][1]:.0f} s")
                plan, plan_s = plans[key]
                for a, refit in ((a, r) for a in actives for r in REFIT_MODES[args.refit]):
                    model = copy.deepcopy(dense)
                    report = moefy_(model, MoEfyConfig(**{**fields, "refit": refit}, active=a), plan=plan)
                    ppl = measure(model, evaluation).perplexity
                    row("router", split, router, a, report, ppl, plan_seconds=plan_s, refit=refit, **tag)
                    if refit != REFIT_MODES[args.refit][0]:  # oracle and healing: the first mode's model only
                        del model
                        continue
                    if args.oracle and router == routers[0]:
                        with oracle_routing(model):
                            ppl = measure(model, evaluation).perplexity
                        row("oracle", split, "oracle (true output norms)", a, report, ppl, **tag)
                    if (
                        args.heal_minutes > 0
                        and (split, router) == (heal_split, heal_router)
                        and v == 0
                        and a in heal_actives
                    ):
                        heal_info = heal(model)
                        ppl = measure(model, evaluation).perplexity
                        gap = reload_gap(model, tok, calib[:2])
                        row(
                            "heal",
                            split,
                            f"{router}+heal",
                            a,
                            report,
                            ppl,
                            heal=heal_info,
                            reload_max_abs_logit_diff=gap,
                            **tag,
                        )
                    del model
    write(True)
    log(f"wrote {args.out}")


def label(r: dict) -> str:
    """A row's name: kind split/router E<experts> S<shared> <router target> <allocation>."""
    return (
        f"{r['kind']} {r['split']}/{r['router']} E{r.get('experts')} S{r.get('shared')} "
        f"{r.get('router_target')} {r.get('allocation')}" + (" refit" if r.get("refit") else "")
    )


def document(args, actives, results, pruning, evaluation, dense, t0) -> dict:
    """The results JSON (also written after every row). ``summary``: the best conversion per share, and
    the best healed one separately (oracle rows never count)."""
    summary = {}
    for a in actives:
        prune = next((p for p in pruning if p["active"] == a), None)
        entry = {"pruning_in_run": prune["perplexity"] if prune else None}
        if prune and "healed_perplexity" in prune:
            entry["healed_pruning_in_run"] = prune["healed_perplexity"]
        for kind in ("router", "heal"):
            rows = [r for r in results if r["active"] == a and r["kind"] == kind]
            if not rows:
                continue
            best = min(rows, key=lambda r: r["perplexity"])
            entry[kind] = {
                "best": label(best),
                "perplexity": best["perplexity"],
                "vs_dense": best["perplexity"] / dense.perplexity,
                "below_pruning_in_run": best["perplexity"] < prune["perplexity"] if prune else None,
            }
            if kind == "heal" and "healed_pruning_in_run" in entry:
                # a healed conversion against pruning healed with the same settings (like for like)
                entry[kind]["below_healed_pruning_in_run"] = (
                    best["perplexity"] < entry["healed_pruning_in_run"]
                )
        summary[str(a)] = entry
    goal = summary.get("0.5", {})
    return {
        "benchmark": "moe_frontier",
        "command": "python " + " ".join(sys.argv),
        "model": "smollm2-135m",
        "device": args.device,
        "evaluation": {**dense.protocol, "corpus": evaluation.corpus, "split": evaluation.split},
        "calibration": {"corpus": "shakespeare", "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "settings": {
            k: getattr(args, k)
            for k in (
                "experts",
                "shared",
                "allocation",
                "router_steps",
                "router_hidden",
                "router_batch",
                "router_lr",
                "router_target",
                "heal_minutes",
                "heal_lr",
                "heal_seq_len",
                "heal_batch",
                "heal_corpus",
                "heal_precision",
                "variants",
            )
        }
        | {
            "compensate": not args.no_compensate,
            "refit": args.refit,
            "refit_tokens": args.refit_tokens,
            "refit_ridge": args.refit_ridge,
        },  # fmt: skip
        "dense": {"perplexity": dense.perplexity, "parameters": dense.parameters},
        "results": results,
        "pruning": pruning,
        "committed_pruning": committed_pruning(),
        "summary": summary,
        "goal_50pct": {
            "target": "perplexity <= 1.35 x dense at 50% of FFN neurons active, below the best static pruning at 25/50/75%",
            "ratio": goal.get("router", {}).get("vs_dense"),
            "reached": goal.get("router", {}).get("vs_dense", 9.9) <= 1.35,
            "ratio_healed": goal.get("heal", {}).get("vs_dense"),
            "reached_healed": goal.get("heal", {}).get("vs_dense", 9.9) <= 1.35,
        },
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }


if __name__ == "__main__":
    main()
