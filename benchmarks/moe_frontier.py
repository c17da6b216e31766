"""Dense → MoE frontier on the default model: perplexity at 25/50/75% of FFN neurons active per token.

Every split (kmeans, coact, random) × router (mlp, centroid) side by side in one run, the dense model in
the same run, and static pruning at the same share of FFN neurons kept (``moefy`` at active F against
``prune_`` removing 1 − F of the neurons) with ``--prune``: FLAP scores, one global threshold,
least-squares W_out refit (cheap on CPU; the per-layer sensitivity allocation, the committed best at
50%, measures every layer and is quoted from benchmarks/results/compress_frontier_sensitivity_h200.json).

Evaluation: the README protocol (``benchmarks/compress_frontier.py``): perplexity of the last
``--eval-tokens`` tokens of Austen's Persuasion in non-overlapping 512-token windows. Calibration:
``--samples`` × ``--seq-len`` windows of Shakespeare (seed 0); one plan (split + router) per split × router
serves every active share. No healing.

    python benchmarks/moe_frontier.py --out benchmarks/results/moe_frontier_cpu.json
    python benchmarks/moe_frontier.py --splits kmeans --routers mlp --active 0.5 --eval-tokens 512 \\
        --samples 4 --out /tmp/moe_smoke.json        # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from ffnkit.compress.prune import PruneConfig, prune_
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import environment
from ffnkit.moe.convert import MoEfyConfig, moefy_, plan_moefy
from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, evaluation_set, load_step, measure

COMMITTED = "benchmarks/results/compress_frontier_sensitivity_h200.json"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--active", default="0.5,0.25,0.75")
    ap.add_argument("--splits", default="kmeans,coact,random")
    ap.add_argument("--routers", default="mlp,centroid")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shared", type=int, default=0)
    ap.add_argument("--allocation", default="uniform", help="uniform or global (k per layer by mass recall)")
    ap.add_argument("--no-compensate", action="store_true", help="no output-bias compensation")
    ap.add_argument("--router-steps", type=int, default=200)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--prune", action="store_true", help="also prune (flap/global+refit) at each share")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/moe_frontier_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    actives = [float(a) for a in args.active.split(",")]
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)  # noqa: E731

    dense, tok = load_step(PipelineConfig(model="smollm2-135m"))
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
                    "method": "flap/global+refit",
                    "perplexity": ppl,
                    "ffn_ratio_removed": report.ffn_ratio_removed,
                }
            )
            log(f"prune {1 - a:.0%} removed: ppl {ppl:.2f}")
            write(False)
    for split in args.splits.split(","):
        plan = None
        for router in args.routers.split(","):
            fields = dict(
                experts=args.experts,
                split=split,
                router=router,
                shared=args.shared,
                router_steps=args.router_steps,
                allocation=args.allocation,
                compensate=not args.no_compensate,
                samples=args.samples,
                seq_len=args.seq_len,
            )
            start = time.perf_counter()
            plan = plan_moefy(dense, MoEfyConfig(**fields), calibration=calib, splits=plan)  # reuse the split
            plan_s = time.perf_counter() - start
            log(f"plan {split}/{router}: {plan_s:.0f} s")
            for a in actives:
                model = copy.deepcopy(dense)
                report = moefy_(model, MoEfyConfig(**fields, active=a), plan=plan)
                ppl = measure(model, evaluation).perplexity
                results.append(
                    {
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
                        "plan_seconds": plan_s,
                    }
                )
                log(
                    f"{split}/{router} active {a:.0%}: ppl {ppl:.2f} (x{ppl / dense_m.perplexity:.2f}) recall {report.mass_recall}"
                )
                del model
                write(False)
    write(True)
    log(f"wrote {args.out}")


def document(args, actives, results, pruning, evaluation, dense, t0) -> dict:
    """The results JSON (also written after every row)."""
    summary = {}
    for a in actives:
        rows = [r for r in results if r["active"] == a]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["perplexity"])
        prune = next((p for p in pruning if p["active"] == a), None)
        summary[str(a)] = {
            "best": f"{best['split']}/{best['router']}",
            "best_perplexity": best["perplexity"],
            "best_vs_dense": best["perplexity"] / dense.perplexity,
            "pruning_in_run": prune["perplexity"] if prune else None,
            "below_pruning": best["perplexity"] < prune["perplexity"] if prune else None,
        }
    goal = summary.get("0.5", {})
    return {
        "benchmark": "moe_frontier",
        "command": "python " + " ".join(sys.argv),
        "model": "smollm2-135m",
        "evaluation": {**dense.protocol, "corpus": evaluation.corpus, "split": evaluation.split},
        "calibration": {"corpus": "shakespeare", "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "settings": {
            "experts": args.experts,
            "shared": args.shared,
            "router_steps": args.router_steps,
            "allocation": args.allocation,
            "compensate": not args.no_compensate,
        },
        "dense": {"perplexity": dense.perplexity, "parameters": dense.parameters},
        "results": results,
        "pruning": pruning,
        "committed_pruning": committed_pruning(),
        "summary": summary,
        "goal_50pct": {
            "target": "perplexity <= 1.35 x dense at 50% of FFN neurons active, below the best static pruning at 25/50/75%",
            "ratio": goal.get("best_vs_dense"),
            "reached": goal.get("best_vs_dense") is not None and goal["best_vs_dense"] <= 1.35,
        },
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }


if __name__ == "__main__":
    main()
