"""Streaming statistics over N corpus tokens: memory must not grow with N.

Streams the default model over the calibration split in windows of ``--seq-len`` tokens and accumulates,
through ``capture(..., reducers=...)``, for every FFN's post-activation m: mean/variance, firing rate and a
pooled histogram; and the d_ff × d_ff covariance for ``--cov-layers``. At each of ``--tokens`` (comma
list, ascending) it records the tokens seen, the reducers' state size (elements, bytes), and the memory
peak: the process' peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), both since the start.
One process runs every token count in sequence, so a later checkpoint's peak can only be higher if
memory grew with tokens.

    python benchmarks/streaming_stats.py --tokens 16384,65536 --out benchmarks/results/streaming_stats_cpu.json
    python benchmarks/streaming_stats.py --tokens 65536,262144,1048576 --device cuda \\
        --out benchmarks/results/streaming_stats_cuda.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

from ffnkit.core.archs import find_ffns
from ffnkit.core.capture import capture
from ffnkit.core.reducers import Covariance, FiringRate, Histogram, Variance
from ffnkit.data import calibration_tokens, load_corpus
from ffnkit.evaluate import environment
from ffnkit.sources.models import load_model


def rss_mib() -> dict[str, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    current = None
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        pass
    return {"peak_rss_mib": peak, "current_rss_mib": current}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="16384,65536", help="Checkpoints (ascending), comma-separated.")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cov-layers", default="0,15,29", help="FFN indices with a full covariance.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results/streaming_stats_cpu.json")
    args = ap.parse_args()

    checkpoints = sorted(int(x) for x in args.tokens.split(","))
    device = torch.device(args.device)
    model, tok = load_model(args.model)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    ffns = find_ffns(model)
    cov_layers = [int(x) for x in args.cov_layers.split(",") if x != ""]
    corpus = load_corpus(args.corpus)
    tokens = calibration_tokens(corpus, tok)  # [T] the whole calibration split
    need = checkpoints[-1]
    if tokens.numel() < need:
        reps = need // tokens.numel() + 1  # wrap around: more tokens than the split holds
        print(f"calibration split has {tokens.numel()} tokens; wrapping it {reps}x", file=sys.stderr)
        tokens = tokens.repeat(reps)
    L = args.seq_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = rss_mib()
    base_cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    reducers = [Variance(), FiringRate(), Histogram(bins=128, range=(-8.0, 8.0))]
    rows = []
    seen = 0
    t0 = time.perf_counter()
    with (
        torch.no_grad(),
        capture(model, sites="post", reducers=reducers, ffns=ffns) as cap,
        capture(model, sites="post", layers=cov_layers, reducers=[Covariance()], ffns=ffns) as cov,
    ):
        for target in checkpoints:
            while seen < target:
                n = min(args.batch_size, -(-(target - seen) // L))
                ids = tokens[seen : seen + n * L].reshape(n, L).to(device)  # [n, L]
                model(input_ids=ids)
                seen += ids.numel()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            state = sum(r.state_numel() for key in cap._reducers for r in cap._reducers[key].values())
            state += sum(r.state_numel() for key in cov._reducers for r in cov._reducers[key].values())
            row = {
                "tokens": seen,
                "seconds": time.perf_counter() - t0,
                "reducer_state_elements": state,
                "reducer_state_mib_float64": state * 8 / 2**20,
                **rss_mib(),
            }
            if device.type == "cuda":
                row["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                row["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    # the numbers themselves, to show the run did real work
    l0 = cap.stats("post", 0)
    cov0 = cov.stats("post", cov_layers[0])["cov"] if cov_layers else None
    doc = {
        "benchmark": "streaming_stats",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.model,
        "corpus": args.corpus,
        "device": str(device),
        "dtype": args.dtype,
        "seq_len": L,
        "batch_size": args.batch_size,
        "reducers": [
            "var (mean, M2)",
            "firing_rate (ffnkit.core.criteria: |m_i| > 0.1 mean_j |m_j|)",
            "hist(128 bins, [-8, 8])",
            f"cov on layers {cov_layers}",
        ],
        "n_ffn_layers": len(ffns),
        "baseline_memory_after_model_load": {
            **base_mem,
            "cuda_allocated_mib": None if base_cuda is None else base_cuda / 2**20,
        },
        "checkpoints": rows,
        "peak_growth_mib_first_to_last": (
            rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
            if device.type == "cpu"
            else rows[-1]["cuda_max_allocated_mib"] - rows[0]["cuda_max_allocated_mib"]
        ),
        "sanity": {
            "layer0_mean_firing_rate": float(l0["firing_rate"].mean()),
            "layer0_mean_var": float(l0["var"].var.mean()),
            "cov_layer_trace": None if cov0 is None else float(cov0.cov.trace()),
        },
        "note": "2 shared CPU cores: timings are noisy; memory is the point of this benchmark",
        "environment": environment(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
