"""Benchmark: ffnkit's quantised FFN (QuantizedLinear through the quantised-matmul kernels) against the
float FFN and against today's dequantise-then-matmul, side by side in one process.

One gated FFN y = down(silu(gate x) * up x) per shape, its three matrices quantised to int4 (and int8) with
one scale and one zero point per group of 64 inputs (a plain min/max affine quantiser written here: the
device has no torchao; the speed does not depend on the values). Variants:
- ``float``: three nn.Linear (CPU float32 / MKL; GPU bfloat16 / cuBLAS), the baseline;
- ``int4`` / ``int8``: three QuantizedLinear, default kernel backend (CPU: the C loops; GPU: tinygemm);
- ``int4_dequant``: the same modules on backend ``reference`` (dequantise, then matmul: ffnkit before);
- GPU only, ``int4_fused``: the same int4 modules through :func:`ffnkit.modules.quantized.quantized_gated_ffn`
  (at most 8 rows: :mod:`ffnkit.kernels.triton_quant`, one tinygemm product over [gate | up], one Triton
  SiLU·up kernel, tinygemm down; more rows: the three modules).
Each variant's output is checked against the dequantised weights in float32 first (``max_rel_err``).

Protocol: ``--copies`` copies of every FFN are rotated so no call finds its weights in a cache (as in a
model's decode step, where every layer's weights are read once); on the CPU a 64 MB buffer is also read
before each timed call. Variants alternate within every round; medians over rounds; warm-up excluded.
GPU: each variant is captured in a CUDA graph of ``--calls`` calls and replays are timed with CUDA events
(``median_us``; ``eager_median_us`` times the same calls launched from Python). ``single_matrix`` times
one 14336x4096 matrix alone (tinygemm against cuBLAS bf16), the issue's 28 vs 54 us.

Run:  python benchmarks/quant_kernel.py --device cpu --out benchmarks/results/quant_kernel_cpu.json
      python benchmarks/quant_kernel.py --device cuda --out benchmarks/results/quant_kernel_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ffnkit.kernels import use_backend
from ffnkit.kernels.benchmark import environment as kernel_environment
from ffnkit.kernels.benchmark import time_cuda  # the one CUDA-graph timer (also used by bench sparsity)
from ffnkit.kernels.quant_matmul import dequant_linear
from ffnkit.modules.quantized import QuantizedLinear, quantized_gated_ffn

SHAPES = {
    "cpu": {"smollm2-135m": (576, 1536), "qwen2.5-0.5b": (896, 4864)},
    "cuda": {"llama-3-8b": (4096, 14336)},
}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def environment(device: str) -> dict:
    """The machine (the shared record of ffnkit.kernels.benchmark) plus the CPU int4 kernel's state."""
    env = kernel_environment(device)
    if device != "cuda":
        from ffnkit.kernels.cpu_quant import library_error

        env["cpu_quant_kernel_error"] = library_error()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


def quantise(w: torch.Tensor, bits: int, g: int) -> QuantizedLinear:
    """Affine min/max quantisation of w [out, in] in groups of g inputs into a QuantizedLinear."""
    out, n = w.shape
    wg = w.float().view(out, n // g, g)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    mn, mx = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((mx - mn) / (hi - lo)).clamp(min=1e-8)  # [out, G]
    zp = (lo - torch.round(mn / scale)).clamp(lo, hi)
    q = (torch.round(wg / scale[..., None]) + zp[..., None]).clamp(lo, hi).to(torch.int8).view(out, n)
    return QuantizedLinear.from_ints(q, scale.to(w.dtype), zp.to(torch.int8), None, bits=bits)


class FFN(nn.Module):
    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # [B, d]


class FusedFFN(FFN):
    """The same three QuantizedLinear through ffnkit's fused int4 FFN path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_gated_ffn(x, self.gate, self.up, self.down, "silu")


def build(d: int, f: int, dtype: torch.dtype, device: str, bits_list: tuple[int, ...]) -> dict[str, FFN]:
    ws = [torch.randn(f, d) / d**0.5, torch.randn(f, d) / d**0.5, torch.randn(d, f) / f**0.5]
    out = {"float": FFN(*[_linear(w, dtype, device) for w in ws])}
    for bits in bits_list:
        out[f"int{bits}"] = FFN(*[quantise(w.to(device, dtype), bits, 64) for w in ws])
    if device == "cuda" and "int4" in out:
        out["int4_fused"] = FusedFFN(out["int4"].gate, out["int4"].up, out["int4"].down)
    return out


def _linear(w: torch.Tensor, dtype: torch.dtype, device: str) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def oracle(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    """The FFN in float32 from dequantised weights (or the float weights)."""

    def mat(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
        if isinstance(m, QuantizedLinear):
            q, s, z = m.ints()
            return dequant_linear(v, q, s.float(), z)
        return F.linear(v, m.weight.float())

    xf = x.float()
    return mat(ffn.down, F.silu(mat(ffn.gate, xf)) * mat(ffn.up, xf))


def time_cpu(fns: dict[str, Callable[[int], object]], copies: int, rounds: int, flush: torch.Tensor) -> dict:
    counter = itertools.count()
    for fn in fns.values():
        for c in range(copies):
            fn(c)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c = next(counter) % copies
            flush.sum()  # evict the last calls' weights from the caches
            t = time.perf_counter()
            fn(c)
            times[name].append(time.perf_counter() - t)
    return {k: {"median_us": statistics.median(v) * 1e6, "min_us": min(v) * 1e6} for k, v in times.items()}


def run_shape(args, name: str, d: int, f: int) -> dict:
    device, dtype = args.device, DTYPES[args.device]
    torch.manual_seed(0)
    bits_list = (4, 8)
    copies = [build(d, f, dtype, device, bits_list) for _ in range(args.copies)]
    flush = torch.randn(16 << 20) if device == "cpu" else None  # 64 MB
    rows = []
    for batch in args.batches:
        xs = [torch.randn(batch, d, device=device, dtype=dtype) for _ in range(args.copies)]
        checks = {}
        with torch.no_grad():
            for v in copies[0]:
                ref = oracle(copies[0][v], xs[0])
                y = copies[0][v](xs[0]).float()
                checks[v] = ((y - ref).abs().max() / ref.abs().max()).item()
                paths = {
                    m: m_.kernel_pack(_backend(device), dtype).path
                    for m, m_ in copies[0][v].named_children()
                    if isinstance(m_, QuantizedLinear)
                }
                checks[v + "_paths"] = paths

        def call(v: str, ref_backend: bool = False, xs: list = xs) -> Callable[[int], object]:
            def fn(c: int) -> object:
                with torch.no_grad():
                    if ref_backend:
                        with use_backend("reference"):
                            return copies[c][v](xs[c])
                    return copies[c][v](xs[c])

            return fn

        fns = {v: call(v) for v in copies[0]}
        if batch in args.dequant_batches:
            fns["int4_dequant"] = call("int4", ref_backend=True)
        if device == "cpu":
            t = time_cpu(fns, args.copies, args.rounds, flush)
        else:
            t = time_cuda(fns, args.copies, args.rounds, args.calls)
        base = t["float"]["median_us"]
        row = {"batch": batch, "times": t, "max_rel_err": checks}
        row["speedup_vs_float"] = {v: base / t[v]["median_us"] for v in t if v != "float"}
        if device == "cuda":
            eb = t["float"]["eager_median_us"]
            row["eager_speedup_vs_float"] = {v: eb / t[v]["eager_median_us"] for v in t if v != "float"}
        print(json.dumps({"shape": name, **row}), file=sys.stderr, flush=True)
        rows.append(row)
    return {"shape": name, "d_model": d, "d_ff": f, "dtype": str(dtype), "rows": rows}


def _backend(device: str) -> str:
    return "cpu" if device == "cpu" else "triton"


def single_matrix(rounds: int, calls: int) -> dict:
    """One 14336x4096 matrix at batch 1: tinygemm through QuantizedLinear against cuBLAS bf16."""
    torch.manual_seed(0)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) / 64
    copies = 4
    lins = [_linear(w, torch.bfloat16, "cuda") for _ in range(copies)]
    qs = [quantise(w, 4, 64) for _ in range(copies)]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

    def f(mods):
        def fn(c):
            with torch.no_grad():
                return mods[c](x)

        return fn

    return time_cuda({"bf16": f(lins), "int4": f(qs)}, copies, rounds, calls)


def tinygemm_probe(rounds: int, calls: int) -> dict:
    """tinygemm alone at batch 1 for inner_k_tiles x kernel group size x matrix shape (gate/up, down, and
    gate+up fused into one [2 d_ff, d] matrix), against cuBLAS bf16 on the same shape."""
    torch.manual_seed(0)
    out = {}
    x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 14336)}
    for n, k in ((14336, 4096), (4096, 14336), (28672, 4096)):
        copies = 4
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        fns = {"bf16": lambda c, ws=ws, k=k: F.linear(x[k], ws[c])}
        u = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
        nib = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8).contiguous()
        for tiles in (2, 4, 8):
            packed = [torch.ops.aten._convert_weight_to_int4pack(nib, tiles) for _ in range(copies)]
            for g in (64, 128, 256):
                sz = torch.rand(k // g, n, 2, device="cuda", dtype=torch.bfloat16)
                fns[f"tiles{tiles}_g{g}"] = lambda c, p=packed, g=g, sz=sz, k=k: (
                    torch.ops.aten._weight_int4pack_mm(x[k], p[c], g, sz)
                )
        t = time_cuda(fns, copies, rounds, calls)
        out[f"{n}x{k}"] = {name: v["median_us"] for name, v in t.items()}
        print(json.dumps({f"{n}x{k}": out[f"{n}x{k}"]}), file=sys.stderr, flush=True)
        del ws, packed
    return out


def cpu_torch_op_probe(rounds: int, copies: int) -> dict:
    """CPU, batch 1, one 1536x576 matrix: float32 F.linear, ffnkit's C int4 loop and torch's own CPU int4 op
    (``aten._weight_int4pack_mm_for_cpu``, inner_k_tiles 4, group 64), each checked against its oracle."""
    from ffnkit.kernels.quant_matmul import pack_quant, quant_linear

    torch.manual_seed(0)
    n, k, g = 1536, 576, 64
    x = torch.randn(1, k)
    fl, packs, ops = [], [], []
    for _ in range(copies):
        u = torch.randint(0, 16, (n, k), dtype=torch.int32)
        s = torch.rand(n, k // g) * 0.01 + 0.001
        w = (u.float() - 8) * s.repeat_interleave(g, 1)  # [out, in], what all three multiply by
        fl.append(w)
        packs.append(pack_quant((u - 8).to(torch.int8), s, None, bits=4, backend="cpu"))
        sz = torch.stack([s.T, torch.zeros_like(s.T)], -1).contiguous()  # [in/g, out, 2]
        ops.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 4), sz))
    ref = x @ fl[0].T
    errs = {
        "ffnkit_c_int4": ((quant_linear(x, packs[0]) - ref).abs().max() / ref.abs().max()).item(),
        "torch_int4_op": (
            (torch.ops.aten._weight_int4pack_mm_for_cpu(x, ops[0][0], g, ops[0][1]) - ref).abs().max()
            / ref.abs().max()
        ).item(),
    }
    fns = {
        "float": lambda c: F.linear(x, fl[c]),
        "ffnkit_c_int4": lambda c: quant_linear(x, packs[c]),
        "torch_int4_op": lambda c: torch.ops.aten._weight_int4pack_mm_for_cpu(x, ops[c][0], g, ops[c][1]),
    }
    t = time_cpu(fns, copies, rounds, torch.randn(16 << 20))
    return {"shape": [n, k], "batch": 1, "times": t, "max_rel_err": errs}


def nibble_probe() -> dict:
    """Which nibble order aten._convert_weight_to_int4pack expects on this torch (ffnkit packs even-high)."""
    torch.manual_seed(1)
    n, k = 64, 256
    u = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
    sz = torch.stack([torch.ones(k // 64, n), torch.zeros(k // 64, n)], -1).to("cuda", torch.bfloat16)
    x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (u.float() - 8).T
    out = {}
    for name, packed in {
        "even_high": (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8),
        "even_low": (u[:, 1::2] << 4 | u[:, ::2]).to(torch.uint8),
    }.items():
        try:
            w = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), 8)
            y = torch.ops.aten._weight_int4pack_mm(x, w, 64, sz).float()
            out[name] = ((y - ref).abs().max() / ref.abs().max()).item()
        except Exception as err:  # noqa: BLE001 - a probe records what failed
            out[name] = f"{type(err).__name__}: {err}"
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--dequant-batches", type=int, nargs="*", default=[1])
    p.add_argument("--copies", type=int, default=0, help="weight copies rotated (default: cpu 4, cuda 8)")
    p.add_argument("--rounds", type=int, default=0, help="default: cpu 60, cuda 20")
    p.add_argument("--calls", type=int, default=50, help="calls per CUDA graph")
    p.add_argument("--shapes", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0 = torch's default")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--probe", action="store_true", help="GPU: tinygemm per inner_k_tiles/group; CPU: torch's int4 op"
    )
    p.add_argument("--probe-only", action="store_true", help="CPU: the probe alone, no FFN shapes")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.copies = args.copies or (4 if args.device == "cpu" else 8)
    args.rounds = args.rounds or (60 if args.device == "cpu" else 20)
    result = {
        "benchmark": "quantised FFN kernels against the float FFN (batch 1/8/64)",
        "command": "python " + " ".join(sys.argv),
        "environment": environment(args.device),
        "protocol": {
            "copies": args.copies,
            "rounds": args.rounds,
            "calls_per_graph": args.calls if args.device == "cuda" else None,
            "group_size": 64,
            "mapping": "asymmetric (a zero point per group)",
            "statistic": "median over rounds, variants alternating; weights rotated over copies"
            + ("; CPU: 64 MB read before each call" if args.device == "cpu" else "; CUDA graph replays"),
        },
    }
    if args.device == "cuda":
        result["nibble_probe"] = nibble_probe()
        print(json.dumps(result["nibble_probe"]), file=sys.stderr, flush=True)
        sm = single_matrix(args.rounds, args.calls)
        result["single_matrix_14336x4096_batch1"] = {
            **sm,
            "speedup": sm["bf16"]["median_us"] / sm["int4"]["median_us"],
        }
        print(json.dumps(result["single_matrix_14336x4096_batch1"]), file=sys.stderr, flush=True)
        if args.probe:
            result["tinygemm_probe_batch1_us"] = tinygemm_probe(args.rounds, args.calls)
    if args.device == "cpu" and args.probe:
        result["torch_cpu_int4_op"] = cpu_torch_op_probe(args.rounds, args.copies)
        print(json.dumps(result["torch_cpu_int4_op"]), file=sys.stderr, flush=True)
        if args.probe_only:
            args.shapes = []
    shapes = SHAPES[args.device]
    names = shapes if args.shapes is None else args.shapes
    result["shapes"] = [run_shape(args, n, *shapes[n]) for n in names]
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
