"""Benchmark: launch configs of the MoE prefill stream kernels and the large-batch routes, in CUDA graphs.

At OLMoE shapes (hidden 2048, expert width 1024, 64 experts, top-8, bf16) and uniform routing, each stage
of :mod:`ffnkit.kernels.moe_stream` (sort, scatter, act, combine) is timed alone for every candidate launch
config beside the torch ops it replaces; then the Triton gate/up GEMM of the ``fused_grouped_mm`` route per
config; then, with the fastest configs applied, every prefill route whole. Each timing: one CUDA graph of a
few calls, replays timed with CUDA events (:func:`ffnkit.kernels.benchmark.time_cuda`), median over rounds.
The fastest configs (summed over the token counts) are recorded under ``chosen``: the defaults to commit in
``STREAM_CONFIGS`` / ``CONFIGS``.

Run:  python benchmarks/moe_prefill_sweep.py --device cuda --out benchmarks/results/moe_prefill_sweep_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ffnkit.kernels.benchmark import time_cuda, write_json
from ffnkit.kernels.moe_bench import SHAPES, environment, make_routing

CANDIDATES = {
    "sort": [
        {"BLOCK": 1024, "SUB": 128, "num_warps": 8},
        {"BLOCK": 512, "SUB": 64, "num_warps": 4},
        {"BLOCK": 2048, "SUB": 128, "num_warps": 8},
        {"BLOCK": 256, "SUB": 64, "num_warps": 4},
    ],
    "scatter": [
        {"BLOCK_T": 4, "BLOCK_D": 1024, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 2048, "num_warps": 8},
        {"BLOCK_T": 8, "BLOCK_D": 512, "num_warps": 4},
        {"BLOCK_T": 2, "BLOCK_D": 2048, "num_warps": 8},
    ],
    "act": [
        {"BLOCK_R": 4, "BLOCK_N": 1024, "num_warps": 4},
        {"BLOCK_R": 1, "BLOCK_N": 1024, "num_warps": 4},
        {"BLOCK_R": 8, "BLOCK_N": 512, "num_warps": 4},
        {"BLOCK_R": 16, "BLOCK_N": 512, "num_warps": 8},
        {"BLOCK_R": 2, "BLOCK_N": 1024, "num_warps": 8},
    ],
    "combine": [
        {"BLOCK_T": 2, "BLOCK_D": 1024, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 2048, "num_warps": 8},
        {"BLOCK_T": 4, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_T": 8, "BLOCK_D": 512, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 256, "num_warps": 4},
    ],
    "fused_gate_up": [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "N_FIRST": True},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4, "N_FIRST": True},
        {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "N_FIRST": True},
    ],
}


def _time(fn, rounds: int, calls: int) -> float:
    with torch.no_grad():
        return time_cuda({"f": fn}, 1, rounds, calls)["f"]["median_us"]


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    sh = SHAPES["cuda"]
    d, f, e = sh["hidden"], sh["width"], sh["experts"]
    torch.manual_seed(0)
    gate_up = torch.randn(e, 2 * f, d, device="cuda", dtype=torch.bfloat16) / d**0.5  # [E, 2F, D]
    down = torch.randn(e, d, f, device="cuda", dtype=torch.bfloat16) / f**0.5  # [E, D, F]
    return gate_up, down


def _stages_at(t: int, gate_up, down, rounds: int, totals: dict[str, dict[str, float]]) -> dict:
    """Every candidate config of every stage at T tokens (plus the torch ops and GEMMs around them)."""
    from ffnkit.kernels import moe_stream, moe_triton

    e, f2, d = gate_up.shape
    f, k = f2 // 2, SHAPES["cuda"]["top_k"]
    calls = 4 if t >= 4096 else 20
    gmm = moe_triton.grouped_gemm
    idx, w = make_routing(t, e, k, 1.0, "cuda", 700 + t)
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)  # [T, D]
    order, pos, counts, ends = moe_stream.sort_by_expert(idx, e)
    gu = torch.randn(t * k, 2 * f, device="cuda", dtype=torch.bfloat16)  # [S, 2F]
    y = torch.randn(t * k, d, device="cuda", dtype=torch.bfloat16)  # [S, D]
    xs = moe_stream.scatter_rows(x, pos, k)  # [S, D]
    h = moe_stream.act_mul(gu, 0)  # [S, F]
    stage_fns = {
        "sort": lambda i: moe_stream.sort_by_expert(idx, e),
        "scatter": lambda i: moe_stream.scatter_rows(x, pos, k),
        "act": lambda i: moe_stream.act_mul(gu, 0),
        "combine": lambda i: moe_stream.combine_rows(y, pos, idx, w, e),
        "fused_gate_up": lambda i: moe_triton.ROUTES["fused_grouped_mm"](x, gate_up, down, idx, w),
    }
    row: dict = {"tokens": t, "us": {}}
    row["us"]["torch_index_select"] = _time(lambda i: x.index_select(0, order // k), rounds, calls)
    row["us"]["torch_act"] = _time(lambda i: torch.nn.functional.silu(gu[:, :f]) * gu[:, f:], rounds, calls)
    row["us"]["gemm_gate_up"] = _time(lambda i: gmm(xs, gate_up.transpose(1, 2), ends), rounds, calls)
    row["us"]["gemm_down"] = _time(lambda i: gmm(h, down.transpose(1, 2), ends), rounds, calls)
    for key, cands in CANDIDATES.items():
        table = moe_triton.CONFIGS if key == "fused_gate_up" else moe_stream.STREAM_CONFIGS
        kept = dict(table[key])
        for cfg in cands:
            name = f"{key} " + " ".join(f"{a}={b}" for a, b in cfg.items())
            table[key] = dict(cfg)
            try:
                us = _time(stage_fns[key], rounds, calls)
                row["us"][name] = us
                totals[key][repr(cfg)] = totals[key].get(repr(cfg), 0.0) + us
            except Exception as err:  # a config that does not fit is recorded, not fatal
                row["us"][name] = f"error: {type(err).__name__}: {str(err)[:160]}"
                totals[key][repr(cfg)] = float("inf")
            torch.cuda.empty_cache()
        table[key] = kept
    return row


def _routes_at(t: int, kind: str, skew: float, gate_up, down, rounds: int) -> dict:
    """Every prefill route whole at T tokens (the configs in force)."""
    from ffnkit.kernels import moe_triton

    e, _, d = gate_up.shape
    k = SHAPES["cuda"]["top_k"]
    calls = 4 if t >= 4096 else 20
    idx, w = make_routing(t, e, k, skew, "cuda", 800 + t)
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    entry: dict = {"tokens": t, "routing": kind, "us": {}}
    for name, fn in moe_triton.ROUTES.items():
        if name == "gather" and t * k > 1024:
            continue
        try:
            entry["us"][name] = _time(lambda i, fn=fn: fn(x, gate_up, down, idx, w), rounds, calls)
        except Exception as err:  # noqa: BLE001 - recorded
            entry["us"][name] = f"error: {type(err).__name__}: {str(err)[:160]}"
    return entry


def sweep(tokens: tuple[int, ...], route_tokens: tuple[int, ...], rounds: int, say) -> dict:
    """Every stage config and route at each token count; returns timings and the chosen configs.

    Example:
        >>> sweep((4096,), (1, 4096), 3, print)  # doctest: +SKIP
    """
    from ffnkit.kernels import moe_stream, moe_triton

    gate_up, down = _weights()
    totals: dict[str, dict[str, float]] = {key: {} for key in CANDIDATES}
    rows = []
    for t in tokens:
        row = _stages_at(t, gate_up, down, rounds, totals)
        say(f"T={t}: " + json.dumps({n: round(v, 1) for n, v in row["us"].items() if isinstance(v, float)}))
        rows.append(row)
    chosen = {key: eval(min(v, key=v.get)) for key, v in totals.items() if v}  # noqa: S307 - our own repr
    for key, cfg in chosen.items():
        (moe_triton.CONFIGS if key == "fused_gate_up" else moe_stream.STREAM_CONFIGS)[key] = dict(cfg)
    routes = []
    for t in route_tokens:
        for kind, skew in (("uniform", 1.0), ("skewed", 4.0)):
            entry = _routes_at(t, kind, skew, gate_up, down, rounds)
            say(f"routes T={t} {kind}: {entry['us']}")
            routes.append(entry)
    return {"stages": rows, "routes": routes, "chosen": chosen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda"], default="cuda")
    ap.add_argument("--tokens", type=int, nargs="*", default=[128, 4096, 16384], help="stage sweep sizes")
    ap.add_argument("--route-tokens", type=int, nargs="*", default=[1, 16, 128, 1024, 4096, 16384])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    doc = {
        "benchmark": "moe_prefill_sweep",
        "shape": SHAPES["cuda"],
        "environment": environment("cuda"),
        **sweep(
            tuple(args.tokens),
            tuple(args.route_tokens),
            args.rounds,
            lambda s: print(s, file=sys.stderr, flush=True),
        ),
        "command": " ".join(["python", *sys.argv]),
    }
    write_json(doc, args.out)


if __name__ == "__main__":
    main()
