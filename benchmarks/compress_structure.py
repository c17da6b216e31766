"""Structural compression on the default model: sublayer/block removal, FFN Fusion, nested widths.

Protocol (issue 4): perplexity of the last 4,096 tokens of ``load_corpus("austen")``'s evaluation split
(Persuasion) in 512-token windows; calibration from the default calibration corpus (shakespeare).

- FinerCut (FFN sublayers only, greedy JS order) and ShortGPT (lowest block influence) at 20/30/40/50%
  of FFN parameters removed: every FFN has the same width, so removing k of the 30 FFN sublayers
  removes k/30 of the FFN parameters (6/9/12/15). ShortGPT deletes whole blocks (attention too:
  more parameters go than the FFN share says; both are recorded); "shortgpt-ffn" (30% only) removes
  only the FFN sublayers of the lowest-BI blocks. Wanda-sp (uniform) at 20/30/50%, same run, for scale.
- FFN Fusion of the lowest-dependency runs of 2 blocks (1 and 4 runs): perplexity, CPU forward of
  1×512 tokens and greedy decode speed, baseline and fused alternating in one process.
- Nested widths: nest by Wanda-sp (logits checked unchanged), then uniform widths 100/90/75/60/50%
  and a Mix'n'Match allocation by per-layer sensitivity at 75% and 50% of FFN parameters kept
  (100% is not re-measured: nesting is a permutation, its logit difference is recorded).

Parts run separately (``--parts``) and merge into one JSON. Timings on a shared 2-core machine are
noisy (other jobs were running); medians of alternating runs are reported.

Usage:
    python benchmarks/compress_structure.py --parts sublayers,fusion,nest
    python benchmarks/compress_structure.py --parts finercut --finercut-order order.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from ffnkit.compress import collect_stats
from ffnkit.compress.fusion import FusionConfig, dependency_matrix, fuse_ffns_
from ffnkit.compress.nest import NestConfig, mixnmatch_widths, nest_, slice_widths_
from ffnkit.compress.sublayers import finercut_order
from ffnkit.core.archs import find_ffns
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import decode_speed, environment
from ffnkit.inspect.importance import block_influence
from ffnkit.pipeline import (
    PerplexityProtocol,
    PipelineConfig,
    Step,
    evaluation_set,
    load_step,
    measure,
    run_step,
)

RATIOS = (0.2, 0.3, 0.4, 0.5)


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def ppl(model, evaluation) -> float:
    t = time.perf_counter()
    r = measure(model, evaluation)
    log(f"  ppl {r.perplexity:.3f} ({time.perf_counter() - t:.0f} s)")
    return float(r.perplexity)


def row(rep, p: float, dense: float, extra: dict | None = None) -> dict:
    d = rep.to_dict() if hasattr(rep, "to_dict") else rep
    return {
        "ffn_ratio_removed": d["ffn_ratio_removed"],
        "total_ratio_removed": 1 - d["parameters_after"]["total"] / d["parameters_before"]["total"],
        "parameters_after": d["parameters_after"],
        "perplexity": p,
        "ppl_ratio_to_dense": p / dense,
        **(extra or {}),
    }


# ----- parts ----------------------------------------------------------------------------------------
def part_sublayers(base, tok, ev, dense, args) -> dict:
    out: dict = {}
    cal = calibration_batches(load_corpus("shakespeare"), tok, args.bi_samples, 128, seed=0)
    t = time.perf_counter()
    bi = block_influence(base, cal)
    log(f"block influence {time.perf_counter() - t:.0f} s; ranking {bi.ranking[:8]}")
    out["shortgpt_bi"] = {**bi.to_dict(), "seconds": time.perf_counter() - t}
    variants = [("all", "shortgpt-blocks", RATIOS)]
    if args.with_extras:
        variants.append(("ffn", "shortgpt-ffn", (0.3,)))
    for kind, name, ratios in variants:
        rows = []
        for r in ratios:
            m = copy.deepcopy(base)
            _, rep = run_step(m, Step("shortgpt", {"ratio": r, "kind": kind}), order=bi)
            log(f"{name} {r}: removed {[x['name'] for x in rep.removed]}")
            rows.append(
                row(rep, ppl(m, ev), dense, {"ratio": r, "removed": [x["name"] for x in rep.removed]})
            )
            del m
        out[name] = rows
    if not args.with_extras:
        return out
    # Wanda-sp (uniform neuron pruning), same protocol, same run: the scale the issue compares against
    cal = calibration_batches(load_corpus("shakespeare"), tok, args.stats_samples, 256, seed=0)
    stats = collect_stats(base, cal)
    rows = []
    for r in (0.2, 0.3, 0.5):
        m = copy.deepcopy(base)
        _, rep = run_step(m, Step("wanda-sp", {"ratio": r}), calibration=cal, stats=stats)
        rows.append(row(rep, ppl(m, ev), dense, {"ratio": r}))
        log(f"wanda-sp {r}: ffn removed {rep.ffn_ratio_removed:.3f}")
        del m
    out["wanda-sp"] = rows
    out["wanda_calibration"] = {"samples": args.stats_samples, "seq_len": 256}
    return out


def part_finercut(base, tok, ev, dense, args) -> dict:
    if args.finercut_order:
        order = json.loads(Path(args.finercut_order).read_text())
        log(f"finercut order from {args.finercut_order}: {len(order['order'])} steps")
    else:
        n, t = args.finercut_samples, args.finercut_seq_len
        cal = calibration_batches(load_corpus("shakespeare"), tok, n, t, seed=0).to(args.device)
        order = finercut_order(base, cal, kind="ffn", ffn_target=round(max(RATIOS) * 30), batch_size=2)
    rows = []
    n_ffn = order["n_candidates"]
    for r in RATIOS:
        if round(r * n_ffn) > len(order["order"]):
            log(f"finercut {r}: order too short ({len(order['order'])} steps), skipped")
            continue
        m = copy.deepcopy(base)
        _, rep = run_step(m, Step("finercut", {"ratio": r}), order=order)  # FFN sublayers only
        rows.append(row(rep, ppl(m, ev), dense, {"ratio": r, "removed": [x["name"] for x in rep.removed]}))
        del m
    return {"finercut_order": order, "finercut-ffn": rows}


def _forward_ms(model, ids) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return 1000 * (time.perf_counter() - t)


def latency(models: dict, ids512, prompt, rounds: int) -> dict:
    """Alternating measurements (warm-up first): median forward ms of 1×512, median decode tokens/s."""
    fwd = {k: [] for k in models}
    dec = {k: [] for k in models}
    for m in models.values():
        _forward_ms(m, ids512)
        decode_speed(m, input_ids=prompt, new_tokens=8, repeats=1, warmup=0)
    for _ in range(rounds):
        for k, m in models.items():
            fwd[k].append(_forward_ms(m, ids512))
            dec[k].append(
                decode_speed(m, input_ids=prompt, new_tokens=32, repeats=1, warmup=0)["tokens_per_s"]
            )
    return {
        k: {
            "forward_1x512_ms_median": statistics.median(fwd[k]),
            "forward_1x512_ms_all": fwd[k],
            "decode_tokens_per_s_median": statistics.median(dec[k]),
            "decode_tokens_per_s_all": dec[k],
        }
        for k in models
    }


def part_fusion(base, tok, ev, dense, args) -> dict:
    cal = calibration_batches(load_corpus("shakespeare"), tok, args.dep_samples, 128, seed=0)
    t = time.perf_counter()
    dep = dependency_matrix(base, cal, batch_size=4)
    log(f"dependency matrix {time.perf_counter() - t:.0f} s")
    out: dict = {"dependency": {**dep, "seconds": time.perf_counter() - t}, "runs": []}
    models = {"dense": base}
    n_ffns = len(find_ffns(base))
    for k in (1, 4):
        m = copy.deepcopy(base)
        _, rep = run_step(m, Step("fuse", {"ratio": k / n_ffns}), dependency=dep)  # k runs of 2 blocks
        log(f"fusion {k} runs: {rep.runs}")
        p = ppl(m, ev)
        out["runs"].append(
            {
                "max_runs": k,
                "runs": rep.runs,
                "run_scores": rep.run_scores,
                "widths": rep.widths,
                "parameters_after": rep.parameters_after,
                "perplexity": p,
                "ppl_ratio_to_dense": p / dense,
            }
        )
        models[f"fused_{k}"] = m
    ids512 = ev.tokens[:512][None]
    prompt = ev.tokens[:64]
    lat = latency(models, ids512, prompt, args.rounds)
    for r in out["runs"]:
        r["latency"] = lat[f"fused_{r['max_runs']}"]
        r["forward_speedup"] = (
            lat["dense"]["forward_1x512_ms_median"] / r["latency"]["forward_1x512_ms_median"]
        )
        r["decode_speedup"] = (
            r["latency"]["decode_tokens_per_s_median"] / lat["dense"]["decode_tokens_per_s_median"]
        )
    out["latency_dense"] = lat["dense"]
    out["latency_protocol"] = (
        f"CPU, torch threads={torch.get_num_threads()}; forward of 1x512 tokens (no cache) and greedy decode "
        f"of 32 tokens after a 64-token prompt; {args.rounds} alternating rounds, medians; shared machine"
    )
    return out


def part_nest(base, tok, ev, dense, args) -> dict:
    cal = calibration_batches(load_corpus("shakespeare"), tok, args.stats_samples, 256, seed=0)
    nested = copy.deepcopy(base)
    rep = nest_(nested, NestConfig("wanda-sp", samples=args.stats_samples, seq_len=256), calibration=cal)
    with torch.no_grad():
        ids = ev.tokens[:256][None]
        a, b = base(input_ids=ids).logits, nested(input_ids=ids).logits
    diff = float((a - b).abs().max())
    log(f"nest: max |logit difference| {diff:.2e}")
    out: dict = {"nest_max_abs_logit_diff": diff, "nest_seconds": rep.seconds, "uniform": [], "mixnmatch": []}
    for w in (1.0, 0.9, 0.75, 0.6, 0.5):
        m = copy.deepcopy(nested)
        r = slice_widths_(m, w)
        # full width = the nested model itself: the same function (max logit difference above)
        p = dense if w == 1.0 else ppl(m, ev)
        out["uniform"].append(row(r, p, dense, {"width": w, "measured": w != 1.0}))
        del m
    sens_cal = calibration_batches(load_corpus("shakespeare"), tok, 2, 128, seed=1)
    t = time.perf_counter()
    curves = None
    for keep in (0.75, 0.5):
        mm = mixnmatch_widths(nested, keep, sens_cal, ratios=(0.5,), sensitivity=curves)
        curves = mm["sensitivity"]
        m = copy.deepcopy(nested)
        r = slice_widths_(m, mm["widths"])
        out["mixnmatch"].append(row(r, ppl(m, ev), dense, {"keep": keep, "widths": mm["widths"]}))
        del m
    out["mixnmatch_sensitivity"] = {
        **(curves or {}),
        "calibration": {"samples": 2, "seq_len": 128},
        "seconds": time.perf_counter() - t,
        "rule": "per-layer KL(full || that layer cut to its 50% prefix), greedy budget (prune's sensitivity allocation)",
    }
    return out


def part_mixnmatch(base, tok, ev, dense, args) -> dict:
    """Mix'n'Match again from saved sensitivity curves (no forwards for them), capped at the measured cut."""
    prev = json.loads(Path(args.sensitivity_from).read_text())["parts"]["nest"]
    curves = {k: prev["mixnmatch_sensitivity"][k] for k in ("ratios", "kl")}
    cal = calibration_batches(load_corpus("shakespeare"), tok, args.stats_samples, 256, seed=0)
    nested = copy.deepcopy(base)
    nest_(nested, NestConfig("wanda-sp", samples=args.stats_samples, seq_len=256), calibration=cal)
    rows = []
    for keep in (0.75, 0.5):
        mm = mixnmatch_widths(nested, keep, None, sensitivity=curves)
        m = copy.deepcopy(nested)
        r = slice_widths_(m, mm["widths"])
        rows.append(row(r, ppl(m, ev), dense, {"keep": keep, "widths": mm["widths"]}))
        del m
    return {
        "mixnmatch_capped": rows,
        "rule": "sensitivity allocation, no layer cut deeper than the deepest measured cut (50%)",
    }


def part_latency(base, tok, ev, dense, args) -> dict:
    """Latency again (the fusion part's were taken while the machine was overloaded), same fused runs."""
    prev = json.loads(Path(args.out).read_text())["parts"]["fusion"]
    models = {"dense": base}
    for r in prev["runs"]:
        m = copy.deepcopy(base)
        fuse_ffns_(m, FusionConfig(runs=r["runs"]))
        models[f"fused_{r['max_runs']}"] = m
    lat = latency(models, ev.tokens[:512][None], ev.tokens[:64], args.rounds)
    d = lat["dense"]
    return {
        "latency": lat,
        "forward_speedup": {
            k: d["forward_1x512_ms_median"] / v["forward_1x512_ms_median"] for k, v in lat.items()
        },
        "decode_speedup": {
            k: v["decode_tokens_per_s_median"] / d["decode_tokens_per_s_median"] for k, v in lat.items()
        },
        "latency_protocol": prev.get("latency_protocol"),
    }


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    parts = doc.get("parts", {})
    series = [
        ("finercut-ffn", parts.get("finercut", {}).get("finercut-ffn"), "o-"),
        ("shortgpt-blocks", parts.get("sublayers", {}).get("shortgpt-blocks"), "s-"),
        ("shortgpt-ffn", parts.get("sublayers", {}).get("shortgpt-ffn"), "s--"),
        ("wanda-sp (uniform neurons)", parts.get("sublayers", {}).get("wanda-sp"), "^-"),
        ("nested, uniform width", parts.get("nest", {}).get("uniform"), "d-"),
        ("nested, Mix'n'Match (uncapped)", parts.get("nest", {}).get("mixnmatch"), "x"),
        ("nested, Mix'n'Match (capped)", parts.get("mixnmatch", {}).get("mixnmatch_capped"), "*"),
    ]
    for name, rows, style in series:
        if rows:
            ax.plot(
                [r["ffn_ratio_removed"] for r in rows], [r["perplexity"] for r in rows], style, label=name
            )
    dense = doc.get("dense_perplexity")
    if dense:
        ax.axhline(dense, color="0.5", lw=0.8, ls=":", label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("share of FFN parameters removed")
    ax.set_ylabel("perplexity (Persuasion, last 4,096 tokens, 512-token windows)")
    ax.set_title("SmolLM2-135M: structural compression without healing")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parts", default="sublayers,fusion,nest,finercut")
    ap.add_argument("--finercut-order", default=None, help="a saved finercut_order JSON (reused)")
    ap.add_argument("--bi-samples", type=int, default=8)
    ap.add_argument("--dep-samples", type=int, default=4)
    ap.add_argument("--stats-samples", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/compress_structure.json")
    ap.add_argument("--plot", default="benchmarks/results/compress_structure.png")
    ap.add_argument(
        "--dense", type=float, default=None, help="dense perplexity measured earlier (same protocol)"
    )
    ap.add_argument("--with-extras", action="store_true", help="also Wanda-sp and ShortGPT-ffn (slower)")
    ap.add_argument("--sensitivity-from", default="", help="a result JSON with the nest part's curves")
    ap.add_argument("--merge-from", default="", help="comma-separated result JSONs whose parts are merged in")
    ap.add_argument("--device", default="cpu", help="run the model here (latency parts are CPU-only)")
    ap.add_argument("--finercut-samples", type=int, default=2, help="calibration windows of the FFN order")
    ap.add_argument("--finercut-seq-len", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (fewer: a smoke run)")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    if args.merge_from:  # parts run in separate processes (the machine is shared): merge, plot, stop
        for f in args.merge_from.split(","):
            other = json.loads(Path(f).read_text())
            for key in ("benchmark", "model", "protocol", "dense_perplexity", "ratio_mapping", "environment"):
                doc.setdefault(key, other.get(key))
            doc.setdefault("parts", {}).update(other.get("parts", {}))
            doc.setdefault("commands", {}).update(other.get("commands", {}))
        doc["commands"]["merge"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        plot(doc, Path(args.plot))
        return
    base, tok = load_step(PipelineConfig(model=args.model, device=args.device))
    base.eval()
    ev = evaluation_set(PerplexityProtocol(corpus="austen", max_tokens=args.eval_tokens, window=512), tok)
    dense = args.dense or doc.get("dense_perplexity") or ppl(base, ev)
    doc.update(
        benchmark="compress_structure",
        model=args.model,
        protocol="perplexity of the last 4,096 tokens of austen's evaluation split (Persuasion), 512-token "
        "windows, no stride overlap; calibration: shakespeare calibration split",
        dense_perplexity=dense,
        ratio_mapping="30 FFNs of equal width: removing k FFN sublayers removes k/30 of the FFN parameters "
        "(20/30/40/50% = 6/9/12/15); ShortGPT blocks also remove attention (see total_ratio_removed)",
        environment=environment(),
        notes=doc.get("notes", []),
    )
    doc.setdefault("parts", {})
    doc.setdefault("commands", {})
    fns = {
        "latency": part_latency,
        "mixnmatch": part_mixnmatch,
        "sublayers": part_sublayers,
        "finercut": part_finercut,
        "fusion": part_fusion,
        "nest": part_nest,
    }
    for name in [p for p in args.parts.split(",") if p]:
        log(f"== part {name}")
        t = time.perf_counter()
        try:
            doc["parts"][name] = {**fns[name](base, tok, ev, dense, args), "seconds": time.perf_counter() - t}
        except Exception:  # keep the other parts; the traceback goes to the log
            import traceback

            traceback.print_exc()
            continue
        doc["commands"][name] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        plot(doc, Path(args.plot))
    log("done")


if __name__ == "__main__":
    main()
