"""The sparse-FFN kernel benchmark shared by ``ffnkit bench sparsity`` and benchmarks/sparse_kernel.py.

One gated FFN at several shares of its weight bytes skipped and batch sizes; the variants run side by side
in one process:
- ``dense``: the FFN as a model runs it (three contiguous nn.Linear weights; torch / MKL / cuBLAS);
- ``gather``: :func:`ffnkit.kernels.gather_ffn` over a random active set (the union at batch > 1);
- ``torch_gather``: index_select of the active rows + matmuls (the naive baseline);
- ``threshold`` (CATS; at most 2/3 of the bytes can be skipped) and ``teal`` (:func:`teal_ffn`);
- CPU only, optional ``gather_separate``: the C kernel on three separate [F, D] tensors.
Then "where sparsity stops paying" (``union``): every row its own random 50% of the neurons (through
``scale``, exact per row), so the union the kernel must read grows with the batch.

Protocol: several copies of the weights are rotated so no call finds its weights in a cache (on the CPU a
64 MB buffer is also read before each timed call); variants alternate within every round; medians over
rounds; warm-up (and Triton compilation) excluded. GPU: each variant is captured in a CUDA graph of
``calls`` calls and the graph replays are timed with CUDA events (launch gaps hidden as in a graph-captured
decode loop); ``eager_median_us`` times the same calls launched from Python. Every variant is checked
against the reference backend (masked dense, float32) first. The bound is the bytes a variant must read
over the copy bandwidth (bytes read + written / time of a large copy) measured in the same process.

Example:
    >>> cfg = SparsityBenchConfig(d_model=64, d_ff=128, levels=(0.5,), rounds=2, copies=2)
    >>> rows = bench_sparsity(cfg)["rows"]  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels import gather_ffn, pack_ffn, pack_teal, teal_ffn, threshold_ffn
from ffnkit.kernels import reference as ref

LEVELS = (0.0, 0.25, 0.40, 0.50, 0.65, 0.80, 0.90)
SHAPES = {"llama3-8b": (4096, 14336), "qwen2.5-0.5b": (896, 4864)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("dense", "gather", "torch_gather", "threshold", "teal")


@dataclass
class SparsityBenchConfig:
    """What :func:`bench_sparsity` measures: one FFN shape, device, dtype, levels (share of FFN weight
    bytes skipped, [0, 1)) and batch sizes; rounds/copies default per device (cpu 15/6, cuda 20/4).

    Example:
        >>> SparsityBenchConfig(d_model=896, d_ff=4864).device
        'cpu'
    """

    d_model: int = 896
    d_ff: int = 4864
    device: str = "cpu"
    dtype: str = "float32"
    levels: tuple[float, ...] = LEVELS
    batches: tuple[int, ...] = (1,)
    rounds: int | None = None
    copies: int | None = None
    calls: int = 20
    variants: tuple[str, ...] = VARIANTS
    separate: bool = False
    union: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bench_config(self)


def write_json(doc: dict, out: Path | None) -> None:
    """A benchmark's result document: written to ``out`` (its folder made) or, without one, printed.

    Example:
        >>> write_json({"benchmark": "x"}, None)
        {
          "benchmark": "x"
        }
    """
    text = json.dumps(doc, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    else:
        print(text)


def parse_shape(spec: str) -> tuple[int, int]:
    """``llama3-8b`` / ``qwen2.5-0.5b`` / ``D,F`` -> (d_model, d_ff).

    Example:
        >>> parse_shape("512,1376")
        (512, 1376)
    """
    key = spec.strip().lower()
    if key in SHAPES:
        return SHAPES[key]
    parts = key.split(",")
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise InvalidArgumentError(f"--shape {spec!r}: use {', '.join(SHAPES)} or D,F (two positive integers)")


def check_bench_config(cfg: SparsityBenchConfig) -> None:
    """One-line errors for a config that cannot run here (checked before any weight is made).

    Example:
        >>> check_bench_config(SparsityBenchConfig())
    """
    if cfg.device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"--device {cfg.device!r}: use cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda: no CUDA device here; use --device cpu")
    if cfg.dtype not in DTYPES:
        raise InvalidArgumentError(f"--dtype {cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    if cfg.d_model < 1 or cfg.d_ff < 1:
        raise InvalidArgumentError(f"shape must be positive, got d_model={cfg.d_model}, d_ff={cfg.d_ff}")
    if not cfg.levels or any(not 0.0 <= v < 1.0 for v in cfg.levels):
        raise InvalidArgumentError(f"--levels must be shares in [0, 1), got {list(cfg.levels)}")
    if not cfg.batches or any(int(b) < 1 for b in cfg.batches):
        raise InvalidArgumentError(f"--batch sizes must be >= 1, got {list(cfg.batches)}")
    for name, v in (("rounds", cfg.rounds), ("copies", cfg.copies), ("calls", cfg.calls)):
        if v is not None and v < 1:
            raise InvalidArgumentError(f"--{name} must be >= 1, got {v}")
    unknown = set(cfg.variants) - set(VARIANTS) - {"gather_separate"}
    if unknown or "dense" not in cfg.variants:
        raise InvalidArgumentError(
            f"variants must include dense and come from {VARIANTS}, got {cfg.variants}"
        )


def environment(device: str) -> dict:
    """Machine, versions and load of this process (stored with every result).

    Example:
        >>> environment("cpu")["machine"]  # doctest: +SKIP
        'x86_64'
    """
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
    """Bytes read + written per second by a large tensor copy (median of 9).

    Example:
        >>> copy_bandwidth("cpu") > 0  # doctest: +SKIP
        True
    """
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
    """Median and min microseconds per call; variants alternate; each call uses the next weight copy, after
    a flush of the caches.

    Example:
        >>> time_cpu({"noop": lambda c: None}, 1, 3, torch.zeros(8))["noop"]["median_us"] >= 0
        True
    """
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
    """Median microseconds per call from CUDA-graph replays (and eager launches), variants alternating.

    Example:
        >>> time_cuda({"dense": lambda c: dense_ffn(x, w.dense[c])}, 4, 20, 20)  # doctest: +SKIP
    """
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
    """``copies`` random FFNs in every layout the variants read (dense, packed, separate, TEAL).

    Example:
        >>> Weights(8, 16, torch.float32, "cpu", 2, separate=False).packed[0].shape
        torch.Size([16, 3, 8])
    """

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
    """The dense gated FFN as a model runs it: down(silu(gate x) * up x) with nn.Linear weights.

    Example:
        >>> dense_ffn(torch.ones(1, 2), (torch.ones(3, 2), torch.ones(3, 2), torch.ones(2, 3))).shape
        torch.Size([1, 2])
    """
    wg, wu, wd = w
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def torch_gather(x: torch.Tensor, packed: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The naive baseline: copy the active rows out with index_select, then dense matmuls.

    Example:
        >>> torch_gather(torch.ones(1, 2), torch.ones(4, 3, 2), torch.tensor([0, 2])).shape
        torch.Size([1, 2])
    """
    w = packed.index_select(0, idx)  # [K, 3, D]
    return (F.silu(x @ w[:, 0].T) * (x @ w[:, 1].T)) @ w[:, 2]


def threshold_keeping(v: torch.Tensor, k: int) -> float:
    """A threshold with exactly ``k`` entries of ``v`` above it, halfway between the k-th and (k+1)-th
    largest, so rounding differences between a kernel and the reference cannot flip an entry.

    Example:
        >>> threshold_keeping(torch.tensor([1.0, 3.0, 2.0]), 2)
        1.5
    """
    if k >= v.numel():
        return 0.0
    if k <= 0:
        return float("inf")
    top = v.float().topk(k + 1).values
    return float((top[k - 1] + top[k]) / 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32.

    Example:
        >>> rel_err(torch.ones(2), torch.ones(2))
        0.0
    """
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------- runs


def point_variants(w: Weights, x: torch.Tensor, level: float, backend: str, separate: bool):
    """The variants at one (batch, level): name -> (fn(copy) -> y, share of bytes read, reference output).

    Example:
        >>> sorted(point_variants(w, x, 0.5, "cpu", False))  # doctest: +SKIP
        ['dense', 'gather', 'teal', 'threshold', 'torch_gather']
    """
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
    """Every row its own random half of the neurons (exact per row through ``scale``): dense and
    gather_union as in :func:`point_variants`.

    Example:
        >>> sorted(union_variants(w, x, "cpu"))  # doctest: +SKIP
        ['dense', 'gather_union']
    """
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


def run_points(w, device, backend, batches, levels, cfg, bw, log, rows, union=False) -> None:
    """Measure every (batch, level) point (or the union section), appending rows; a failing point is
    recorded as an error row and the others still run."""
    flush = torch.empty((64 << 20) // 4).uniform_() if device == "cpu" else None
    for n in batches:
        for level in [None] if union else levels:
            try:
                measure_point(w, device, backend, n, level, cfg, bw, log, rows, union, flush)
            except Exception as exc:  # keep the other points; the failure is recorded
                section = "union" if union else "curve"
                row = {"section": section, "batch": n, "level": level, "error": repr(exc)[:300]}
                rows.append(row)
                log(row)


def measure_point(w, device, backend, n, level, cfg, bw, log, rows, union, flush) -> None:
    """One point: check each variant against the reference, time them side by side, append rows."""
    x = torch.randn(n, w.d, device=device, dtype=w.dtype)
    if union:
        variants = union_variants(w, x, backend)
    else:
        variants = point_variants(w, x, level, backend, cfg.separate)
        variants = {k: v for k, v in variants.items() if k in cfg.variants or k == "gather_separate"}
    errs = {k: rel_err(fn(0), expect) for k, (fn, _, expect) in variants.items()}
    fns = {k: v[0] for k, v in variants.items()}
    if device == "cuda":
        t = time_cuda(fns, w.copies, cfg.rounds, cfg.calls)
    else:
        t = time_cpu(fns, w.copies, cfg.rounds, flush)
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


def make_weights(cfg: SparsityBenchConfig) -> Weights:
    """The rotated weight copies of ``cfg`` (rounds/copies defaults filled in on ``cfg``).

    Example:
        >>> make_weights(SparsityBenchConfig(d_model=8, d_ff=16, copies=2)).bytes
        1536
    """
    cfg.rounds = cfg.rounds or (15 if cfg.device == "cpu" else 20)
    cfg.copies = cfg.copies or (6 if cfg.device == "cpu" else 4)
    torch.manual_seed(cfg.seed)
    return Weights(cfg.d_model, cfg.d_ff, DTYPES[cfg.dtype], cfg.device, cfg.copies, cfg.separate)


def bench_sparsity(
    cfg: SparsityBenchConfig,
    log: Callable[[dict], None] | None = None,
    weights: Weights | None = None,
    record: dict | None = None,
) -> dict:
    """Run the benchmark of ``cfg``: a record with the environment, copy bandwidth and one row per
    (section, variant, batch, level). ``log`` sees each row as it is measured.

    Example:
        >>> rec = bench_sparsity(SparsityBenchConfig(d_model=32, d_ff=64, levels=(0.5,), rounds=2))
        >>> sorted({r["variant"] for r in rec["rows"]})[:2]
        ['dense', 'gather']
    """
    log = log or (lambda row: None)
    w = weights or make_weights(cfg)
    backend = "cpu" if cfg.device == "cpu" else "triton"
    bw = copy_bandwidth(cfg.device)
    record = record if record is not None else {}
    record.update(
        benchmark="sparse_kernel",
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        environment=environment(cfg.device),
        config={k: v for k, v in asdict(cfg).items() if k != "extra"},
        shape={
            "d_model": w.d,
            "d_ff": w.f,
            "dtype": str(w.dtype),
            "ffn_weight_bytes": w.bytes,
            "copies": w.copies,
        },
        copy_bandwidth_GBps=round(bw / 1e9, 1),
        bound="bytes the variant must read / copy_bandwidth (copy bandwidth counts bytes read + written)",
        protocol=__doc__.split("Protocol: ", 1)[1].split("\n\nExample:")[0].replace("\n", " "),
    )
    record.setdefault("rows", [])
    batches = [int(b) for b in cfg.batches]
    run_points(w, cfg.device, backend, batches, list(cfg.levels), cfg, bw, log, record["rows"])
    if cfg.union:
        run_points(w, cfg.device, backend, batches, [], cfg, bw, log, record["rows"], union=True)
    record["environment"]["load_average_end"] = os.getloadavg()
    return record


def summary_rows(record: dict) -> list[dict]:
    """The rows of a record flattened for a table (errors kept as their own rows).

    Example:
        >>> summary_rows({"rows": [{"error": "x", "batch": 1, "level": 0.5}]})
        [{'error': 'x', 'batch': 1, 'level': 0.5}]
    """
    keep = (
        "section",
        "variant",
        "batch",
        "bytes_skipped",
        "median_us",
        "speedup_vs_dense",
        "time_over_bound",
    )
    return [r if "error" in r else {k: r.get(k) for k in keep} for r in record.get("rows", [])]
