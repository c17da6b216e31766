"""CUDA-graph timing for the MoE benchmark: which implementations capture, their in-graph time, fair comparisons.

Decoding engines replay each decode step's MoE blocks from a CUDA graph, so launch overhead (Python, the
framework, the driver) is paid once per graph, not per kernel. :func:`graph_times` first runs each
implementation once with ``torch.cuda.set_sync_debug_mode("error")`` (a device->host sync such as
``.item()``, ``.tolist()``, ``nonzero`` or ``bincount`` raises there, and cannot be captured), then captures
the rest with :func:`ffnkit.kernels.benchmark.time_cuda` (one graph of ``calls`` calls per implementation,
replays timed with CUDA events; it also times the same calls launched eagerly). An implementation that
syncs or fails to capture is recorded as ``not capturable`` with the reason.

:func:`compare_like_for_like` compares ffnkit with each transformers implementation in one mode: graph
against graph where both capture, else eager against eager; :func:`target_summary` states the issue's GPU
targets (reached / missed) from a benchmark document.

Example:
    >>> from ffnkit.kernels.moe_graph import compare_like_for_like
    >>> row = {"us": {"eager": 900.0, "ffnkit": 300.0}, "graph_us": {"ffnkit": 40.0},
    ...        "capture": {"eager": "not capturable: sync", "ffnkit": "captured"}}
    >>> compare_like_for_like(row, ("eager",))["speedup"]
    3.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ffnkit.kernels.benchmark import time_cuda

CAPTURED = "captured"


def sync_free(fn: Callable[[int], object]) -> str | None:
    """None if ``fn(0)`` runs without a device->host sync, else the reason (the error's first line).

    Example:
        >>> sync_free(lambda i: torch.ones(2, device="cuda").sum().item())  # doctest: +SKIP
        'RuntimeError: called a synchronizing CUDA operation'
    """
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(0)
    except Exception as err:  # the sync (or anything else the call raised) is the reason
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return None


def graph_times(
    fns: dict[str, Callable[[int], object]], calls: dict[str, int], rounds: int, copies: int = 4
) -> tuple[dict[str, str], dict[str, dict]]:
    """Capture each of ``fns`` (fn(i) -> output, i rotating over ``copies`` inputs) and time it in a graph.

    Returns (capture status per name: ``captured`` or ``not capturable: <reason>``, timings per captured
    name: ``median_us`` / ``min_us`` in the graph and ``eager_median_us``, from ``time_cuda``).
    ``calls[name]`` calls go into one graph (at least ``copies``, so every input is used).

    Example:
        >>> status, t = graph_times({"f": lambda i: x @ w}, {"f": 20}, rounds=3)  # doctest: +SKIP
        >>> status["f"], t["f"]["median_us"] > 0  # doctest: +SKIP
        ('captured', True)
    """
    status: dict[str, str] = {}
    times: dict[str, dict] = {}
    for name, fn in fns.items():
        reason = sync_free(fn)
        if reason is not None:
            status[name] = f"not capturable: synchronizes with the host ({reason})"
            continue
        try:
            with torch.no_grad():
                times[name] = time_cuda({name: fn}, copies, rounds, max(copies, calls[name]))[name]
            status[name] = CAPTURED
        except Exception as err:  # a capture that fails is a result, recorded with its reason
            status[name] = f"not capturable: {type(err).__name__}: {str(err).strip()[:200]}"
            torch.cuda.synchronize()  # surfaces a broken context here rather than in the next timing
        torch.cuda.empty_cache()  # each graph's private memory pool goes with it
    return status, times


def compare_like_for_like(row: dict, hf_impls: tuple[str, ...]) -> dict:
    """ffnkit against each transformers implementation of ``row`` in one mode (graph if both captured).

    ``row`` holds ``us`` (eager times), ``graph_us`` (in-graph times) and ``capture`` (status per name).
    Returns per implementation the mode and both times, the best (fastest in its mode relative to ffnkit)
    implementation and ``speedup`` = its time / ffnkit's (> 1: ffnkit faster than transformers' best).

    Example:
        >>> r = {"us": {"grouped_mm": 900.0, "ffnkit": 300.0}, "graph_us": {"grouped_mm": 80.0, "ffnkit": 40.0},
        ...      "capture": {"grouped_mm": "captured", "ffnkit": "captured"}}
        >>> compare_like_for_like(r, ("grouped_mm",))["mode"]
        'graph'
    """
    graph = row.get("graph_us", {})
    per: dict[str, dict] = {}
    for name in hf_impls:
        if name not in row["us"] or "ffnkit" not in row["us"]:
            continue
        mode = "graph" if name in graph and "ffnkit" in graph else "eager"
        table = graph if mode == "graph" else row["us"]
        per[name] = {
            "mode": mode,
            "us": table[name],
            "ffnkit_us": table["ffnkit"],
            "speedup": table[name] / table["ffnkit"],
        }
    if not per:
        return {"per_implementation": per}
    best = min(per, key=lambda n: per[n]["speedup"])
    return {
        "per_implementation": per,
        "best": best,
        **{k: per[best][k] for k in ("mode", "us", "ffnkit_us", "speedup")},
    }


def target_summary(doc: dict, bandwidth_max: float = 3.0, compute_max: float = 1.3) -> list[dict]:
    """The issue's GPU targets per (routing, tokens): faster than transformers' best (like for like),
    ffnkit in a graph within ``bandwidth_max`` x the bandwidth floor up to 128 tokens, and within
    ``compute_max`` x the compute floor from 4,096 tokens (graph time where ffnkit captured, else eager).

    Example:
        >>> target_summary({"results": []})
        []
    """
    out = []
    for row in doc.get("results", []):
        t = row["tokens"]
        us = row.get("graph_us", {}).get("ffnkit", row["us"].get("ffnkit"))
        mode = "graph" if "ffnkit" in row.get("graph_us", {}) else "eager"
        entry: dict = {"routing": row["routing"], "tokens": t, "ffnkit_mode": mode, "ffnkit_us": us}
        cmp = row.get("like_for_like", {})
        if "speedup" in cmp:
            entry["faster_than_transformers_best"] = {
                "speedup": round(cmp["speedup"], 3),
                "mode": cmp["mode"],
                "best": cmp["best"],
                "reached": cmp["speedup"] > 1.0,
            }
        if us is not None and t <= 128:
            r = us / row["bandwidth_floor_us"]
            entry["bandwidth_floor"] = {
                "ratio": round(r, 3),
                "target": bandwidth_max,
                "reached": r <= bandwidth_max,
            }
        if us is not None and t >= 4096:
            r = us / row["compute_floor_us"]
            entry["compute_floor"] = {
                "ratio": round(r, 3),
                "target": compute_max,
                "reached": r <= compute_max,
            }
        out.append(entry)
    return out


GATHER_SWEEP = {
    "gather": [
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4},
        {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4},
        {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4},
        {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4},
        {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8},
        {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 8},
    ],
    "gather_down": [
        {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4},
        {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4},
        {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 4},
        {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 8},
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4},
        {"BLOCK_N": 2, "BLOCK_K": 512, "num_warps": 2},
    ],
}


def calibrate_gather(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    routings: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    rounds: int = 3,
    calls: int = 40,
) -> dict:
    """GPU: time the decode (gather) route's launch configs in CUDA graphs; keep and apply the fastest.

    One kernel's config at a time (``gather`` = gate/up, then ``gather_down`` = down + combine, the other
    held at its current value), scored by the summed in-graph time over ``routings`` (tokens -> routings
    rotated). Sets :data:`ffnkit.kernels.moe_triton.CONFIGS` to the winners and returns every timing.

    Example:
        >>> calibrate_gather(gu, dn, {1: [make_routing(1, 64, 8, 1.0, "cuda", 0)]})  # doctest: +SKIP
    """
    from ffnkit.kernels import moe_triton

    fn = moe_triton.ROUTES["gather"]
    xs = {t: torch.randn(t, gate_up.shape[2], device=gate_up.device, dtype=gate_up.dtype) for t in routings}
    timings: list[dict] = []
    for key, candidates in GATHER_SWEEP.items():
        kept = dict(moe_triton.CONFIGS[key])
        scores: list[tuple[float, dict]] = []
        for cfg in candidates:
            moe_triton.CONFIGS[key] = dict(cfg)
            total, entry = 0.0, {"kernel": key, "config": cfg, "us": {}}
            try:
                for t, rs in routings.items():

                    def call(i: int, t=t, rs=rs) -> object:
                        return fn(xs[t], gate_up, down, *rs[i % len(rs)], "silu")

                    with torch.no_grad():
                        us = time_cuda({"g": call}, len(rs), rounds, calls)["g"]["median_us"]
                    entry["us"][t] = us
                    total += us
                scores.append((total, cfg))
            except Exception as err:  # a config that does not compile or fit is recorded, not fatal
                entry["error"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
            timings.append(entry)
        moe_triton.CONFIGS[key] = dict(min(scores, key=lambda s: s[0])[1]) if scores else kept
    return {
        "timings": timings,
        "chosen": {k: moe_triton.CONFIGS[k] for k in GATHER_SWEEP},
    }


__all__ = [
    "CAPTURED",
    "GATHER_SWEEP",
    "calibrate_gather",
    "compare_like_for_like",
    "graph_times",
    "prefill_breakdown",
    "sync_free",
    "target_summary",
]


def prefill_breakdown(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    rounds: int = 3,
    calls: int = 4,
) -> dict[str, object]:
    """GPU: where the large-batch route's time goes, each stage alone in a CUDA graph (median us per call).

    Stages of the ``grouped_mm`` route as ffnkit runs them (:mod:`ffnkit.kernels.moe_stream`): ``sort``
    (the device counting sort), ``permute`` (x's rows scattered to their sorted rows), ``gemm_gate_up`` and
    ``gemm_down`` (torch's grouped GEMM), ``act`` (act(gate) * up), ``combine`` (rows back in token order,
    weighted sum over K); the same stages written with public torch ops as ``*_torch`` (``sort_pairs`` +
    cumsum, ``index_select``, ``silu(g) * u``, gather + weighted sum) for comparison; and every prefill
    route whole (``route_<name>``).

    Example:
        >>> prefill_breakdown(gu, dn, idx, w)["gemm_gate_up"]  # doctest: +SKIP
    """
    from ffnkit.kernels import moe_stream, moe_triton
    from ffnkit.kernels.moe import sort_pairs

    e, f2, d = gate_up.shape
    f = f2 // 2
    t, k = top_k_index.shape
    x = torch.randn(t, d, device=gate_up.device, dtype=gate_up.dtype)  # [T, D]
    gmm = moe_triton.grouped_gemm
    order, pos, counts, offs = moe_stream.sort_by_expert(top_k_index, e)
    xs = moe_stream.scatter_rows(x, pos, k)  # [S, D]
    gu = gmm(xs, gate_up.transpose(1, 2), offs)  # [S, 2F]
    h = moe_stream.act_mul(gu, 0)  # [S, F]
    y = gmm(h, down.transpose(1, 2), offs)  # [S, D]
    wf = top_k_weights.to(y.dtype).unsqueeze(-1)  # [T, K, 1]

    def sort_torch(i: int) -> object:
        o, p, c = sort_pairs(top_k_index, e)
        return torch.cumsum(c[:e], 0, dtype=torch.int32)

    stages = {
        "sort": lambda i: moe_stream.sort_by_expert(top_k_index, e),
        "sort_torch": sort_torch,
        "permute": lambda i: moe_stream.scatter_rows(x, pos, k),
        "permute_torch": lambda i: x.index_select(0, order // k),
        "gemm_gate_up": lambda i: gmm(xs, gate_up.transpose(1, 2), offs),
        "act": lambda i: moe_stream.act_mul(gu, 0),
        "act_torch": lambda i: torch.nn.functional.silu(gu[:, :f]) * gu[:, f:],
        "gemm_down": lambda i: gmm(h, down.transpose(1, 2), offs),
        "combine": lambda i: moe_stream.combine_rows(y, pos, top_k_index, top_k_weights, e),
        "combine_torch": lambda i: (y.index_select(0, pos).view(t, k, d) * wf).sum(1),
    }
    for name in moe_triton.ROUTES:
        if name == "gather":
            continue
        route = moe_triton.ROUTES[name]
        stages[f"route_{name}"] = lambda i, route=route: route(x, gate_up, down, top_k_index, top_k_weights)
    out: dict[str, object] = {}
    for name, fn in stages.items():
        try:
            with torch.no_grad():
                out[name] = time_cuda({name: fn}, 1, rounds, calls)[name]["median_us"]
        except Exception as err:  # one stage that cannot be timed leaves the others
            out[name] = float("nan")
            out[f"{name}_error"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
        torch.cuda.empty_cache()
    return out
