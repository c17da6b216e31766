"""Benchmark: weight-only quantisation of the FFN matrices (MoQE-style) on the default model.

For each setting (bits, group size, symmetric or asymmetric): perplexity of the last 4,096 tokens of
Persuasion in 512-token windows, the saved model.safetensors size, the perplexity after ``ffnkit.load``
(must be identical: the packed integers reload exactly), and CPU latency of a 1×512 forward and greedy
decode at batch 1 against the float model in the same process, the two alternated (the quantised
matrices run through ffnkit's quantised-matmul kernels, default backend; benchmarks/quant_kernel.py times
the FFN alone).

Run:  python benchmarks/quantize_ffn.py --out benchmarks/results/quantize_ffn_cpu.json
Smoke run:  python benchmarks/quantize_ffn.py --limit 1 --rounds 1 --eval-tokens 512 --out /tmp/quantize_smoke.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = [  # (bits, group_size, mapping)
    (8, 64, "symmetric"),
    (8, 64, "asymmetric"),
    (4, 64, "symmetric"),
    (4, 64, "asymmetric"),
    (4, 32, "asymmetric"),
    (3, 64, "asymmetric"),
]


def latency(models: list, tok, ids: torch.Tensor, rounds: int) -> list[dict]:
    """Median forward seconds and decode tokens/s per model, the models alternated in every round."""
    from ffnkit.evaluate import decode_speed

    fwd: list[list[float]] = [[] for _ in models]
    dec: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m(input_ids=ids, use_cache=False)
        for _ in range(rounds):
            for i, m in enumerate(models):
                start = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                fwd[i].append(time.perf_counter() - start)
                dec[i].append(decode_speed(m, tok, new_tokens=16, repeats=1)["tokens_per_s"])
    return [
        {"forward_1x512_s": statistics.median(f), "decode_tokens_per_s": statistics.median(d)}
        for f, d in zip(fwd, dec, strict=True)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (fewer: a smoke run)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N settings (a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/quantize_ffn_cpu.json")
    args = ap.parse_args()

    from ffnkit.evaluate import environment
    from ffnkit.io import load, save
    from ffnkit.pipeline import (
        PerplexityProtocol,
        PipelineConfig,
        Step,
        evaluation_set,
        load_step,
        measure,
        run_step,
    )

    t0 = time.perf_counter()
    dense, tok = load_step(PipelineConfig(model="smollm2-135m"))
    evaluation = evaluation_set(PerplexityProtocol(corpus="austen", max_tokens=args.eval_tokens), tok)
    ids = evaluation.tokens[:512].reshape(1, -1)  # [1, 512]
    tmp = Path(tempfile.mkdtemp(prefix="ffnkit-q-"))
    save(dense, tok, tmp / "float")
    dense_ppl = measure(dense, evaluation)
    rows = []
    settings = SETTINGS[: args.limit] if args.limit else SETTINGS
    for bits, group, mapping in settings:
        model = copy.deepcopy(dense)
        _, report = run_step(model, Step("quantize", {"bits": bits, "group_size": group, "mapping": mapping}))
        ppl = measure(model, evaluation).perplexity
        folder = tmp / f"q{bits}_{group}_{mapping}"
        save(model, tok, folder, report=report)
        reloaded, _ = load(folder)
        lat_dense, lat_q = latency([dense, reloaded], tok, ids, args.rounds)
        row = {
            "bits": bits,
            "group_size": group,
            "mapping": mapping,
            "perplexity": ppl,
            "perplexity_after_load": measure(reloaded, evaluation).perplexity,
            "perplexity_vs_dense": ppl / dense_ppl.perplexity,
            "stored_bits_per_weight": report.stored_bits_per_weight,
            "ffn_bytes_before": report.ffn_bytes_before,
            "ffn_bytes_after": report.ffn_bytes_after,
            "file_bytes": os.path.getsize(folder / "model.safetensors"),
            "latency": lat_q,
            "dense_latency": lat_dense,
            "forward_speedup": lat_dense["forward_1x512_s"] / lat_q["forward_1x512_s"],
            "quantise_seconds": report.seconds,
        }
        rows.append(row)
        print(
            f"[{time.perf_counter() - t0:5.0f}s] int{bits} g{group} {mapping}: ppl {ppl:.2f} "
            f"(reloaded {row['perplexity_after_load']:.2f}), file {row['file_bytes'] / 1e6:.0f} MB, "
            f"forward x{row['forward_speedup']:.2f}",
            file=sys.stderr,
            flush=True,
        )
        del model, reloaded
    doc = {
        "benchmark": "weight-only quantisation of FFN matrices",
        "command": "python " + " ".join(sys.argv),
        "model": "smollm2-135m",
        "protocol": dense_ppl.protocol,
        "dense": {
            "perplexity": dense_ppl.perplexity,
            "file_bytes": os.path.getsize(tmp / "float" / "model.safetensors"),
        },
        "results": rows,
        "threads": torch.get_num_threads(),
        "load_average_end": os.getloadavg(),
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
