"""CPU greedy-decode speed of the default model, dense against sparse at the quality target (issue 9).

One process: the dense model, the sparsified model through the decode kernels (``ffnkit.kernels``, CPU
backend) and the same sparse model on its exact masked dense path (``use_kernels = False``), alternated
round by round; medians of tokens/s over the rounds (batch 1, greedy, ``--new-tokens`` per run, one warm-up
run each). Also records how many greedy tokens the sparse model shares with the dense one.

    python benchmarks/sparsity_decode_cpu.py --out benchmarks/results/sparsity_decode_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ffnkit.core.archs import find_ffns
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import decode_speed, environment
from ffnkit.pipeline import PipelineConfig, load_step
from ffnkit.sparsity import SparsityConfig, sparsify_

PROMPT = "The feed-forward layers of a Transformer"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="best")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument(
        "--allocation", default=None, help="e.g. uniform: the same kernel and bytes, cheaper calibration"
    )
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/sparsity_decode_cpu.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)

    dense, tok = load_step(PipelineConfig(model="smollm2-135m"))
    sparse = copy.deepcopy(dense)
    calib = calibration_batches(load_corpus("shakespeare"), tok, args.samples, 256, seed=0)
    config = SparsityConfig(
        args.rule,
        args.sparsity,
        samples=args.samples,
        tokens=2048,
        path_tokens=128,
        probe_windows=1,
        probe_tokens=128,
    )
    result = sparsify_(sparse, config, calibration=calib, tokenizer=tok)
    log(f"sparsified: held-out bytes skipped {result.measured['bytes_skipped']:.3f}")
    modules = [f.module for f in find_ffns(sparse)]

    def masked(on: bool) -> None:
        for m in modules:
            m.use_kernels = not on

    speeds: dict[str, list[float]] = {"dense": [], "sparse_kernels": [], "sparse_masked_dense": []}
    for model, use_masked in ((dense, False), (sparse, False)):
        masked(use_masked)
        decode_speed(model, tok, PROMPT, new_tokens=4, repeats=1, warmup=1)  # warm-up (kernel build, packing)
    for r in range(args.rounds):
        for name, model, use_masked in (
            ("dense", dense, False),
            ("sparse_kernels", sparse, False),
            ("sparse_masked_dense", sparse, True),
        ):
            masked(use_masked)
            speeds[name].append(
                decode_speed(model, tok, PROMPT, new_tokens=args.new_tokens, repeats=1, warmup=0)[
                    "tokens_per_s"
                ]
            )
        log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()))
    masked(False)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        a = dense.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1] :]
        b = sparse.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1] :]
    med = {k: statistics.median(v) for k, v in speeds.items()}
    doc = {
        "benchmark": "sparsity_decode_cpu",
        "command": "python " + " ".join(sys.argv),
        "model": "smollm2-135m",
        "rule": args.rule,
        "allocation": config.allocation,
        "sparsity": args.sparsity,
        "heldout_bytes_skipped": result.measured["bytes_skipped"],
        "protocol": {
            "batch": 1,
            "greedy": True,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "prompt": PROMPT,
            "dtype": "float32",
            "threads": torch.get_num_threads(),
        },
        "tokens_per_s": med,
        "runs_tokens_per_s": speeds,
        "speedup_kernels_vs_dense": med["sparse_kernels"] / med["dense"],
        "speedup_masked_vs_dense": med["sparse_masked_dense"] / med["dense"],
        "greedy_tokens_equal_to_dense": int((a == b).sum()),
        "greedy_tokens": int(a.numel()),
        "notes": "ratios of alternated runs, medians",
        "load_average_end": list(os.getloadavg()),
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log(f"wrote {args.out}: {med}")


if __name__ == "__main__":
    main()
