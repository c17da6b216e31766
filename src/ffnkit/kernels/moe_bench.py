"""Measure the expert executor against transformers' own experts implementations, side by side in one process.

One experts layer (GPU: OLMoE shapes, hidden 2048, expert width 1024, 64 experts, top-8, bf16; CPU: hidden
512, width 256, 16 experts, top-4, float32) is run through a transformers v5 experts module
(``OlmoeExperts``) with ``experts_implementation`` = ``eager``, ``batched_mm``, ``grouped_mm`` and ffnkit's
``ffnkit`` (registered by :func:`ffnkit.kernels.moe_hf.use_fast_experts`), plus, on the GPU, each of
ffnkit's Triton routes alone (``gather``, ``sorted``, ``grouped_mm``, ``fused_grouped_mm``, ``tma``) to set the route
thresholds.

Protocol: several routings (and, on the CPU, several copies of the weights) are rotated so that no call finds
its weights in a cache; implementations alternate within every round; the median over rounds of the mean
time per call (GPU: CUDA events around ``calls`` back-to-back calls launched from Python, so launch overhead
counts) is reported; warm-up (and Triton compilation) excluded. GPU, in addition: every implementation
inside a CUDA graph as a decode loop runs it (:mod:`ffnkit.kernels.moe_graph`; ``graph_us``, or ``not
capturable`` with the reason in ``capture``). Every implementation is first checked
against ffnkit's reference (float32) at the sizes where the reference is cheap. Floors: the active experts'
weight bytes over the measured copy bandwidth (bytes read + written by a large copy), and the FLOPs over the
measured matmul rate (GPU: an 8192^3 bf16 product; CPU: a 1024 x 512 x 512 float32 product, the shape of
one expert's work at full load); the roofline is the larger of the two.

Example:
    >>> from ffnkit.kernels.moe_bench import bench_experts  # doctest: +SKIP
    >>> doc = bench_experts("cpu", tokens=(1, 16), rounds=3)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels.moe import experts_cost
from ffnkit.kernels.moe_graph import compare_like_for_like, graph_times, target_summary
from ffnkit.kernels.moe_reference import experts_forward as reference_forward

SHAPES = {
    "cuda": {"hidden": 2048, "width": 1024, "experts": 64, "top_k": 8, "dtype": "bfloat16"},
    "cpu": {"hidden": 512, "width": 256, "experts": 16, "top_k": 4, "dtype": "float32"},
}
TOKENS = {"cuda": (1, 16, 128, 1024, 4096, 16384), "cpu": (1, 16, 256, 2048)}
GRAPH_PROTOCOL = (
    "each implementation alone: one run under torch.cuda.set_sync_debug_mode('error') (a host sync means not "
    "capturable), then kernels/benchmark.py time_cuda: warm-up, one CUDA graph of calls_per_timing calls "
    "(routings and inputs rotated), per round one replay timed with CUDA events and the same calls launched "
    "eagerly; median over rounds (graph_us; graph_eager_us the eager launches of that same loop)"
)
HF_IMPLS = {"cuda": ("eager", "batched_mm", "grouped_mm"), "cpu": ("eager", "grouped_mm")}


def environment(device: str) -> dict:
    """Machine and library versions recorded with every result.

    Example:
        >>> "torch" in environment("cpu")
        True
    """
    import transformers

    env = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn: Callable[[int], object], calls: int, device: str) -> float:
    """Mean seconds per call over ``calls`` back-to-back calls fn(0), fn(1), ..."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(i)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls


def floor_probe(device: str) -> Callable[[], dict]:
    """A function that measures the floors once: copy bandwidth (bytes read + written per second) and
    matmul rate (FLOP/s) on this device; its buffers are allocated here, once.

    Example:
        >>> sorted(floor_probe("cpu")())  # doctest: +SKIP
        ['bandwidth_Bps', 'matmul_flops']
    """
    if device == "cuda":
        src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        mm_flops, calls = 2 * 8192**3, 10
    else:
        src = torch.empty(256 << 20, dtype=torch.uint8)
        a, b = torch.randn(1024, 512), torch.randn(512, 512)
        mm_flops, calls = 2 * 1024 * 512 * 512, 50
    dst = torch.empty_like(src)
    src.fill_(1)

    def probe() -> dict:
        dst.copy_(src)
        _sync(device)
        copy_s = _time_calls(lambda i: dst.copy_(src), 5, device)
        a @ b
        _sync(device)
        mm_s = _time_calls(lambda i: a @ b, calls, device)
        return {"bandwidth_Bps": 2 * src.numel() / copy_s, "matmul_flops": mm_flops / mm_s}

    return probe


def measure_floors(device: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and matmul rate (FLOP/s) on this device, the best
    of three probes.

    Example:
        >>> sorted(measure_floors("cpu"))  # doctest: +SKIP
        ['bandwidth_Bps', 'matmul_flops']
    """
    probe = floor_probe(device)
    samples = [probe() for _ in range(3)]
    return {k: max(s[k] for s in samples) for k in ("bandwidth_Bps", "matmul_flops")}


def _experts_module(shape: dict, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import OlmoeConfig
    from transformers.models.olmoe import modeling_olmoe

    experts_cls = getattr(modeling_olmoe, "OlmoeExperts", None)
    if experts_cls is None:  # another spelling in another transformers version
        experts_cls = next(v for n, v in vars(modeling_olmoe).items() if n.endswith("Experts"))

    cfg = OlmoeConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["width"],
        num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
        num_hidden_layers=1,
        vocab_size=32,
    )
    module = experts_cls(cfg)
    g = torch.Generator().manual_seed(seed)
    d, f, e = shape["hidden"], shape["width"], shape["experts"]
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(e, 2 * f, d, generator=g) / d**0.5)
        module.down_proj.copy_(torch.randn(e, d, f, generator=g) / f**0.5)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_routing(
    t: int, e: int, k: int, skew: float, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: each token draws k distinct experts, expert 0 with ``skew`` times the others' odds.

    Example:
        >>> idx, w = make_routing(4, 8, 2, 1.0, "cpu", 0)
        >>> idx.shape, bool(torch.allclose(w.sum(-1), torch.ones(4)))
        (torch.Size([4, 2]), True)
    """
    g = torch.Generator().manual_seed(seed)
    probs = torch.ones(t, e)
    probs[:, 0] = skew
    idx = torch.multinomial(probs, k, replacement=False, generator=g)  # [T, K]
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    return idx.to(device), w.to(device)


def bench_experts(
    device: str = "cpu",
    tokens: tuple[int, ...] | None = None,
    *,
    rounds: int = 5,
    skew: float = 4.0,
    routes: bool = True,
    graphs: bool = True,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Time transformers' experts implementations and ffnkit's at each token count; return a JSON document.

    ``skew``: the skewed-routing run gives expert 0 that many times the others' odds (a second table).
    ``graphs`` (GPU): also time every implementation inside a CUDA graph (:mod:`ffnkit.kernels.moe_graph`);
    each row then has ``capture``, ``graph_us`` and ``like_for_like`` (graph vs graph where both capture,
    else eager vs eager), and the document ``targets``. ``on_row`` sees each result row as it is measured.

    Example:
        >>> doc = bench_experts("cpu", (1,), rounds=1)  # doctest: +SKIP
    """
    from ffnkit.kernels.moe_hf import use_fast_experts

    if device not in SHAPES:
        raise InvalidArgumentError(f"unknown device {device!r}: use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device cuda asked for but no CUDA device is visible: use --device cpu")
    say = progress or (lambda s: None)
    shape = SHAPES[device]
    dtype = getattr(torch, shape["dtype"])
    d, f, e, k = shape["hidden"], shape["width"], shape["experts"], shape["top_k"]
    tokens = tuple(tokens or TOKENS[device])
    copies = 4 if device == "cpu" else 1  # CPU: rotate weight copies (25 MB each) past the caches
    modules = [_experts_module(shape, device, dtype, seed) for seed in range(copies)]
    for m in modules:
        use_fast_experts(m, backend="auto")  # registers "ffnkit"; the impl is switched per call below
    floors = measure_floors(device)
    # CPU: the floors are measured again in every round of every row, beside the implementations, so that a
    # drift of a shared machine moves floors and timings together (one measurement at the start made the
    # same kernel 1.36x or 1.54x its roofline in two runs)
    probe = floor_probe(device) if device == "cpu" else None
    say(f"floors: {floors['bandwidth_Bps'] / 1e9:.0f} GB/s, {floors['matmul_flops'] / 1e12:.1f} TFLOP/s")
    impls = [*HF_IMPLS[device], "ffnkit"]
    route_fns: dict[str, Callable] = {}
    if device == "cuda" and routes:
        from ffnkit.kernels import moe_triton

        route_fns = dict(moe_triton.ROUTES)
    results = []
    for kind, sk in (("uniform", 1.0), ("skewed", skew)):
        for t in tokens:
            # routings rotate with a period prime to the weight copies', so that on the CPU successive calls
            # pair each copy with every routing and the working set (~100 MB at one token) exceeds the caches;
            # with equal periods each copy saw one routing and one token's 6 MB per copy stayed in L3
            n_rout = copies + 1 if copies > 1 else 4
            xs = [torch.randn(t, d, device=device, dtype=dtype) for _ in range(2)]
            routing = [make_routing(t, e, k, sk, device, 100 * t + r) for r in range(n_rout)]
            cost = [experts_cost(t, idx, e, d, f, k, dtype.itemsize) for idx, _ in routing]
            names = list(impls) + [f"route_{r}" for r in route_fns if not (r == "gather" and t * k > 4096)]

            def runner(name: str, xs=xs, routing=routing, n_rout=n_rout) -> Callable[[int], object]:
                if not name.startswith("route_"):
                    for m in modules:  # once per timing, outside the timed calls
                        m.config._experts_implementation = name

                def call(i: int) -> object:
                    m = modules[i % copies]
                    idx, w = routing[i % n_rout]
                    if name.startswith("route_"):
                        fn = route_fns[name[6:]]
                        return fn(xs[i % 2], m.gate_up_proj, m.down_proj, idx, w, "silu")
                    if m.config._experts_implementation != name:  # a graph is captured after other runners
                        m.config._experts_implementation = name
                    return m(xs[i % 2], idx, w)

                return call

            # correctness first (reference in float32 where it is cheap; else against transformers' grouped_mm)
            status: dict[str, str] = {}
            idx0, w0 = routing[0]
            with torch.no_grad():
                ref = None
                if t * e <= 128 * 64:
                    ref = reference_forward(xs[0], modules[0].gate_up_proj, modules[0].down_proj, idx0, w0)
                for name in names:
                    try:
                        out = runner(name)(0)
                        if ref is None:
                            ref = out
                            status[name] = "ok (oracle)"
                        else:
                            err = float((out.float() - ref.float()).norm() / ref.float().norm())
                            status[name] = "ok" if err < 3e-2 else f"mismatch {err:.3g}"
                    except torch.OutOfMemoryError:
                        status[name] = "out of memory"
                        torch.cuda.empty_cache()
                    except Exception as err:  # record and go on: one failing implementation ends no run
                        status[name] = f"error: {type(err).__name__}: {str(err)[:300]}"
            live = [n for n in names if status[n].startswith("ok")]
            calls = 50 if device == "cuda" else 500
            times: dict[str, list[float]] = {n: [] for n in live}
            n_calls: dict[str, int] = {}
            floor_samples: list[dict] = []
            with torch.no_grad():
                for n in live:  # warm-up (compile, allocate), then ~50 ms of calls per timing at most
                    first = _time_calls(runner(n), 2, device)
                    n_calls[n] = max(3, min(calls, int(0.05 / max(first, 1e-7))))
                for _ in range(rounds):
                    if probe is not None:
                        floor_samples.append(probe())
                    for n in live:
                        times[n].append(_time_calls(runner(n), n_calls[n], device))
            row_floors = floors
            if floor_samples:
                row_floors = {
                    k: statistics.median(f[k] for f in floor_samples)
                    for k in ("bandwidth_Bps", "matmul_flops")
                }
            graph_status: dict[str, str] = {}
            graph: dict[str, dict] = {}
            if device == "cuda" and graphs:
                with torch.no_grad():
                    graph_status, graph = graph_times({n: runner(n) for n in live}, n_calls, rounds)
            bytes_floor = statistics.mean(c["weight_bytes"] + c["activation_bytes"] for c in cost)
            flops = cost[0]["flops"]
            row = {
                "routing": kind,
                "tokens": t,
                "active_experts": statistics.mean(c["active_experts"] for c in cost),
                "bandwidth_floor_us": 1e6 * bytes_floor / row_floors["bandwidth_Bps"],
                "compute_floor_us": 1e6 * flops / row_floors["matmul_flops"],
                "floors": row_floors,
                "status": status,
                "calls_per_timing": n_calls,
                "us": {n: 1e6 * statistics.median(v) for n, v in times.items()},
            }
            if graph_status:
                row["capture"] = graph_status
                row["graph_us"] = {n: g["median_us"] for n, g in graph.items()}
                row["graph_eager_us"] = {n: g["eager_median_us"] for n, g in graph.items()}
                row["like_for_like"] = compare_like_for_like(row, HF_IMPLS[device])
            row["roofline_us"] = max(row["bandwidth_floor_us"], row["compute_floor_us"])
            hf = [row["us"][n] for n in HF_IMPLS[device] if n in row["us"]]
            if hf and "ffnkit" in row["us"]:
                row["best_transformers_us"] = min(hf)
                row["speedup_vs_best_transformers"] = min(hf) / row["us"]["ffnkit"]
                row["ffnkit_over_roofline"] = row["us"]["ffnkit"] / row["roofline_us"]
                row["ffnkit_over_bandwidth_floor"] = row["us"]["ffnkit"] / row["bandwidth_floor_us"]
                row["ffnkit_over_compute_floor"] = row["us"]["ffnkit"] / row["compute_floor_us"]
            if "ffnkit" in row.get("graph_us", {}):
                g_us = row["graph_us"]["ffnkit"]
                row["ffnkit_graph_over_bandwidth_floor"] = g_us / row["bandwidth_floor_us"]
                row["ffnkit_graph_over_compute_floor"] = g_us / row["compute_floor_us"]
                row["ffnkit_graph_over_roofline"] = g_us / row["roofline_us"]
            results.append(row)
            if on_row is not None:
                on_row(row)
            say(
                f"{kind} T={t}: "
                + ", ".join(f"{n} {u:.0f}us" for n, u in row["us"].items())
                + "".join(
                    " | graph: " + ", ".join(f"{n} {u:.0f}us" for n, u in g.items())
                    for g in [row.get("graph_us")]
                    if g
                )
                + f" | floors bw {row['bandwidth_floor_us']:.0f}us, compute {row['compute_floor_us']:.0f}us"
            )
            if device == "cuda":
                torch.cuda.empty_cache()
    doc = {
        "benchmark": "moe_kernel",
        "device": device,
        "shape": shape,
        "environment": environment(device),
        "floors": floors,
        "protocol": {
            "rounds": rounds,
            "skew": skew,
            "weight_copies": copies,
            "routings_rotated": copies + 1 if copies > 1 else 4,
            "floors": "per row, the median of one probe per round beside the timings"
            if probe is not None
            else "once, at the start (the best of three probes)",
        },
        "results": results,
    }
    if device == "cuda" and graphs:
        doc["protocol"]["graph"] = GRAPH_PROTOCOL
        doc["targets"] = target_summary(doc)
    return doc


__all__ = [
    "HF_IMPLS",
    "SHAPES",
    "TOKENS",
    "bench_experts",
    "environment",
    "floor_probe",
    "make_routing",
    "measure_floors",
    "route_thresholds",
]


SWEEP = {
    16: [
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 5},
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3},
    ],
    128: [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    ],
}


def sweep_sorted(tokens: tuple[int, ...] = (128, 4096, 16384), rounds: int = 3) -> list[dict]:
    """GPU: time the Triton grouped GEMM's launch configurations at a few sizes (OLMoE shapes, bf16).

    Example:
        >>> sweep_sorted((128,))  # doctest: +SKIP
    """
    from ffnkit.kernels import moe_triton

    shape = SHAPES["cuda"]
    d, e, k = shape["hidden"], shape["experts"], shape["top_k"]
    m = _experts_module(shape, "cuda", torch.bfloat16, 0)
    out = []
    saved = dict(moe_triton.CONFIGS["sorted"])
    try:
        for t in tokens:
            cls = 16 if t * k / e <= 16 else 128
            x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
            routing = [make_routing(t, e, k, 1.0, "cuda", r) for r in range(4)]
            for cfg in SWEEP[cls]:
                moe_triton.CONFIGS["sorted"] = {key: cfg for key in saved}
                fn = moe_triton.ROUTES["sorted"]

                def call(i: int, x=x, routing=routing, fn=fn) -> object:
                    return fn(x, m.gate_up_proj, m.down_proj, *routing[i % 4], "silu")

                try:
                    with torch.no_grad():
                        _time_calls(call, 2, "cuda")
                        us = (
                            min(_time_calls(call, 5 if t >= 4096 else 30, "cuda") for _ in range(rounds))
                            * 1e6
                        )
                    out.append({"tokens": t, "config": cfg, "us": us})
                except Exception as err:  # a config that does not fit (shared memory) is recorded, not fatal
                    out.append(
                        {"tokens": t, "config": cfg, "error": f"{type(err).__name__}: {str(err)[:200]}"}
                    )
    finally:
        moe_triton.CONFIGS["sorted"] = saved
    return out


def route_thresholds(times: dict[int, dict[str, float]], k: int) -> dict[str, int]:
    """The Triton executor's route thresholds (pairs = tokens x K) from per-size route timings.

    ``times[tokens][route]`` in any unit. ``gather_max_pairs``: the largest size where gather is fastest;
    ``tma_min_pairs``: from the largest size down, as long as ``tma`` beats every other route;
    ``grouped_mm_min_pairs``: from the largest size down, as long as ``grouped_mm`` beats every Triton
    route but ``tma`` (it runs where ``tma`` cannot); ``fused_min_pairs``: below that, from the largest size
    down, as long as ``fused_grouped_mm`` beats ``sorted`` (else equal to ``grouped_mm_min_pairs``: the
    fused route is never taken). A route never measured is never taken.

    Example:
        >>> route_thresholds({1: {"gather": 1, "sorted": 2}, 512: {"gather": 9, "sorted": 3, "grouped_mm": 2}}, 8)
        {'gather_max_pairs': 8, 'tma_min_pairs': 4611686018427387904, 'grouped_mm_min_pairs': 4096, 'fused_min_pairs': 4096}
    """
    never = 1 << 62
    gather_max = 0
    for t, tt in times.items():
        if "gather" in tt and tt["gather"] <= min(tt.values()):
            gather_max = max(gather_max, t * k)

    def from_top(route: str, rivals: tuple[str, ...]) -> int:
        first = never
        for t in sorted(times, reverse=True):
            tt = times[t]
            if route in tt and all(tt[route] < tt[n] for n in rivals if n in tt):
                first = t * k
            else:
                break
        return first

    tma_min = from_top("tma", ("gather", "sorted", "grouped_mm", "fused_grouped_mm"))
    grouped_min = from_top("grouped_mm", ("sorted", "fused_grouped_mm"))
    fused_min = grouped_min
    for t in sorted((t for t in times if t * k < grouped_min), reverse=True):
        tt = times[t]
        if "fused_grouped_mm" in tt and tt["fused_grouped_mm"] < tt.get("sorted", float("inf")):
            fused_min = t * k
        else:
            break
    return {
        "gather_max_pairs": gather_max,
        "tma_min_pairs": tma_min,
        "grouped_mm_min_pairs": grouped_min,
        "fused_min_pairs": fused_min,
    }


def calibrate(tokens: tuple[int, ...] | None = None, rounds: int = 3) -> dict:
    """GPU: pick the Triton route thresholds and grouped-GEMM configs from timings, and apply them.

    Runs :func:`sweep_sorted`, keeps the fastest config per size class, then times the three routes at each
    token count (uniform routing) and sets the thresholds of :func:`route_thresholds` in
    :data:`ffnkit.kernels.moe_triton.CONFIGS` so that each size takes its fastest route. Returns what it
    measured and chose (the values to commit as defaults).

    Example:
        >>> calibrate((1, 16))  # doctest: +SKIP
    """
    from ffnkit.kernels import moe_triton

    shape = SHAPES["cuda"]
    d, e, k = shape["hidden"], shape["experts"], shape["top_k"]
    tokens = tuple(tokens or TOKENS["cuda"])
    sweep = sweep_sorted()
    best: dict[int, tuple[float, dict]] = {}
    for cls, sizes in ((16, (128,)), (128, (4096, 16384))):
        totals: dict[str, float] = {}
        for r in sweep:
            if r["tokens"] in sizes and "us" in r:
                key = repr(sorted(r["config"].items()))
                totals[key] = totals.get(key, 0.0) + r["us"]
        if totals:
            key = min(totals, key=totals.get)
            cfg = next(r["config"] for r in sweep if repr(sorted(r["config"].items())) == key)
            best[cls] = (totals[key], cfg)
    cfgs = dict(moe_triton.CONFIGS["sorted"])
    if 16 in best:
        cfgs[16] = best[16][1]
    if 128 in best:
        cfgs[64] = cfgs[128] = best[128][1]
    moe_triton.CONFIGS["sorted"] = cfgs
    m = _experts_module(shape, "cuda", torch.bfloat16, 0)
    times: dict[int, dict[str, float]] = {}
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
            routing = [make_routing(t, e, k, 1.0, "cuda", 7 + r) for r in range(4)]
            times[t] = {}
            for name, fn in moe_triton.ROUTES.items():
                if name == "gather" and t * k > 1024:
                    continue

                def call(i: int, x=x, routing=routing, fn=fn) -> object:
                    return fn(x, m.gate_up_proj, m.down_proj, *routing[i % 4], "silu")

                try:
                    _time_calls(call, 2, "cuda")
                    n = 5 if t >= 4096 else 30
                    times[t][name] = 1e6 * min(_time_calls(call, n, "cuda") for _ in range(rounds))
                except Exception:  # noqa: BLE001 - a route that cannot run here is simply not chosen
                    continue
    chosen = route_thresholds(times, k)
    moe_triton.CONFIGS.update(chosen)
    return {
        "sweep_sorted": sweep,
        "route_us": times,
        "chosen": {
            **chosen,
            "sorted": {str(key): v for key, v in cfgs.items()},
        },
    }
