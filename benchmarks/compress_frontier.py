"""Quality-vs-compression frontier of FFN neuron pruning on the default model (issue 4's protocol).

Evaluation: perplexity of the last 4,096 tokens of Austen's Persuasion (``load_corpus("austen")``,
evaluation split) in non-overlapping 512-token windows. Calibration: ``--samples`` × ``--seq-len``
windows of the default corpus' calibration split (Shakespeare), statistics collected once on the dense
model and shared by every method. For each ratio (share of FFN parameters removed) and method: perplexity,
parameter counts, and CPU latency (a 1×512 forward and greedy decode speed, medians, the dense model
alternated side by side in the same process; latency depends only on the widths, so models with equal
widths share one measurement). No healing.

    python benchmarks/compress_frontier.py --out benchmarks/results/compress_frontier_cpu.json
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

from ffnkit.compress.prune import PruneConfig, prune_
from ffnkit.compress.scores import collect_stats, taylor_scores
from ffnkit.core.archs import find_ffns
from ffnkit.data import calibration_batches, evaluation_tokens, load_corpus
from ffnkit.evaluate import count_parameters, decode_speed, environment, perplexity
from ffnkit.sources.models import load_model

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
    ap.add_argument("--out", default="benchmarks/results/compress_frontier_cpu.json")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    labels = args.methods.split(",")
    args.no_latency = args.no_latency or args.device != "cpu"
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)

    dense, tok = load_model("smollm2-135m", device=args.device)
    austen, calib_corpus = load_corpus("austen"), load_corpus("shakespeare")
    tokens = evaluation_tokens(austen, tok, max_tokens=4096)
    calib = calibration_batches(calib_corpus, tok, args.samples, args.seq_len, seed=0)
    dense_ppl = perplexity(dense, tokens, window=512, progress=False)
    dense_params = count_parameters(dense, find_ffns(dense))
    log(f"dense perplexity {dense_ppl.perplexity:.3f}")
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
        doc = document(args, ratios, results, austen, dense_ppl, dense_params, t0)
        doc["complete"] = done
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")

    for ratio in ratios:
        for label in labels:
            fields = {**CANDIDATES[label], "ratio": ratio, "samples": args.samples, "seq_len": args.seq_len}
            cfg = PruneConfig(**fields)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = _prune(model, cfg, calib, stats, grads)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, tokens, window=512, progress=False)
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
                "perplexity_vs_dense": ppl.perplexity / dense_ppl.perplexity,
                "parameters": report.parameters_after,
                "d_ff": list(widths),
                "prune_seconds": seconds,
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


def document(args, ratios, results, austen, dense_ppl, dense_params, t0) -> dict:
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
        "evaluation": {
            "corpus": "austen",
            "split": austen.split_info(),
            **dense_ppl.protocol,
        },
        "calibration": {"corpus": "shakespeare", "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "dense": {"perplexity": dense_ppl.perplexity, "parameters": dense_params},
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


def _prune(model, cfg, calib, stats, grads):
    """prune_ with the statistics (and Taylor gradients) of the dense model collected once."""
    return prune_(model, cfg, calibration=calib, stats=stats, grads=grads if cfg.method == "taylor" else None)


if __name__ == "__main__":
    main()
