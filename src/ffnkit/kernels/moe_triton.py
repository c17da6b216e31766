"""The ``triton`` expert executor (imported only when a CUDA tensor takes this path).

Five routes, picked by the number of token-expert pairs S = T x K (:data:`CONFIGS`):

1. ``gather`` (decode, S <= ``gather_max_pairs``; in CUDA graphs the sorted route wins from 16 tokens): no sort. ``_gate_up_gather_kernel`` gives each pair
   and block of F output columns one program that streams the expert's gate and up rows (CUDA cores,
   float32 accumulation) and writes h = act(gate) * up; ``_down_gather_combine_kernel`` streams the down
   rows of each token's K experts and sums them with the router weights in the same pass (two launches in
   all: at one token the call is bound by launch overhead as much as by the ~100 MB of weights). Only the
   selected experts' weights are read.
2. ``sorted`` (the Triton grouped GEMM): a counting sort of the pairs on the device
   (:func:`ffnkit.kernels.moe_stream.sort_by_expert`); each program of ``_gate_up_sorted_kernel`` finds its
   expert and row block from the per-expert counts (a cumulative sum over E in registers: no host sync, no
   padding buffers), gathers its tokens' rows of x, and multiplies them with the expert's gate and up tiles
   through ``tl.dot`` into two accumulators, so act(gate) * up is fused and only h is written.
   ``_down_sorted_kernel`` is the same over the down weights; :func:`~ffnkit.kernels.moe_stream.combine_rows`
   puts the rows back in token order with the weights.
3. ``grouped_mm`` (large S, where cuBLAS/CUTLASS grouped GEMMs win): ``torch._grouped_mm`` (or
   ``torch.nn.functional.grouped_mm``) over the sorted rows, with the stream kernels of
   :mod:`ffnkit.kernels.moe_stream` (scatter rows, act-mul, combine) around it.
4. ``fused_grouped_mm``: ``_gate_up_sorted_kernel`` for the first GEMM (gather prologue, activation
   epilogue: neither the permuted x nor the [S, 2F] product is written), torch's grouped GEMM for the down
   projection, then the combine (from ``fused_min_pairs`` to below ``grouped_mm_min_pairs``).
5. ``tma`` (sm90+, from ``tma_min_pairs``; :mod:`ffnkit.kernels.moe_tma`): persistent grouped GEMMs that
   load the weights by TMA, the first with the gather and the activation fused, the second feeding the
   combine; it takes precedence over 3 and 4 wherever its tiles divide the expert shapes.

Index E (no expert) sorts last and is never computed; the combine kernel skips it. h keeps x's dtype.

Example:
    >>> import torch  # doctest: +SKIP
    >>> from ffnkit.kernels.moe import experts_forward
    >>> gu = torch.randn(8, 64, 32, device="cuda"); dn = torch.randn(8, 32, 32, device="cuda")
    >>> idx = torch.randint(0, 8, (4, 2), device="cuda")
    >>> experts_forward(torch.randn(4, 32, device="cuda"), gu, dn, idx, torch.rand(4, 2, device="cuda"))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffnkit.kernels.moe_stream import act_mul, combine_rows, expert_of_block, scatter_rows, sort_by_expert
from ffnkit.kernels.moe_tma import tma_experts, tma_supported
from ffnkit.kernels.triton_sparse_ffn import ACT_CODES, apply_act  # one activation for every Triton kernel

# Route thresholds (pairs S = tokens x K) and launch parameters; "sorted" configs are keyed by the mean rows
# per expert (S / E) class. Chosen on an H200 (benchmarks/moe_kernel.py, OLMoE shapes, bf16).
CONFIGS: dict[str, object] = {
    # In CUDA graphs with the counting sort (benchmarks/results/moe_prefill_sweep_h200.json, uniform and
    # skewed): gather fastest at 1 token (42 vs 50 us), sorted at 16 (187 vs 270) and 128 tokens (245 vs
    # 284), fused_grouped_mm at 1,024 (375 vs 383), grouped_mm at 4,096 (901 vs 906) and 16,384 (3089 vs 3237).
    "gather_max_pairs": 8,
    # the tma route: faster than every other route at 1,024, 4,096 and 16,384 tokens, uniform and skewed, in
    # CUDA graphs (benchmarks/results/moe_kernel_h200_tma.json); in a later check 3% slower than grouped_mm at
    # 16,384 tokens with skewed routing, faster in the other three rows (moe_tma_sweep_h200_check.json)
    "tma_min_pairs": 8192,
    "fused_min_pairs": 8192,
    "grouped_mm_min_pairs": 32768,
    "gather": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4},
    # down + combine: 4 rows per program (2x the programs of 8) measured fastest over 1 + 16 tokens in CUDA
    # graphs (benchmarks/results/moe_kernel_h200_graph.json, gather_calibration: 40 vs 47 us at 1 token)
    "gather_down": {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4},
    "sorted": {
        16: {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
        32: {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
        64: {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        128: {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    },
    # fused_grouped_mm's Triton gate/up GEMM (gather prologue, activation epilogue): fastest of 9 configs
    # summed over 128, 4,096 and 16,384 tokens (the sweep above)
    "fused_gate_up": {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "num_warps": 8,
        "num_stages": 3,
        "N_FIRST": True,
    },
}
# Shared memory per block on an H100/H200 (232,448 bytes); float32 tiles take twice the bytes of bf16 ones.
SHARED_MEMORY = 232448


# ------------------------------------------------------------------------------------------ decode: gather


@triton.jit
def _gate_up_gather_kernel(x_ptr, w_ptr, idx_ptr, h_ptr, E, F, D, K: tl.constexpr, ACT: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """h[p, n] = act(<gate row n of expert idx[p], x[p // K]>) * <up row n, x>, one pair per program row."""
    p = tl.program_id(0)
    e = tl.load(idx_ptr + p).to(tl.int64)
    if e < E:
        t = p // K
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mn = offs_n < F
        base = w_ptr + e * 2 * F * D
        acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)  # [BK]
            mk = ok < D
            xv = tl.load(x_ptr + t * D + ok, mask=mk, other=0.0).to(tl.float32)  # [BK]
            m2 = mn[:, None] & mk[None, :]
            wg = tl.load(base + offs_n[:, None].to(tl.int64) * D + ok[None, :], mask=m2, other=0.0)
            wu = tl.load(base + (offs_n[:, None].to(tl.int64) + F) * D + ok[None, :], mask=m2, other=0.0)
            acc_g += tl.sum(wg.to(tl.float32) * xv[None, :], axis=1)
            acc_u += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
        h = apply_act(acc_g, ACT) * acc_u
        tl.store(h_ptr + p.to(tl.int64) * F + offs_n, h.to(h_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _down_gather_combine_kernel(h_ptr, w_ptr, idx_ptr, wt_ptr, out_ptr, E, F, D, K: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """out[t, n] = sum_k w[t, k] <down row n of expert idx[t, k], h[t*K + k]>: down and combine in one pass."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of down (hidden dims)
    mn = offs_n < D
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kk in tl.static_range(K):
        p = t * K + kk
        e = tl.load(idx_ptr + p).to(tl.int64)
        if e < E:
            wt = tl.load(wt_ptr + p).to(tl.float32)
            base = w_ptr + e * D * F
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, F, BLOCK_K):
                ok = k0 + tl.arange(0, BLOCK_K)
                mk = ok < F
                hv = tl.load(h_ptr + p * F + ok, mask=mk, other=0.0).to(tl.float32)  # [BK]
                wd = tl.load(base + offs_n[:, None].to(tl.int64) * F + ok[None, :],
                             mask=mn[:, None] & mk[None, :], other=0.0)  # fmt: skip
                part += tl.sum(wd.to(tl.float32) * hv[None, :], axis=1)
            acc += wt * part
    tl.store(out_ptr + t * D + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mn)


# ------------------------------------------------------------------------------- prefill: sorted grouped


@triton.jit
def _gate_up_sorted_kernel(x_ptr, w_ptr, order_ptr, counts_ptr, h_ptr, E, F, D, K: tl.constexpr,
                           ACT: tl.constexpr, E_PAD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_FIRST: tl.constexpr = False):  # fmt: skip
    """h[r, n] = act(x[tok r] . gate_e[n]) * (x[tok r] . up_e[n]) for a block of sorted rows r of expert e.

    Grid (row blocks, column blocks), or (column blocks, row blocks) with ``N_FIRST``: then the programs
    that run together share one row block (its gathered x rows stay in L2) and one expert's weights.
    """
    if N_FIRST:
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    e, row0, row_stop, n_e = expert_of_block(pid_m, counts_ptr, E, BLOCK_M, E_PAD)
    if e < E:
        rows = row0 + tl.arange(0, BLOCK_M)  # [BM] sorted positions
        mr = rows < row_stop
        tok = tl.load(order_ptr + rows, mask=mr, other=0) // K  # [BM] token of each row
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < F
        ok = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None].to(tl.int64) * D + ok[None, :]  # [BM, BK]
        wg_ptrs = (
            w_ptr + e.to(tl.int64) * 2 * F * D + offs_n[None, :].to(tl.int64) * D + ok[:, None]
        )  # [BK, BN]
        wu_ptrs = wg_ptrs + F * D
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            mk = (k0 + ok) < D
            a = tl.load(a_ptrs, mask=mr[:, None] & mk[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=mk[:, None] & mn[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=mk[:, None] & mn[None, :], other=0.0)
            if IEEE:
                acc_g += tl.dot(a, wg, input_precision="ieee")
                acc_u += tl.dot(a, wu, input_precision="ieee")
            else:
                acc_g += tl.dot(a, wg)
                acc_u += tl.dot(a, wu)
            a_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K
        h = apply_act(acc_g, ACT) * acc_u
        out = h_ptr + rows[:, None].to(tl.int64) * F + offs_n[None, :]
        tl.store(out, h.to(h_ptr.dtype.element_ty), mask=mr[:, None] & mn[None, :])


@triton.jit
def _down_sorted_kernel(h_ptr, w_ptr, counts_ptr, y_ptr, E, F, D, E_PAD: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """y[r, n] = h[r] . down_e[n] for a block of sorted rows r of expert e (unweighted)."""
    e, row0, row_stop, n_e = expert_of_block(tl.program_id(0), counts_ptr, E, BLOCK_M, E_PAD)
    if e < E:
        rows = row0 + tl.arange(0, BLOCK_M)
        mr = rows < row_stop
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < D
        ok = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + rows[:, None].to(tl.int64) * F + ok[None, :]  # [BM, BK]
        w_ptrs = w_ptr + e.to(tl.int64) * D * F + offs_n[None, :].to(tl.int64) * F + ok[:, None]  # [BK, BN]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            mk = (k0 + ok) < F
            a = tl.load(a_ptrs, mask=mr[:, None] & mk[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=mk[:, None] & mn[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out = y_ptr + rows[:, None].to(tl.int64) * D + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mr[:, None] & mn[None, :])


# --------------------------------------------------------------------------------------------- host side


def gather_experts(
    x: Tensor, gate_up: Tensor, down: Tensor, idx: Tensor, w: Tensor, act: str = "silu"
) -> Tensor:
    """Decode route: per-pair gather kernels, no sort (see the module docstring).

    Example:
        >>> gather_experts(x, gate_up, down, idx, w)  # doctest: +SKIP
    """
    e, f2, d = gate_up.shape
    f = f2 // 2
    t, k = idx.shape
    s = t * k
    idx_f = idx.reshape(-1).contiguous()
    c = CONFIGS["gather"]
    h = torch.empty(s, f, dtype=x.dtype, device=x.device)  # [S, F]
    _gate_up_gather_kernel[(s, triton.cdiv(f, c["BLOCK_N"]))](
        x, gate_up, idx_f, h, e, f, d, K=k, ACT=ACT_CODES[act], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
        num_warps=c["num_warps"],
    )  # fmt: skip
    cd = CONFIGS["gather_down"]
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)  # [T, D]
    _down_gather_combine_kernel[(t, triton.cdiv(d, cd["BLOCK_N"]))](
        h, down, idx_f, w.reshape(-1).contiguous(), out, e, f, d, K=k, BLOCK_N=cd["BLOCK_N"],
        BLOCK_K=cd["BLOCK_K"], num_warps=cd["num_warps"],
    )  # fmt: skip
    return out


def _sorted_config(s: int, e: int, itemsize: int) -> dict:
    """The launch config for S pairs over E experts; K-tiles halved until the stages fit in shared memory."""
    per_expert = s / max(e, 1)
    key = next((c for c in sorted(CONFIGS["sorted"]) if per_expert <= c), max(CONFIGS["sorted"]))
    c = dict(CONFIGS["sorted"][key])
    # gate_up kernel: an x tile [BM, BK] and two weight tiles [BK, BN] per stage
    while (c["BLOCK_M"] + 2 * c["BLOCK_N"]) * c["BLOCK_K"] * itemsize * c["num_stages"] > SHARED_MEMORY:
        if c["BLOCK_K"] > 32:
            c["BLOCK_K"] //= 2
        elif c["num_stages"] > 2:
            c["num_stages"] -= 1
        else:
            break
    return c


def sorted_experts(
    x: Tensor, gate_up: Tensor, down: Tensor, idx: Tensor, w: Tensor, act: str = "silu"
) -> Tensor:
    """Prefill route: sort by expert, the Triton grouped GEMM with the activation fused, combine.

    Example:
        >>> sorted_experts(x, gate_up, down, idx, w)  # doctest: +SKIP
    """
    e, f2, d = gate_up.shape
    f = f2 // 2
    t, k = idx.shape
    s = t * k
    order, pos, counts, _ = sort_by_expert(idx, e)
    c = _sorted_config(s, e, x.element_size())
    bm = c["BLOCK_M"]
    max_blocks = triton.cdiv(s, bm) + min(e, s)  # upper bound: one partial block per expert
    e_pad = triton.next_power_of_2(e)
    ieee = x.dtype == torch.float32
    meta = dict(BLOCK_M=bm, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], num_warps=c["num_warps"],
                num_stages=c["num_stages"])  # fmt: skip
    h = torch.empty(s, f, dtype=x.dtype, device=x.device)  # [S, F] rows in sorted order
    _gate_up_sorted_kernel[(max_blocks, triton.cdiv(f, c["BLOCK_N"]))](
        x, gate_up, order, counts, h, e, f, d, K=k, ACT=ACT_CODES[act], E_PAD=e_pad, IEEE=ieee, **meta
    )
    y = torch.empty(s, d, dtype=x.dtype, device=x.device)  # [S, D] sorted order
    _down_sorted_kernel[(max_blocks, triton.cdiv(d, c["BLOCK_N"]))](
        h, down, counts, y, e, f, d, E_PAD=e_pad, IEEE=ieee, **meta
    )
    return combine_rows(y, pos, idx, w, e)


def grouped_gemm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """Torch's grouped GEMM (``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm`` before it):
    rows ``offs[i-1]:offs[i]`` of ``a`` times ``b[i]``.

    Example:
        >>> y = grouped_gemm(xs, gate_up.transpose(1, 2), ends)  # doctest: +SKIP
    """
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def grouped_mm_available(x: Tensor) -> bool:
    """True when torch's grouped GEMM runs here (bf16 on a CUDA device of compute capability >= 9.0).

    Example:
        >>> grouped_mm_available(torch.zeros(1))
        False
    """
    has = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    return bool(
        has and x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def grouped_mm_experts(
    x: Tensor, gate_up: Tensor, down: Tensor, idx: Tensor, w: Tensor, act: str = "silu"
) -> Tensor:
    """Large-batch route: torch's grouped GEMMs over the sorted rows, the stream kernels in between.

    Counting sort, x's rows scattered to their sorted rows, grouped GEMM, act(gate) * up, grouped GEMM,
    combine (:mod:`ffnkit.kernels.moe_stream`).

    Example:
        >>> grouped_mm_experts(x, gate_up, down, idx, w)  # doctest: +SKIP
    """
    e = gate_up.shape[0]
    k = idx.shape[1]
    order, pos, counts, ends = sort_by_expert(idx, e)
    xs = scatter_rows(x, pos, k)  # [S, D] sorted order
    gu = grouped_gemm(xs, gate_up.transpose(1, 2), ends)  # [S, 2F]; rows past ends[-1] left unset
    h = act_mul(gu, ACT_CODES[act])  # [S, F]
    y = grouped_gemm(h, down.transpose(1, 2), ends)  # [S, D]
    return combine_rows(y, pos, idx, w, e)


def fused_grouped_mm_experts(
    x: Tensor, gate_up: Tensor, down: Tensor, idx: Tensor, w: Tensor, act: str = "silu"
) -> Tensor:
    """Large-batch route with the first GEMM in Triton: gather + gate/up + activation in one kernel.

    ``_gate_up_sorted_kernel`` reads x's rows by token id (no permuted copy of x) and writes only
    h = act(gate) * up (no [S, 2F] intermediate); torch's grouped GEMM does the down projection; combine.

    Example:
        >>> fused_grouped_mm_experts(x, gate_up, down, idx, w)  # doctest: +SKIP
    """
    e, f2, d = gate_up.shape
    f = f2 // 2
    t, k = idx.shape
    s = t * k
    order, pos, counts, ends = sort_by_expert(idx, e)
    c = dict(CONFIGS["fused_gate_up"])
    bm = c.pop("BLOCK_M")
    max_blocks = triton.cdiv(s, bm) + min(e, s)
    n_blocks = triton.cdiv(f, c["BLOCK_N"])
    c["N_FIRST"] = bool(c.get("N_FIRST")) and max_blocks < 65536  # grid's second axis: at most 65,535
    grid = (n_blocks, max_blocks) if c["N_FIRST"] else (max_blocks, n_blocks)
    h = torch.empty(s, f, dtype=x.dtype, device=x.device)  # [S, F] sorted order
    _gate_up_sorted_kernel[grid](
        x, gate_up, order, counts, h, e, f, d, K=k, ACT=ACT_CODES[act], E_PAD=triton.next_power_of_2(e),
        IEEE=x.dtype == torch.float32, BLOCK_M=bm, **c,
    )  # fmt: skip
    y = grouped_gemm(h, down.transpose(1, 2), ends)  # [S, D]
    return combine_rows(y, pos, idx, w, e)


def experts_forward(
    x: Tensor, gate_up: Tensor, down: Tensor, top_k_index: Tensor, top_k_weights: Tensor, act: str = "silu"
) -> Tensor:
    """The ``triton`` backend of :func:`ffnkit.kernels.moe.experts_forward` (route by pair count).

    Example:
        >>> experts_forward(x, gate_up, down, idx, w)  # doctest: +SKIP
    """
    x = x.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    s = top_k_index.numel()
    if s <= CONFIGS["gather_max_pairs"]:
        return gather_experts(x, gate_up, down, top_k_index, top_k_weights, act)
    if s >= CONFIGS["tma_min_pairs"] and tma_supported(x, gate_up):
        return tma_experts(x, gate_up, down, top_k_index, top_k_weights, act)
    if s >= CONFIGS["fused_min_pairs"] and grouped_mm_available(x):
        route = grouped_mm_experts if s >= CONFIGS["grouped_mm_min_pairs"] else fused_grouped_mm_experts
        return route(x, gate_up, down, top_k_index, top_k_weights, act)
    return sorted_experts(x, gate_up, down, top_k_index, top_k_weights, act)


ROUTES = {
    "gather": gather_experts,
    "sorted": sorted_experts,
    "grouped_mm": grouped_mm_experts,
    "fused_grouped_mm": fused_grouped_mm_experts,
    "tma": tma_experts,
}

__all__ = ["CONFIGS", "ROUTES", "experts_forward", "grouped_gemm", "grouped_mm_available"]
