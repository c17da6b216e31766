"""Benchmark: ffnkit's expert executor against transformers' eager / batched_mm / grouped_mm, one process.

The protocol, shapes and floors are documented in :mod:`ffnkit.kernels.moe_bench` (the same code runs
``ffnkit bench moe``). Writes one JSON document with the machine, versions and command.

Run:  python benchmarks/moe_kernel.py --device cpu --out benchmarks/results/moe_kernel_cpu.json
      python benchmarks/moe_kernel.py --device cuda --out benchmarks/results/moe_kernel_h200_graph.json
On the GPU every implementation is also timed inside a CUDA graph (``--no-graph`` to skip); the document
then states the issue's targets under ``targets`` (ffnkit in a graph against the floors, like-for-like
against transformers' best).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ffnkit.kernels.benchmark import write_json
from ffnkit.kernels.moe_bench import SHAPES, bench_experts, calibrate, make_routing


def _calibrate_gather() -> dict:
    """The decode kernels' configs at the benchmark's GPU shape (random experts, 4 routings per size)."""
    from ffnkit.kernels.moe_graph import calibrate_gather

    sh = SHAPES["cuda"]
    d, f, e, k = sh["hidden"], sh["width"], sh["experts"], sh["top_k"]
    torch.manual_seed(0)
    gate_up = torch.randn(e, 2 * f, d, device="cuda", dtype=torch.bfloat16) / d**0.5  # [E, 2F, D]
    down = torch.randn(e, d, f, device="cuda", dtype=torch.bfloat16) / f**0.5  # [E, D, F]
    routings = {t: [make_routing(t, e, k, 1.0, "cuda", 500 + 10 * t + r) for r in range(4)] for t in (1, 16)}
    return calibrate_gather(gate_up, down, routings)


def _write_partial(out: Path | None, row: dict) -> None:
    """Keep the rows measured so far on disk (a run cut short by a time limit still leaves its numbers)."""
    if out is None:
        return
    part = out.with_suffix(".partial.json")
    rows = json.loads(part.read_text())["results"] if part.exists() else []
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(json.dumps({"partial": True, "results": [*rows, row]}, indent=2) + "\n")


def _breakdown(floors: dict) -> list[dict]:
    """Stage times of the large-batch route (uniform routing) with each grouped GEMM's compute floor."""
    from ffnkit.kernels.moe_graph import prefill_breakdown

    sh = SHAPES["cuda"]
    d, f, e, k = sh["hidden"], sh["width"], sh["experts"], sh["top_k"]
    torch.manual_seed(1)
    gate_up = torch.randn(e, 2 * f, d, device="cuda", dtype=torch.bfloat16) / d**0.5  # [E, 2F, D]
    down = torch.randn(e, d, f, device="cuda", dtype=torch.bfloat16) / f**0.5  # [E, D, F]
    rows = []
    for t in (4096, 16384):
        idx, w = make_routing(t, e, k, 1.0, "cuda", 900 + t)
        us = prefill_breakdown(gate_up, down, idx, w)
        floor = {
            "gemm_gate_up": 1e6 * 2 * t * k * 2 * f * d / floors["matmul_flops"],
            "gemm_down": 1e6 * 2 * t * k * f * d / floors["matmul_flops"],
        }
        rows.append({"tokens": t, "us": us, "compute_floor_us": floor})
        print(f"breakdown T={t}: {us}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the issue's CPU target: 2)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--calibrate", action="store_true", help="GPU: first pick the Triton routes' thresholds and configs"
    )
    ap.add_argument("--no-graph", action="store_true", help="GPU: skip the CUDA-graph timings")
    ap.add_argument(
        "--calibrate-gather",
        action="store_true",
        help="GPU: first pick the decode (gather) kernels' launch configs from in-graph timings at 1 and 16 tokens",
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="GPU: also time the large-batch route's stages alone at 4,096 and 16,384 tokens",
    )
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    calibration = calibrate() if args.calibrate and args.device == "cuda" else None
    gather_calibration = None
    if args.calibrate_gather and args.device == "cuda":
        gather_calibration = _calibrate_gather()
        print(f"gather configs: {gather_calibration['chosen']}", file=sys.stderr, flush=True)
    doc = bench_experts(
        args.device,
        tuple(args.tokens) if args.tokens else None,
        rounds=args.rounds,
        graphs=not args.no_graph,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
        on_row=lambda row: _write_partial(args.out, row),
    )
    if calibration is not None:
        doc["calibration"] = calibration
    if gather_calibration is not None:
        doc["gather_calibration"] = gather_calibration
    if args.breakdown and args.device == "cuda":
        doc["prefill_breakdown"] = _breakdown(doc["floors"])
    doc["command"] = " ".join(["python", *sys.argv])
    for entry in doc.get("targets", []):
        print(json.dumps(entry), file=sys.stderr, flush=True)
    write_json(doc, args.out)
    if args.out:
        args.out.with_suffix(".partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
