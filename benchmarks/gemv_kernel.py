"""Benchmark: the dense batch-1 GEMV (``ffnkit.kernels.gemv``) against cuBLAS (``F.linear``), per shape.

Shapes default to the attention projections of Llama-3-8B in bf16 (q/k/v fused [6144, 4096], o [4096,
4096]). Variants side by side in one process: ``cublas`` (F.linear), ``gemv`` (the Triton kernel with its
shipped CONFIGS), ``gemv[rows:BO:W:P]`` / ``gemv[chunks:BO:BK:W:S]`` (either kernel with other launch parameters,
``--sweep``), and the
fused pre-norm product ``rms_norm_gemv`` (residual add + RMSNorm + q/k/v GEMV in one launch) next to
``add_norm_cublas`` (the add, F.rms_norm and F.linear, eager). Protocol of
:func:`ffnkit.kernels.benchmark.time_cuda`: each variant captured in a CUDA graph of ``--calls`` calls,
rotating over ``--copies`` weight copies so no call finds its weights in L2, median over rounds; the bound
is the weight bytes over the copy bandwidth measured in the same process. Every variant is checked against
F.linear in float32 first (relative error of the output's norm).

Run:  python benchmarks/gemv_kernel.py --device cuda --out benchmarks/results/gemv_kernel_h200.json
CPU smoke test (the torch fallback, tiny shapes):
      python benchmarks/gemv_kernel.py --device cpu --shapes 96x64 --rounds 3 --out /tmp/gemv_smoke.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ffnkit.kernels import gemv, rms_norm_gemv
from ffnkit.kernels.benchmark import copy_bandwidth, environment, time_cpu, time_cuda, write_json
from ffnkit.kernels.dense_gemv import parse_gemv_config


def variants(x: torch.Tensor, r: torch.Tensor, ws: list, g: torch.Tensor, sweep: list[str]) -> dict:
    """name -> fn(copy index): every variant on input x (residual r, norm weight g) and weight copy c."""
    k = x.shape[-1]
    fns = {"cublas": lambda c: F.linear(x, ws[c]), "gemv": lambda c: gemv(x, ws[c])}
    if x.is_cuda:
        import ffnkit.kernels.triton_gemv as TG

        for spec in sweep:
            cfg = parse_gemv_config(spec)
            fns[f"gemv[{spec}]"] = lambda c, cfg=cfg: TG.gemv(x, ws[c], config=cfg)
    fns["add_norm_cublas"] = lambda c: F.linear(F.rms_norm(x + r, (k,), g, 1e-5), ws[c])
    fns["rms_norm_gemv"] = lambda c: rms_norm_gemv(x, ws[c], g, 1e-5, r)[0]
    return fns


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default="6144x4096,4096x4096", help="[out]x[in], comma list")
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument(
        "--sweep", default="", help="extra configs rows:BO:W:P or chunks:BO:BK:W[:S], comma list (cuda)"
    )
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=24)
    args = ap.parse_args()
    dev = args.device
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    bw = copy_bandwidth(dev)
    sweep = [s for s in args.sweep.split(",") if s]
    record = {
        "benchmark": "gemv_kernel",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment(dev),
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "dtype": str(dtype).replace("torch.", ""),
        "copy_bandwidth_gb_s": round(bw / 1e9, 1),
        "rows": [],
    }
    if dev == "cuda":
        import ffnkit.kernels.triton_gemv as TG

        record["shipped_config"] = dict(TG.CONFIGS)
    for shape in args.shapes.split(","):
        o, k = (int(v) for v in shape.split("x"))
        ws = [torch.randn(o, k, device=dev, dtype=dtype) / k**0.5 for _ in range(args.copies)]
        g = torch.rand(k, device=dev, dtype=dtype) + 0.5
        for n in [int(v) for v in args.rows.split(",") if v]:
            x = torch.randn(n, k, device=dev, dtype=dtype)
            r = torch.randn(n, k, device=dev, dtype=dtype)
            fns = variants(x, r, ws, g, sweep)
            want = F.linear(x.float(), ws[0].float())
            hf = x.float() + r.float()
            want_norm = F.linear(F.rms_norm(hf, (k,), g.float(), 1e-5), ws[0].float())
            errs = {}
            for name, fn in list(fns.items()):
                try:
                    errs[name] = rel(fn(0), want_norm if "norm" in name else want)
                except Exception as exc:  # a config that does not compile is reported and dropped
                    errs[name] = repr(exc)[:200]
                    del fns[name]
            if dev == "cuda":
                t = time_cuda(fns, args.copies, args.rounds, args.calls)
            else:
                t = time_cpu(fns, args.copies, args.rounds, torch.zeros(1 << 22))
            bound_us = o * k * ws[0].element_size() / bw * 1e6
            for name in errs:
                row = {"shape": [o, k], "rows": n, "variant": name, "rel_err": errs[name]}
                if name in t:
                    med = t[name]["median_us"]
                    row.update(median_us=round(med, 2), bound_us=round(bound_us, 2),
                               x_bound=round(med / bound_us, 3), x_cublas=round(t["cublas"]["median_us"] / med, 3),
                               eager_median_us=round(t[name].get("eager_median_us", med), 2))  # fmt: skip
                record["rows"].append(row)
                print(json.dumps(row), flush=True)
            write_json(record, args.out)
    best = {}
    for row in record["rows"]:
        if row["variant"].startswith("gemv") and "median_us" in row:
            key = f"{row['shape'][0]}x{row['shape'][1]}/{row['rows']}"
            if key not in best or row["median_us"] < best[key]["median_us"]:
                best[key] = {
                    "variant": row["variant"],
                    "median_us": row["median_us"],
                    "x_bound": row["x_bound"],
                }
    record["fastest_gemv"] = best
    write_json(record, args.out)
    print(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
