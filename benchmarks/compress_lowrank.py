"""Low-rank FFN compression on the default model: svd / asvd / svd-llm across ratios, plus one healing run.

Protocol (the issue's): perplexity of the last 4,096 tokens of ``load_corpus("austen")``'s evaluation
split (Persuasion) in non-overlapping 512-token windows. Calibration: ``--samples``×``--seq-len`` windows
of the calibration corpus (default shakespeare, as ``prune_``), statistics collected once on the dense
model and shared by every method. Uniform Wanda-sp (``prune_``) at the same ratios is the baseline, in
the same run. For every configuration: FFN and total parameter counts, and the CPU latency of a 1×512
forward against the dense model (same process, alternating, median of ``--reps`` after a warm-up).
Then the best low-rank method at ``--heal-ratio`` is healed (``heal_``, ≤ ``--heal-minutes``) and
measured again. The machine is shared (2 cores): latencies are noisy.

    python benchmarks/compress_lowrank.py --out benchmarks/results/compress_lowrank.json
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

from ffnkit.compress.lowrank import collect_lowrank_stats
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import environment
from ffnkit.pipeline import (
    PerplexityProtocol,
    PipelineConfig,
    Step,
    evaluation_set,
    heal_step,
    load_step,
    measure,
    run_step,
)


@torch.inference_mode()
def latency(models: dict[str, torch.nn.Module], ids: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of one forward per model, the models alternating within each repetition."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up
        m(input_ids=ids)
    for _ in range(reps):
        for name, m in models.items():
            t = time.perf_counter()
            m(input_ids=ids)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _write(path: str, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="shakespeare", help="calibration corpus")
    ap.add_argument("--methods", default="svd-llm,asvd,svd")
    ap.add_argument("--ratios", default="0.3,0.2,0.4,0.5", help="in the order they are run")
    ap.add_argument("--allocation", default="uniform", help="uniform or global (LowRankConfig.allocation)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--baseline", default="wanda-sp", help="prune_ method measured alongside ('' = none)")
    ap.add_argument("--heal-ratio", type=float, default=0.3)
    ap.add_argument("--heal-minutes", type=float, default=10.0, help="0 = no healing run")
    ap.add_argument("--heal-steps", type=int, default=150)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (fewer: a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/compress_lowrank.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    model, tok = load_step(PipelineConfig(model=args.model))
    model.eval()
    evaluation = evaluation_set(
        PerplexityProtocol(corpus="austen", max_tokens=args.eval_tokens, window=512), tok
    )
    calib = calibration_batches(load_corpus(args.corpus), tok, args.samples, args.seq_len, 0)
    lat_ids = evaluation.tokens[:512][None]
    dense = measure(model, evaluation)

    doc = {
        "benchmark": "compress_lowrank",
        "command": "PYTHONPATH=src python " + " ".join(shlex.quote(a) for a in sys.argv),
        "environment": {**environment(), "torch_threads": torch.get_num_threads()},
        "protocol": {
            **{k: v for k, v in dense.protocol.items() if k not in ("corpus", "split")},
            "corpus": "austen (evaluation split: Persuasion), last 4096 tokens",
            "calibration": f"{args.samples}x{args.seq_len} tokens of {args.corpus} calibration split, seed 0",
            "latency": f"1x512 forward, median of {args.reps} after a warm-up, alternating with dense; "
            "measured once per ratio (svd, asvd and svd-llm give the same shapes)",
            "ratio": "share of FFN parameters removed (each matrix: rank k = floor((1-r)mn/(m+n)))",
        },
        "dense": {"perplexity": dense.perplexity, "parameters": dense.parameters},
        "lowrank": [],
        "baseline": [],
        "healing": None,
        "notes": "2 CPU cores shared with several other jobs (load average > 10): latencies are noisy; "
        "one run, no repetition of the perplexities. Rows are written as they finish.",
    }
    print(f"dense ppl {dense.perplexity:.3f}", file=sys.stderr, flush=True)
    _write(args.out, doc)

    stats_t = time.perf_counter()
    stats = collect_lowrank_stats(model, calib, gram=True, progress=True)
    doc["statistics_seconds"] = time.perf_counter() - stats_t

    ratios = [float(r) for r in args.ratios.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    best: dict[float, tuple[float, str]] = {}
    for ratio in ratios:
        lat = None
        for method in methods:
            m = copy.deepcopy(model)
            _, rep = run_step(m, Step(method, {"ratio": ratio, "allocation": args.allocation}), stats=stats)
            ppl = measure(m, evaluation).perplexity
            if lat is None:
                lat = latency({"dense": model, "compressed": m}, lat_ids, args.reps)
            row = {
                "method": method,
                "allocation": args.allocation,
                "ratio": ratio,
                "perplexity": ppl,
                "ppl_vs_dense": ppl / dense.perplexity,
                "ffn_ratio_removed": rep.ffn_ratio_removed,
                "parameters": rep.parameters_after,
                "latency_s": lat["compressed"],
                "dense_latency_s": lat["dense"],
                "speedup": lat["dense"] / lat["compressed"],
                "mean_energy_kept": statistics.mean(
                    mat["energy_kept"] for layer in rep.layers for mat in layer["matrices"].values()
                ),
                "regularised": rep.regularised,
                "transform_seconds": rep.seconds,
            }
            doc["lowrank"].append(row)
            print(
                json.dumps({k: row[k] for k in ("method", "ratio", "perplexity", "speedup")}),
                file=sys.stderr,
                flush=True,
            )
            if ratio not in best or ppl < best[ratio][0]:
                best[ratio] = (ppl, method)
            del m
            doc["best_at_ratio"] = {str(r): {"method": m_, "perplexity": p} for r, (p, m_) in best.items()}
            _write(args.out, doc)
        if args.baseline:
            m = copy.deepcopy(model)
            _, rep = run_step(m, Step(args.baseline, {"ratio": ratio}), calibration=calib)
            ppl = measure(m, evaluation).perplexity
            blat = latency({"dense": model, "compressed": m}, lat_ids, args.reps)
            doc["baseline"].append(
                {
                    "method": args.baseline,
                    "ratio": ratio,
                    "perplexity": ppl,
                    "ppl_vs_dense": ppl / dense.perplexity,
                    "ffn_ratio_removed": rep.ffn_ratio_removed,
                    "parameters": rep.parameters_after,
                    "latency_s": blat["compressed"],
                    "dense_latency_s": blat["dense"],
                    "speedup": blat["dense"] / blat["compressed"],
                }
            )
            print(
                json.dumps({"baseline": args.baseline, "ratio": ratio, "perplexity": ppl}),
                file=sys.stderr,
                flush=True,
            )
            del m
            if ratio == 0.3 and 0.3 in best:
                doc["best_lowrank_vs_baseline_at_0.3"] = best[0.3][0] / ppl
            _write(args.out, doc)

        if ratio == args.heal_ratio and args.heal_minutes > 0:
            before, method = best[ratio]
            m = copy.deepcopy(model)
            run_step(m, Step(method, {"ratio": ratio, "allocation": args.allocation}), stats=stats)
            fields = {"steps": args.heal_steps, "lr": args.heal_lr, "max_minutes": args.heal_minutes}
            rep = heal_step(m, model, fields, tokenizer=tok, corpus=args.corpus, progress=True)
            after = measure(m, evaluation).perplexity
            doc["healing"] = {
                "method": method,
                "ratio": ratio,
                "perplexity_before": before,
                "perplexity_after": after,
                "after_vs_dense": after / dense.perplexity,
                "goal_after_vs_dense": 1.15,
                "goal_met": after / dense.perplexity <= 1.15,
                "report": rep.to_dict(),
            }
            print(
                json.dumps({k: v for k, v in doc["healing"].items() if k != "report"}),
                file=sys.stderr,
                flush=True,
            )
            del m
            _write(args.out, doc)
    doc["total_seconds"] = time.perf_counter() - t0
    _write(args.out, doc)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
