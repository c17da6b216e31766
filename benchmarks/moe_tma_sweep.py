"""Benchmark: the ``tma`` prefill route's persistent TMA kernels against torch's grouped GEMMs, in CUDA graphs.

At OLMoE shapes (hidden 2048, expert width 1024, 64 experts, top-8, bf16), for each token count: torch's
grouped GEMMs alone (the CUTLASS baseline, on pre-permuted rows), the stream stages (sort, scatter, act,
combine), every candidate launch config of ``_gate_up_tma_kernel`` (gather + gate/up + activation) and of
``_down_tma_kernel`` (combine-ready rows, or atomics into float32), each checked against the torch path
(relative error), then every large-batch route whole with the fastest configs, uniform and skewed routing
(expert 0 drawn 4x as often). The compute floor is the FLOPs over the measured 8192^3 bf16 matmul rate,
measured in the same process. Each timing: one CUDA graph of a few calls, replays timed with CUDA events
(:func:`ffnkit.kernels.benchmark.time_cuda`), median over rounds.

Run:  python benchmarks/moe_tma_sweep.py --out benchmarks/results/moe_tma_sweep_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ffnkit.kernels.benchmark import time_cuda, write_json
from ffnkit.kernels.moe_bench import SHAPES, environment, make_routing, measure_floors


def _cfg(bm, bn, bk, group, warps, stages, flatten=False, **extra) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps,
            "num_stages": stages, "FLATTEN": flatten, **extra}  # fmt: skip


CANDIDATES = {
    "gate_up": [
        _cfg(128, 128, 64, 4, 8, 4, GATHER=True, JOINT=True, PERSISTENT=False),
        _cfg(128, 128, 64, 8, 8, 4, GATHER=True, JOINT=True, PERSISTENT=False),
        _cfg(128, 128, 64, 4, 8, 4, GATHER=True, JOINT=False, PERSISTENT=False),
        _cfg(256, 128, 64, 4, 16, 3, GATHER=True, JOINT=True, PERSISTENT=False),
        _cfg(256, 128, 64, 4, 16, 3, GATHER=True, JOINT=True),
        _cfg(256, 64, 64, 4, 8, 4, GATHER=True, JOINT=True, PERSISTENT=False),
        _cfg(128, 128, 64, 4, 8, 4, GATHER=True, JOINT=True),
    ],
    "down": [
        _cfg(128, 256, 64, 4, 8, 3, True, ATOMIC=False),
        _cfg(128, 256, 64, 4, 8, 4, True, ATOMIC=False),
        _cfg(256, 256, 64, 4, 16, 3, True, ATOMIC=False),
        _cfg(256, 256, 64, 4, 16, 3, ATOMIC=False),
        _cfg(256, 256, 64, 4, 16, 3, ATOMIC=False, PERSISTENT=False),
        _cfg(256, 128, 64, 4, 8, 4, True, ATOMIC=False),
    ],
}


def _name(cfg: dict) -> str:
    return " ".join(f"{a}={b}" for a, b in cfg.items())


def _time(fn, rounds: int, calls: int) -> float:
    with torch.no_grad():
        return time_cuda({"f": fn}, 1, rounds, calls)["f"]["median_us"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _try(fn, rounds, calls):
    try:
        return _time(fn, rounds, calls)
    except Exception as err:  # noqa: BLE001 - a config that does not compile or fit is recorded, not fatal
        return f"error: {type(err).__name__}: {str(err)[:200]}"


def stages_at(t: int, gate_up, down, rounds: int, flops_rate: float) -> dict:
    """Baseline GEMMs, stream stages and every candidate kernel config at T tokens."""
    from ffnkit.kernels import moe_stream, moe_tma, moe_triton

    e, f2, d = gate_up.shape
    f, k = f2 // 2, SHAPES["cuda"]["top_k"]
    calls = 4 if t >= 4096 else 16
    gmm = moe_triton.grouped_gemm
    idx, w = make_routing(t, e, k, 1.0, "cuda", 900 + t)
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)  # [T, D]
    order, pos, counts, ends = moe_stream.sort_by_expert(idx, e)
    xs = moe_stream.scatter_rows(x, pos, k)  # [S, D]
    gu = gmm(xs, gate_up.transpose(1, 2), ends)  # [S, 2F]
    ref_h = moe_stream.act_mul(gu, 0)  # [S, F]
    ref_y = gmm(ref_h, down.transpose(1, 2), ends)  # [S, D]
    ref_out = moe_stream.combine_rows(ref_y, pos, idx, w, e)  # [T, D]
    flops = 2.0 * t * k * 3 * d * f
    row: dict = {
        "tokens": t,
        "compute_floor_us": {
            "gate_up": 1e6 * flops * 2 / 3 / flops_rate,
            "down": 1e6 * flops / 3 / flops_rate,
        },
        "us": {},
        "rel_err": {},
    }
    us = row["us"]
    us["sort"] = _time(lambda i: moe_stream.sort_by_expert(idx, e), rounds, calls)
    us["scatter"] = _time(lambda i: moe_stream.scatter_rows(x, pos, k), rounds, calls)
    us["act"] = _time(lambda i: moe_stream.act_mul(gu, 0), rounds, calls)
    us["combine"] = _time(lambda i: moe_stream.combine_rows(ref_y, pos, idx, w, e), rounds, calls)
    us["grouped_mm gate_up"] = _time(lambda i: gmm(xs, gate_up.transpose(1, 2), ends), rounds, calls)
    us["grouped_mm down"] = _time(lambda i: gmm(ref_h, down.transpose(1, 2), ends), rounds, calls)
    us["atomic zero + cast"] = _time(
        lambda i: torch.zeros(t, d, device="cuda", dtype=torch.float32).to(torch.bfloat16), rounds, calls
    )
    for cfg in CANDIDATES["gate_up"]:
        name = "gate_up " + _name(cfg)
        fn = lambda i, cfg=cfg: moe_tma.launch_gate_up(x, gate_up, order, counts, k, "silu", cfg, xs=xs)  # noqa: E731
        try:
            row["rel_err"][name] = _rel(fn(0), ref_h)
        except Exception as err:  # noqa: BLE001
            row["rel_err"][name] = f"error: {type(err).__name__}: {str(err)[:200]}"
            continue
        us[name] = _try(fn, rounds, calls)
        torch.cuda.empty_cache()
    for cfg in CANDIDATES["down"]:
        name = "down " + _name(cfg)
        fn = lambda i, cfg=cfg: moe_tma.launch_down(ref_h, down, order, w, counts, k, cfg)  # noqa: E731
        try:
            got = fn(0)
            row["rel_err"][name] = _rel(got, ref_out if cfg["ATOMIC"] else ref_y)
        except Exception as err:  # noqa: BLE001
            row["rel_err"][name] = f"error: {type(err).__name__}: {str(err)[:200]}"
            continue
        us[name] = _try(fn, rounds, calls)
        torch.cuda.empty_cache()
    return row


def routes_at(t: int, kind: str, skew: float, gate_up, down, rounds: int, configs: dict) -> dict:
    """The large-batch routes whole at T tokens, the tma route with each chosen config set."""
    from ffnkit.kernels import moe_tma, moe_triton

    e, _, d = gate_up.shape
    k = SHAPES["cuda"]["top_k"]
    calls = 4 if t >= 4096 else 16
    idx, w = make_routing(t, e, k, skew, "cuda", 1000 + t)
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    ref = moe_triton.ROUTES["grouped_mm"](x, gate_up, down, idx, w)
    entry: dict = {"tokens": t, "routing": kind, "us": {}, "rel_err_vs_grouped_mm": {}}
    fns = {name: moe_triton.ROUTES[name] for name in ("grouped_mm", "fused_grouped_mm")}
    for name, cfg in configs.items():
        fns[name] = lambda *a, cfg=cfg: moe_tma.tma_experts(*a, configs=cfg)
    for name, fn in fns.items():
        try:
            entry["rel_err_vs_grouped_mm"][name] = _rel(fn(x, gate_up, down, idx, w), ref)
        except Exception as err:  # noqa: BLE001
            entry["us"][name] = f"error: {type(err).__name__}: {str(err)[:200]}"
            continue
        entry["us"][name] = _try(lambda i, fn=fn: fn(x, gate_up, down, idx, w), rounds, calls)
    return entry


def _best(rows: list[dict], prefix: str, where=lambda cfg: True) -> dict | None:
    """The candidate config with the least time summed over the rows (errors count as infinite)."""
    if not rows:
        return None
    scores = []
    for cfg in CANDIDATES[prefix]:
        if not where(cfg):
            continue
        times = [r["us"].get(f"{prefix} {_name(cfg)}") for r in rows]
        if all(isinstance(v, float) for v in times):
            scores.append((sum(times), cfg))
    return min(scores, key=lambda s: s[0])[1] if scores else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384], help="stage sweep sizes")
    ap.add_argument("--route-tokens", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from ffnkit.kernels import moe_tma

    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    floors = measure_floors("cuda")
    sh = SHAPES["cuda"]
    d, f, e = sh["hidden"], sh["width"], sh["experts"]
    torch.manual_seed(0)
    gate_up = torch.randn(e, 2 * f, d, device="cuda", dtype=torch.bfloat16) / d**0.5  # [E, 2F, D]
    down = torch.randn(e, d, f, device="cuda", dtype=torch.bfloat16) / f**0.5  # [E, D, F]
    rows = []
    for t in args.tokens:
        row = stages_at(t, gate_up, down, args.rounds, floors["matmul_flops"])
        say(f"T={t}: " + json.dumps({n: round(v, 1) for n, v in row["us"].items() if isinstance(v, float)}))
        rows.append(row)
    best_gu = _best(rows, "gate_up")
    chosen = {}
    for atomic in (False, True):
        best_dn = _best(rows, "down", lambda c, a=atomic: c["ATOMIC"] == a)
        if best_gu and best_dn:
            chosen["tma_atomic" if atomic else "tma"] = {"gate_up": best_gu, "down": best_dn}
    chosen["tma_committed"] = moe_tma.TMA_CONFIGS
    routes = []
    for t in args.route_tokens:
        for kind, skew in (("uniform", 1.0), ("skewed", 4.0)):
            entry = routes_at(t, kind, skew, gate_up, down, args.rounds, chosen)
            flops = 2.0 * t * sh["top_k"] * 3 * d * f
            entry["compute_floor_us"] = 1e6 * flops / floors["matmul_flops"]
            entry["x_compute_floor"] = {
                n: round(v / entry["compute_floor_us"], 3)
                for n, v in entry["us"].items()
                if isinstance(v, float)
            }
            say(f"routes T={t} {kind}: {entry['us']} x floor {entry['x_compute_floor']}")
            routes.append(entry)
    doc = {
        "benchmark": "moe_tma_sweep",
        "shape": sh,
        "environment": environment("cuda"),
        "floors": floors,
        "stages": rows,
        "chosen": chosen,
        "routes": routes,
        "command": " ".join(["python", *sys.argv]),
    }
    write_json(doc, args.out)


if __name__ == "__main__":
    main()
