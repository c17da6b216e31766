"""Quality-vs-compression frontier of FFN neuron pruning on the default model (issue 4's protocol).

Evaluation (the stages of ffnkit.pipeline): perplexity of the last 4,096 tokens of Austen's Persuasion
(``load_corpus("austen")``, evaluation split) in non-overlapping 512-token windows. Calibration:
``--samples`` × ``--seq-len`` windows of the default corpus' calibration split (Shakespeare), statistics
collected once on the dense model and shared by every method. For each ratio (share of FFN parameters removed) and method: perplexity,
parameter counts, and CPU latency (a 1×512 forward and greedy decode speed, medians, the dense model
alternated side by side in the same process; latency depends only on the widths, so models with equal
widths share one measurement). No healing.

    python benchmarks/compress_frontier.py --out benchmarks/results/compress_frontier_cpu.json
    python benchmarks/compress_frontier.py --ratios 0.3 --methods flap/uniform --samples 2 --seq-len 64 \
        --eval-tokens 512 --no-latency --out /tmp/frontier_smoke.json      # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ffnkit.compress.prune import PruneConfig
from ffnkit.compress.scores import collect_stats, taylor_scores
from ffnkit.core.archs import find_ffns
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import decode_speed, environment
from ffnkit.pipeline import (
    PerplexityProtocol,
    PipelineConfig,
    Step,
    evaluation_set,
    load_step,
    measure,
    run_step,
)

# (label, PruneConfig fields); ratio is filled in per run
CANDIDATES = {
    "magnitude/uniform": dict(method="magnitude"),
    "wanda-sp/uniform": dict(method="wanda-sp"),
    "flap/uniform": dict(method="flap"),
    "lorap/uniform": dict(method="lorap"),
    "taylor/uniform": dict(method="taylor"),
    "frequency/uniform": dict(method="frequency"),
    "flap/global": dict(method="flap", allocation="global"),
    "wanda-sp/global+bias": dict(method="wanda-sp", allocation="global", bias_compensation=True),
    "flap/global+refit": dict(method="flap", allocation="global", reconstruct=True),
    "wanda-sp/global+refit": dict(method="wanda-sp", allocation="global", reconstruct=True),
    "wanda-sp/sensitivity": dict(method="wanda-sp", allocation="sensitivity"),
    "flap/sensitivity+refit": dict(method="flap", allocation="sensitivity", reconstruct=True),
    "flap/sensitivity8+refit": dict(
        method="flap", allocation="sensitivity", reconstruct=True, sensitivity_samples=8
    ),
}

DEFAULT = [
    "magnitude/uniform",
    "wanda-sp/uniform",
    "flap/uniform",
    "lorap/uniform",
    "taylor/uniform",
    "frequency/uniform",
    "flap/global",
    "flap/global+refit",
]


def forward_latency(models: list, ids: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds of one forward of ``ids`` per model, the models alternated in each round."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m(input_ids=ids)  # warm-up
        for _ in range(repeats):
            for i, m in enumerate(models):
                start = time.perf_counter()
                m(input_ids=ids)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.3,0.2,0.4,0.5")  # the goal's ratio first
    ap.add_argument("--methods", default=",".join(DEFAULT))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--latency-repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--device", default="cpu", help="perplexity on this device (latency is CPU-only)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (fewer: a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/compress_frontier_cpu.json")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    labels = args.methods.split(",")
    args.no_latency = args.no_latency or args.device != "cpu"
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)

    dense, tok = load_step(PipelineConfig(model="smollm2-135m", device=args.device))
    evaluation = evaluation_set(
        PerplexityProtocol(corpus="austen", max_tokens=args.eval_tokens, window=512), tok
    )
    calib = calibration_batches(load_corpus("shakespeare"), tok, args.samples, args.seq_len, seed=0)
    dense_m = measure(dense, evaluation)
    log(f"dense perplexity {dense_m.perplexity:.3f}")
    need_cov = any(CANDIDATES[lb].get("reconstruct") for lb in labels)
    stats = collect_stats(dense, calib, covariance=need_cov)
    log("statistics collected")
    grads = None
    if any(CANDIDATES[lb]["method"] == "taylor" for lb in labels):
        grads = taylor_scores(dense, calib[:8])
        log("taylor gradients")
    lat_ids = calib[:1, :].repeat(1, 2)[:, :512]  # [1, 512]
    latency_cache: dict[tuple, dict] = {}
    results = []

    def write(done: bool = True) -> None:
        doc = document(args, ratios, results, evaluation, dense_m, t0)
        doc["complete"] = done
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")

    for ratio in ratios:
        for label in labels:
            fields = {**CANDIDATES[label], "ratio": ratio, "samples": args.samples, "seq_len": args.seq_len}
            method = fields.pop("method")
            model = copy.deepcopy(dense)
            # the dense model's statistics (and Taylor gradients) collected once, shared by every run
            inputs = {"calibration": calib, "stats": stats, "grads": grads if method == "taylor" else None}
            step, report = run_step(model, Step(method, fields), **inputs)
            cfg = PruneConfig.from_dict(step.config)
            ppl = measure(model, evaluation)
            widths = tuple(f.d_ff for f in find_ffns(model))
            row = {
                "label": label,
                "method": cfg.method,
                "allocation": cfg.allocation,
                "bias_compensation": cfg.compensate,
                "reconstruct": cfg.reconstruct,
                "ratio": ratio,
                "ffn_ratio_removed": report.ffn_ratio_removed,
                "perplexity": ppl.perplexity,
                "perplexity_vs_dense": ppl.perplexity / dense_m.perplexity,
                "parameters": report.parameters_after,
                "d_ff": list(widths),
                "prune_seconds": step.seconds,
            }
            if not args.no_latency:
                if widths not in latency_cache:
                    fwd = forward_latency([dense, model], lat_ids, args.latency_repeats)
                    speeds = [
                        decode_speed(m, tok, new_tokens=args.decode_tokens, repeats=3)["tokens_per_s"]
                        for m in (dense, model, dense, model)
                    ]
                    latency_cache[widths] = {
                        "forward_1x512_s": fwd[1],
                        "dense_forward_1x512_s": fwd[0],
                        "forward_speedup": fwd[0] / fwd[1],
                        "decode_tokens_per_s": statistics.median(speeds[1::2]),
                        "dense_decode_tokens_per_s": statistics.median(speeds[0::2]),
                    }
                row["latency"] = latency_cache[widths]
            results.append(row)
            log(f"{ratio:.0%} {label:24s} ppl {ppl.perplexity:8.2f} (x{row['perplexity_vs_dense']:.2f})")
            del model
            write(done=False)  # partial results survive an interrupted run

    write()
    log(f"wrote {args.out}")


def document(args, ratios, results, evaluation, dense, t0) -> dict:
    """The results JSON (also written after every row)."""
    summary = {}
    for ratio in ratios:
        rows = [r for r in results if r["ratio"] == ratio]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["perplexity"])
        wanda = next((r for r in rows if r["label"] == "wanda-sp/uniform"), None)
        summary[str(ratio)] = {
            "best": best["label"],
            "best_perplexity": best["perplexity"],
            "wanda_sp_uniform_perplexity": wanda["perplexity"] if wanda else None,
            "best_over_wanda_sp": best["perplexity"] / wanda["perplexity"] if wanda else None,
        }
    goal = summary.get("0.3", {})
    return {
        "benchmark": "compress_frontier",
        "command": "python " + " ".join(sys.argv),
        "model": "smollm2-135m",
        "evaluation": {**dense.protocol, "corpus": evaluation.corpus, "split": evaluation.split},
        "calibration": {"corpus": "shakespeare", "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "dense": {"perplexity": dense.perplexity, "parameters": dense.parameters},
        "results": results,
        "summary": summary,
        "goal_30pct": {
            "target": "best perplexity <= 0.85 x uniform Wanda-sp at 30% of FFN parameters removed, no healing",
            "ratio": goal.get("best_over_wanda_sp"),
            "reached": goal.get("best_over_wanda_sp") is not None and goal["best_over_wanda_sp"] <= 0.85,
        },
        "notes": (
            "CPU timings on a shared 2-core machine with other jobs running: latency ratios are noisy. "
            "Models with equal FFN widths share one latency measurement. 'refit' = least-squares refit of "
            "the kept W_out columns and b_out from Cov(m) (FLAP's bias compensation generalised; closed "
            "form, no training)."
        ),
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }


if __name__ == "__main__":
    main()
