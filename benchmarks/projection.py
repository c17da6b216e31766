"""Benchmark: project every neuron of the default model onto the vocabulary (top-10, both directions).

Measured in one process, alternating:
  (a) ffnkit's streaming projection  ``project_neurons(model, top_k=10, chunk_size=C)``
  (b) the bare matrix product it needs: (g ⊙ W_out[:, chunk])ᵀ Eᵀ for every layer, same chunks, no top-k.
Target: (a) within 2× of (b). Peak memory of (a): the theoretical size of the chunk buffers
(C × V float32 logits + the chunk of value vectors) and the measured RSS high-water-mark delta
(tracemalloc does not see torch's allocations; Linux's VmHWM is reset through /proc/self/clear_refs).

Run:  python benchmarks/projection.py [--chunk-size 512] [--rounds 3] [--out benchmarks/results/projection_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def bare_products(ffns, lens, E: torch.Tensor, chunk: int) -> None:
    """The matrix products alone, chunked like the projection; results are dropped."""
    for ffn in ffns:
        W = ffn.W_out
        for start in range(0, W.shape[1], chunk):
            V = lens.direction(W[:, start : start + chunk])  # [d, c]
            logits = V.T @ E.T  # [c, V]
            del logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model and its unembedding move there)")
    ap.add_argument("--out", default="benchmarks/results/projection_cpu.json")
    args = ap.parse_args()

    from ffnkit.core.archs import find_ffns
    from ffnkit.evaluate import environment
    from ffnkit.inspect.lens import Lens
    from ffnkit.inspect.vocab import project_neurons
    from ffnkit.sources.models import load_model

    load_start = os.getloadavg()[0]
    model, tok = load_model(args.model, device=args.device)
    cuda = args.device.startswith("cuda")

    def sync() -> None:  # GPU work is asynchronous: wait for it before reading the clock
        if cuda:
            torch.cuda.synchronize()

    ffns = find_ffns(model)
    lens = Lens.of(model)
    E = lens.E.float()
    n_neurons = sum(f.d_ff for f in ffns)
    V, d = E.shape
    print(f"{len(ffns)} layers, {n_neurons} neurons, vocab {V}, chunk {args.chunk_size}", file=sys.stderr)

    with torch.no_grad():
        # warm-up on one layer each (allocator, thread pool)
        project_neurons(model, layers=[0], top_k=args.top_k, chunk_size=args.chunk_size, ffns=ffns)
        bare_products(ffns[:1], lens, E, args.chunk_size)

        times = {"streaming_projection": [], "bare_matmul": []}
        rss_delta_kib = []
        cuda_peaks: list[int] = []
        result = None
        for r in range(args.rounds):
            for name in (
                ("streaming_projection", "bare_matmul")
                if r % 2 == 0
                else ("bare_matmul", "streaming_projection")
            ):
                if name == "streaming_projection":
                    result = None
                    reset = _reset_peak_rss()
                    rss0 = _status_kib("VmRSS")
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    sync()
                    t0 = time.perf_counter()
                    result = project_neurons(model, top_k=args.top_k, chunk_size=args.chunk_size, ffns=ffns)
                    sync()
                    dt = time.perf_counter() - t0
                    if cuda:
                        cuda_peaks.append(torch.cuda.max_memory_allocated())
                    if reset:
                        rss_delta_kib.append(_status_kib("VmHWM") - rss0)
                else:
                    sync()
                    t0 = time.perf_counter()
                    bare_products(ffns, lens, E, args.chunk_size)
                    sync()
                    dt = time.perf_counter() - t0
                times[name].append(dt)
                print(f"round {r}: {name} {dt:.2f} s", file=sys.stderr)

    med_a = statistics.median(times["streaming_projection"])
    med_b = statistics.median(times["bare_matmul"])
    result.tokenizer = tok  # decode only after timing
    n_projected = sum(u.neurons.numel() for u in result.units)
    sample = next(result.rows())
    doc = {
        "benchmark": "vocabulary projection of every FFN neuron (top-k promoted and suppressed tokens)",
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "layers": len(ffns),
        "neurons": n_neurons,
        "neurons_projected": n_projected,
        "vocab": V,
        "d_model": d,
        "top_k": args.top_k,
        "chunk_size": args.chunk_size,
        "basis": result.basis,
        "rounds": args.rounds,
        "seconds": times,
        "median_s": {"streaming_projection": med_a, "bare_matmul": med_b},
        "ratio_streaming_over_bare": med_a / med_b,
        "target_ratio": 2.0,
        "target_met": med_a / med_b <= 2.0,
        "memory": {
            "theoretical_chunk_buffers_bytes": args.chunk_size * V * 4 + d * args.chunk_size * 4,
            "full_neurons_x_vocab_bytes": n_neurons * V * 4,
            "result_bytes": n_projected * args.top_k * 2 * (8 + 4),  # top+bottom: int64 ids, float32 logits
            "measured_rss_hwm_delta_bytes": [k * 1024 for k in rss_delta_kib],
            "note": "RSS high-water-mark delta over the projection call (VmHWM reset via /proc/self/clear_refs)",
            "cuda_max_memory_allocated_bytes": cuda_peaks,  # per projection run (model weights included)
        },
        "sample_neuron": {
            "layer": sample["layer"],
            "neuron": sample["neuron"],
            "promoted": [t["token"] for t in sample["promoted"]],
        },
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "note": "2 CPU cores shared with other jobs (see load_average_1m): timings are noisy; both runs "
        "alternate in one process, so the ratio of medians is the figure to read",
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("median_s", "ratio_streaming_over_bare", "memory")}, indent=2))


if __name__ == "__main__":
    main()
