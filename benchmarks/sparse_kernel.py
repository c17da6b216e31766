"""Benchmark: the sparse-FFN kernels against the dense FFN, side by side in one process.

One gated FFN (CPU: Qwen2.5-0.5B shape, d 896, d_ff 4864, float32, 2 threads; GPU: Llama-3-8B shape,
d 4096, d_ff 14336, bfloat16) at 0/25/40/50/65/80/90% of its weight bytes skipped, batch 1, 2, 4, 8, 16:
- ``dense``: the FFN as a model runs it (three contiguous nn.Linear weights; torch / MKL / cuBLAS);
- ``gather``: :func:`ffnkit.kernels.gather_ffn` on the backend (cpu or triton) over the union active set;
- ``torch_gather``: index_select of the active rows + matmuls (the naive baseline);
- ``threshold`` (CATS; at most 2/3 of the bytes can be skipped) and ``teal`` (:func:`teal_ffn`) on the backend;
- CPU only, ``gather_separate``: the C kernel on three separate [F, D] tensors instead of the packed layout.
Then "where sparsity stops paying": every row its own random 50% of the neurons (through ``scale``, exact
per row), so the union the kernel must read grows with the batch.

Protocol: several copies of the weights are rotated so no call finds its weights in a cache (on the CPU a
64 MB buffer is also read before each timed call); variants alternate within every round; medians over
rounds; warm-up (and Triton compilation) excluded. GPU: each variant is captured in a CUDA graph of
``--calls`` calls and the graph replays are timed with CUDA events (``graph_us``, launch gaps hidden as in a
graph-captured decode loop); ``eager_us`` times the same calls launched from Python. Every variant is
checked against the reference backend (masked dense, float32) first. The bound is the bytes a variant must
read over the copy bandwidth (bytes read + written / time of a large copy) measured in the same process.

Run:  python benchmarks/sparse_kernel.py --device cpu --out benchmarks/results/sparse_kernel_cpu.json
      python benchmarks/sparse_kernel.py --device cuda --sweep --out benchmarks/results/sparse_kernel_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ffnkit.kernels import gather_ffn, pack_ffn, pack_teal, teal_ffn, threshold_ffn
from ffnkit.kernels import reference as ref

LEVELS = (0.0, 0.25, 0.40, 0.50, 0.65, 0.80, 0.90)
BATCHES = (1, 2, 4, 8, 16)
SHAPES = {"cpu": (896, 4864, torch.float32), "cuda": (4096, 14336, torch.bfloat16)}


def environment(device: str) -> dict:
    env = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    try:
        env["cpu_model"] = next(
            ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        env["cpu_model"] = platform.processor()
    if device == "cuda":
        import triton

        env.update(
            triton=triton.__version__,
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
        )
    else:
        from ffnkit.kernels.cpu_build import cpu_library_status

        env["cpu_kernel"] = cpu_library_status()
    return env


# ------------------------------------------------------------------------------------------------ timing


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large tensor copy (median of 9)."""
    n = (1 << 30) // 4 if device == "cuda" else (256 << 20) // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(9):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / statistics.median(times)


def time_cpu(fns: dict[str, Callable[[int], object]], copies: int, rounds: int, flush: torch.Tensor) -> dict:
    """Median seconds per call; variants alternate; each call uses the next weight copy, after a flush."""
    counter = itertools.count()
    for fn in fns.values():  # warm-up
        fn(next(counter) % copies)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c = next(counter) % copies
            flush.sum()  # evict the last calls' weights from the caches
            t = time.perf_counter()
            fn(c)
            times[name].append(time.perf_counter() - t)
    return {k: {"median_us": statistics.median(v) * 1e6, "min_us": min(v) * 1e6} for k, v in times.items()}


def time_cuda(fns: dict[str, Callable[[int], object]], copies: int, rounds: int, calls: int) -> dict:
    """Median microseconds per call from CUDA-graph replays (and eager launches), variants alternating."""
    graphs, out = {}, {}
    for name, fn in fns.items():
        for c in range(copies):  # warm-up: compilation, autotuning, allocator
            fn(c)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(0)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(i % copies)
        graphs[name] = g
    times: dict[str, list[float]] = {k: [] for k in fns}
    eager: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, g in graphs.items():
            g.replay()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            e.synchronize()
            times[name].append(s.elapsed_time(e) * 1e3 / calls)
        for name, fn in fns.items():
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for i in range(calls):
                fn(i % copies)
            e.record()
            e.synchronize()
            eager[name].append(s.elapsed_time(e) * 1e3 / calls)
    for name in fns:
        out[name] = {
            "median_us": statistics.median(times[name]),
            "min_us": min(times[name]),
            "eager_median_us": statistics.median(eager[name]),
        }
    del graphs
    return out


# ----------------------------------------------------------------------------------------------- weights


class Weights:
    """``copies`` random FFNs in every layout the variants read (dense, packed, separate, TEAL)."""

    def __init__(self, d: int, f: int, dtype: torch.dtype, device: str, copies: int, separate: bool):
        self.d, self.f, self.dtype, self.device, self.copies = d, f, dtype, device, copies
        self.dense, self.packed, self.separate, self.teal = [], [], [], []
        for _ in range(copies):
            # scaled like a trained layer so activations stay O(1)
            wg = torch.randn(f, d, device=device, dtype=dtype) / d**0.5
            wu = torch.randn(f, d, device=device, dtype=dtype) / d**0.5
            wd = torch.randn(d, f, device=device, dtype=dtype) / f**0.5
            self.dense.append((wg, wu, wd))
            self.packed.append(pack_ffn(wg, wu, wd))
            self.teal.append(pack_teal(wg, wu, wd))
            if separate:
                self.separate.append((wg, wu, wd.T.contiguous()))
        self.bytes = 3 * f * d * self.dense[0][0].element_size()


def dense_ffn(x: torch.Tensor, w: tuple) -> torch.Tensor:
    wg, wu, wd = w
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def torch_gather(x: torch.Tensor, packed: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    w = packed.index_select(0, idx)  # [K, 3, D]
    return (F.silu(x @ w[:, 0].T) * (x @ w[:, 1].T)) @ w[:, 2]


def threshold_keeping(v: torch.Tensor, k: int) -> float:
    """A threshold with exactly ``k`` entries of ``v`` above it, halfway between the k-th and (k+1)-th
    largest, so rounding differences between a kernel and the reference cannot flip an entry."""
    if k >= v.numel():
        return 0.0
    if k <= 0:
        return float("inf")
    top = v.float().topk(k + 1).values
    return float((top[k - 1] + top[k]) / 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------- runs


def point_variants(w: Weights, x: torch.Tensor, level: float, backend: str, separate: bool):
    """The variants at one (batch, level), each as fn(copy) -> y, with bytes read and the reference output."""
    d, f = w.d, w.f
    gen = torch.Generator().manual_seed(int(level * 1000) + x.shape[0])
    k = round((1 - level) * f)
    idx = torch.randperm(f, generator=gen)[:k].sort().values.to(w.device)
    out: dict[str, tuple[Callable, float, torch.Tensor]] = {}
    x32 = x.float()
    p0 = w.packed[0]
    out["dense"] = (
        lambda c: dense_ffn(x, w.dense[c]),
        1.0,
        ref.gather_ffn(x, p0, torch.arange(f, device=w.device)),
    )
    out["gather"] = (
        lambda c: gather_ffn(x, w.packed[c], idx, backend=backend),
        k / f,
        ref.gather_ffn(x, p0, idx),
    )
    out["torch_gather"] = (lambda c: torch_gather(x, w.packed[c], idx), k / f, ref.gather_ffn(x, p0, idx))
    if separate:
        from ffnkit.kernels.cpu_sparse_ffn import ffn_rows

        out["gather_separate"] = (
            lambda c: ffn_rows(x, w.separate[c], idx, None),
            k / f,
            ref.gather_ffn(x, p0, idx),
        )
    # CATS: the share of neurons to drop is 1.5 x level (the gate is always read)
    if level <= 2 / 3:
        a = ref.activation("silu", x32 @ p0[:, 0].float().T).abs().amax(0)  # [F] max over rows
        t = threshold_keeping(a, round((1 - 1.5 * level) * f))
        frac = float((a > t).float().mean())
        out["threshold"] = (
            lambda c: threshold_ffn(x, w.packed[c], t, backend=backend),
            1 / 3 + 2 / 3 * frac,
            ref.threshold_ffn(x, p0, t),
        )
    # TEAL: the same share of inputs (to gate/up) and of intermediates (to down) dropped
    tw = w.teal[0]
    t_in = threshold_keeping(x32.abs().amax(0), round((1 - level) * d))
    xs = torch.where(x32.abs() >= t_in, x32, torch.zeros_like(x32))
    gu = xs @ tw.gate_up_t.float()
    h = ref.activation("silu", gu[:, :f]) * gu[:, f:]
    t_mid = threshold_keeping(h.abs().amax(0), round((1 - level) * f))
    kept_in = float((x32.abs() >= t_in).any(0).float().mean())
    kept_mid = float((h.abs() >= t_mid).any(0).float().mean())
    out["teal"] = (
        lambda c: teal_ffn(x, w.teal[c], t_in, t_mid, backend=backend),
        2 / 3 * kept_in + 1 / 3 * kept_mid,
        ref.teal_ffn(x, tw.gate_up_t, tw.down_t, t_in, t_mid),
    )
    return out


def union_variants(w: Weights, x: torch.Tensor, backend: str):
    """Every row its own random half of the neurons (exact per row through ``scale``)."""
    n, f = x.shape[0], w.f
    gen = torch.Generator().manual_seed(1234 + n)
    masks = torch.stack([torch.randperm(f, generator=gen) < f // 2 for _ in range(n)])  # [N, F] per-row sets
    idx = masks.any(0).nonzero().flatten().to(w.device)  # the union
    scale = masks[:, idx.cpu()].to(w.device, torch.float32)  # [N, K]: 1 where the row keeps the neuron
    expect = ref.gather_ffn(x, w.packed[0], idx, scale=scale)
    return {
        "dense": (
            lambda c: dense_ffn(x, w.dense[c]),
            1.0,
            ref.gather_ffn(x, w.packed[0], torch.arange(f, device=w.device)),
        ),
        "gather_union": (
            lambda c: gather_ffn(x, w.packed[c], idx, scale=scale, backend=backend),
            idx.numel() / f,
            expect,
        ),
    }


def run_points(w, device, backend, batches, levels, args, bw, log, rows, union=False):
    flush = torch.empty((64 << 20) // 4).uniform_() if device == "cpu" else None
    for n in batches:
        for level in [None] if union else levels:
            try:
                measure_point(w, device, backend, n, level, args, bw, log, rows, union, flush)
            except Exception as exc:  # keep the other points; the failure is recorded
                section = "union" if union else "curve"
                row = {"section": section, "batch": n, "level": level, "error": repr(exc)[:300]}
                rows.append(row)
                log(row)


def measure_point(w, device, backend, n, level, args, bw, log, rows, union, flush) -> None:
    x = torch.randn(n, w.d, device=device, dtype=w.dtype)
    variants = (
        union_variants(w, x, backend) if union else point_variants(w, x, level, backend, device == "cpu")
    )
    errs = {k: rel_err(fn(0), expect) for k, (fn, _, expect) in variants.items()}
    fns = {k: v[0] for k, v in variants.items()}
    if device == "cuda":
        t = time_cuda(fns, w.copies, args.rounds, args.calls)
    else:
        t = time_cpu(fns, w.copies, args.rounds, flush)
    dense_us = t["dense"]["median_us"]
    for k, (_, frac, _) in variants.items():
        bound_us = frac * w.bytes / bw * 1e6
        row = {
            "section": "union" if union else "curve",
            "variant": k,
            "batch": n,
            "level": level,
            "bytes_skipped": round(1 - frac, 4),
            **{kk: round(vv, 2) for kk, vv in t[k].items()},
            "speedup_vs_dense": round(dense_us / t[k]["median_us"], 3),
            "bound_us": round(bound_us, 2),
            "time_over_bound": round(t[k]["median_us"] / bound_us, 3) if bound_us > 0 else None,
            "rel_err_vs_reference": float(f"{errs[k]:.3g}"),
        }
        rows.append(row)
        log(row)


def sweep_cuda(w: Weights, args, log) -> dict:
    """At 50%: launch configs of the batched kernels (batch 8) and of the fused batch-1 kernel, then the
    fastest of the three batch-1 paths (fused, split, dot); the winners stay in CONFIGS for the run."""
    import ffnkit.kernels.triton_sparse_ffn as T

    results = []
    g1 = ("BLOCK_K", "BLOCK_D", "num_warps", "num_stages")
    r1 = ("BLOCK_K", "BLOCK_M", "num_warps", "num_stages", "WAVES")
    f1 = ("BLOCK_K", "num_warps", "num_stages", "PROGRAMS_PER_SM")
    grid = {
        "gate_up_n": [dict(zip(g1, v, strict=True)) for v in [(32, 128, 4, 3), (64, 128, 4, 3), (32, 256, 4, 3)]],
        "rows_n": [dict(zip(r1, v, strict=True)) for v in [(32, 256, 4, 3, 4), (64, 128, 4, 3, 4), (32, 256, 4, 4, 8)]],
        "fused_1": [
            dict(zip(f1, v, strict=True), MAX_D=8192)
            for v in [(4, 16, 2, 1), (2, 8, 2, 2), (2, 16, 2, 1), (8, 32, 1, 1)]
        ],
    }  # fmt: skip
    k = w.f // 2
    idx = torch.randperm(w.f, device="cuda")[:k].sort().values

    def trial(batch: int, label: str, cfg: dict) -> float:
        x = torch.randn(batch, w.d, device="cuda", dtype=w.dtype)
        try:
            err = rel_err(
                gather_ffn(x, w.packed[0], idx, backend="triton"), ref.gather_ffn(x, w.packed[0], idx)
            )
            fns = {"g": lambda c: gather_ffn(x, w.packed[c], idx, backend="triton")}
            t = time_cuda(fns, w.copies, max(5, args.rounds // 2), args.calls)["g"]["median_us"]
        except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
            t, err = float("inf"), repr(exc)[:200]
        ok = isinstance(err, float) and err < 2e-2
        rec = {
            "batch": batch,
            "kernel": label,
            "config": cfg,
            "median_us": round(t, 2) if ok else None,
            "rel_err": err,
        }
        results.append(rec)
        log(rec)
        return t if ok else float("inf")

    for batch, name, path in ((8, "gate_up_n", "dot"), (8, "rows_n", "dot"), (1, "fused_1", "fused")):
        T.CONFIGS["batch1"] = {"path": path}
        base = dict(T.CONFIGS[name])
        timed = []
        for cfg in grid[name]:
            T.CONFIGS[name] = cfg
            timed.append((trial(batch, name, cfg), cfg))
        best_t, best_cfg = min(timed, key=lambda tc: tc[0])
        T.CONFIGS[name] = dict(best_cfg if best_t < float("inf") else base)
    paths = []
    for path in ("fused", "split", "dot"):
        T.CONFIGS["batch1"] = {"path": path}
        paths.append((trial(1, f"batch1_path_{path}", {"path": path}), path))
    T.CONFIGS["batch1"] = {"path": min(paths)[1]}
    chosen = {k: dict(v) for k, v in T.CONFIGS.items()}
    log({"chosen_configs": chosen})
    return {"trials": results, "chosen": chosen}


def breakdown_cuda(w: Weights, args, log) -> list[dict]:
    """Batch 1 at 50%: each stage alone (graph replays), to see where the time goes."""
    import ffnkit.kernels.triton_sparse_ffn as T

    idx = torch.randperm(w.f, device="cuda")[: w.f // 2].sort().values
    x = torch.randn(1, w.d, device="cuda", dtype=w.dtype)
    h = T.launch_gate_up(x, w.packed[0], idx, None, "silu", None)
    part = T.launch_rows(h, w.packed[0][:, 2, :], idx, None)
    fpart = T.launch_fused_1(x, w.packed[0], idx, "silu", None)
    stages = {
        "gate_up": lambda c: T.launch_gate_up(x, w.packed[c], idx, None, "silu", None),
        "rows": lambda c: T.launch_rows(h, w.packed[c][:, 2, :], idx, None),
        "reduce_rows": lambda c: T.launch_reduce(part, w.dtype),
        "fused_1": lambda c: T.launch_fused_1(x, w.packed[c], idx, "silu", None),
        "reduce_fused": lambda c: T.launch_reduce(fpart, w.dtype),
        "gather_total": lambda c: gather_ffn(x, w.packed[c], idx, backend="triton"),
        "dense": lambda c: dense_ffn(x, w.dense[c]),
    }
    t = time_cuda(stages, w.copies, args.rounds, args.calls)
    rows = [{"stage": k, **{kk: round(vv, 2) for kk, vv in v.items()}} for k, v in t.items()]
    rows.append(
        {
            "partials": {"rows": list(part.shape), "fused_1": list(fpart.shape)},
            "batch1_path": T.CONFIGS["batch1"]["path"],
        }
    )
    for r in rows:
        log(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the issue's machine has 2 cores)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per point (default: cpu 15, cuda 20)"
    )
    ap.add_argument("--calls", type=int, default=20, help="GPU: calls per timed graph replay")
    ap.add_argument("--copies", type=int, default=None, help="weight copies rotated (default: cpu 6, cuda 4)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--levels", default=",".join(str(v) for v in LEVELS))
    ap.add_argument("--sweep", action="store_true", help="GPU: tune the Triton launch configs first")
    ap.add_argument("--configs", type=Path, default=None, help="GPU: JSON of Triton CONFIGS to use")
    args = ap.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (15 if device == "cpu" else 20)
    copies = args.copies or (6 if device == "cpu" else 4)
    backend = "cpu" if device == "cpu" else "triton"
    d, f, dtype = SHAPES[device]
    torch.manual_seed(0)
    w = Weights(d, f, dtype, device, copies, separate=device == "cpu")
    bw = copy_bandwidth(device)
    record = {
        "benchmark": "sparse_kernel",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment(device),
        "shape": {
            "d_model": d,
            "d_ff": f,
            "dtype": str(dtype),
            "ffn_weight_bytes": w.bytes,
            "copies": copies,
        },
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "bound": "bytes the variant must read / copy_bandwidth (copy bandwidth counts bytes read + written)",
        "protocol": __doc__.split("Protocol: ", 1)[1].split("\n\nRun:")[0].replace("\n", " "),
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")

    def log(row: dict) -> None:
        print(json.dumps(row), flush=True)
        save()

    if device == "cuda":
        import ffnkit.kernels.triton_sparse_ffn as T

        if args.configs:
            T.CONFIGS.update(json.loads(args.configs.read_text()))
        if args.sweep:
            try:
                record["sweep"] = sweep_cuda(w, args, log)
            except Exception as exc:  # fall back to the built-in configs
                record["sweep"] = {"error": repr(exc)[:500]}
                log(record["sweep"])
        record["triton_configs"] = {k: dict(v) for k, v in T.CONFIGS.items()}
        try:
            record["breakdown_b1_50"] = breakdown_cuda(w, args, log)
        except Exception as exc:
            record["breakdown_b1_50"] = {"error": repr(exc)[:500]}
            log(record["breakdown_b1_50"])
    batches = [int(b) for b in args.batches.split(",")]
    levels = [float(v) for v in args.levels.split(",")]
    run_points(w, device, backend, batches, levels, args, bw, log, record["rows"])
    run_points(w, device, backend, batches, levels, args, bw, log, record["rows"], union=True)
    record["environment"]["load_average_end"] = os.getloadavg()
    save()
    print_table(record)


def print_table(record: dict) -> None:
    print(f"copy bandwidth {record['copy_bandwidth_GBps']} GB/s")
    print(
        f"{'section':7s} {'variant':16s} {'B':>3s} {'skip':>5s} {'us':>9s} {'eager':>9s} {'xdense':>6s} {'/bound':>6s} {'err':>8s}"
    )
    for r in record["rows"]:
        if "error" in r:
            print(r)
            continue
        print(
            f"{r['section']:7s} {r['variant']:16s} {r['batch']:3d} {r['bytes_skipped']:5.2f} {r['median_us']:9.1f} "
            f"{r.get('eager_median_us', float('nan')):9.1f} {r['speedup_vs_dense']:6.2f} "
            f"{r['time_over_bound'] or 0:6.2f} {r['rel_err_vs_reference']:8.1e}"
        )


if __name__ == "__main__":
    main()
