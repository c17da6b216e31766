"""The bandwidth-bound stages of the MoE prefill routes as Triton kernels (sort, permute, act-mul, combine).

Between its two grouped GEMMs the prefill route moves rows: it groups the S = T x K token-expert pairs by
expert, copies each token's row of x to its K sorted rows, applies act(gate) * up to the [S, 2F] GEMM output
and finally sums each token's K output rows with the router weights. Each stage here is one or two kernel
launches, runs without a device->host sync (CUDA-graph capturable) and streams its rows in wide tiles:

- :func:`sort_by_expert`: a counting sort (per-block histograms over E+1 buckets, then one pass that ranks
  every pair inside its bucket through a cumulative sum of one-hot rows); stable, no-expert pairs (index E)
  last; also writes the per-expert end rows ``ends`` [E] int32 that ``torch._grouped_mm`` takes as offsets.
- :func:`scatter_rows`: reads each token's row once and writes it to its K sorted rows (no index_select).
- :func:`act_mul`: h = act(gu[:, :F]) * gu[:, F:] over [rows, columns] tiles.
- :func:`combine_rows`: out[t] = sum_k w[t, k] * y[pos[t, k]] in float32, a gather by the inverse
  permutation (no atomics: each output element is written once, so the result is deterministic).

Launch parameters live in :data:`STREAM_CONFIGS` (benchmarks/moe_prefill_sweep.py measures them).

Example:
    >>> import torch  # doctest: +SKIP
    >>> from ffnkit.kernels.moe_stream import sort_by_expert
    >>> order, pos, counts, ends = sort_by_expert(torch.tensor([[2, 0], [0, 3]], device="cuda"), 3)
    >>> order.tolist(), pos.tolist(), counts.tolist(), ends.tolist()  # doctest: +SKIP
    ([1, 2, 0, 3], [2, 0, 1, 3], [2, 0, 1, 1], [2, 2, 3])
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffnkit.kernels.triton_sparse_ffn import apply_act

# Launch parameters of the stream kernels (tiles: rows x columns; the sort: pairs per program and per step,
# BLOCK doubled until at most MAX_PROGRAMS programs: each program sums all earlier blocks' histograms).
# The fastest of 4-5 candidates each, summed over 128, 4,096 and 16,384 tokens on an H200 (OLMoE shapes,
# benchmarks/results/moe_prefill_sweep_h200.json): at 16,384 tokens sort 54-65 us (torch 118), scatter 166
# (index_select 267), act 185 (silu(g) * u 711), combine 146 (gather + sum 1173).
STREAM_CONFIGS: dict[str, dict[str, int]] = {
    "sort": {"BLOCK": 256, "SUB": 64, "num_warps": 4, "MAX_PROGRAMS": 256},
    "scatter": {"BLOCK_T": 1, "BLOCK_D": 2048, "num_warps": 8},
    "act": {"BLOCK_R": 1, "BLOCK_N": 1024, "num_warps": 4},
    "combine": {"BLOCK_T": 2, "BLOCK_D": 1024, "num_warps": 4},
}


@triton.jit
def _histogram_kernel(idx_ptr, hist_ptr, S, E1P: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr):
    """hist[b, e] = number of pairs of block b (BLOCK pairs) routed to bucket e (E = no expert)."""
    b = tl.program_id(0)
    cols = tl.arange(0, E1P)
    acc = tl.zeros([E1P], dtype=tl.int32)
    for c in range(0, BLOCK, SUB):
        p = b * BLOCK + c + tl.arange(0, SUB)  # [SUB]
        keys = tl.load(idx_ptr + p, mask=p < S, other=-1).to(tl.int32)
        acc += tl.sum((keys[:, None] == cols[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + b * E1P + cols, acc)


@triton.jit
def _rank_scatter_kernel(idx_ptr, hist_ptr, order_ptr, pos_ptr, counts_ptr, ends_ptr, S, NB, E,
                         E1P: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, NBC: tl.constexpr):  # fmt: skip
    """pos[p] = start of p's bucket + pairs of that bucket in earlier blocks + rank inside this block."""
    b = tl.program_id(0)
    cols = tl.arange(0, E1P)
    total = tl.zeros([E1P], dtype=tl.int32)
    before = tl.zeros([E1P], dtype=tl.int32)
    for j in range(0, NB, NBC):
        r = j + tl.arange(0, NBC)  # [NBC] block ids
        h = tl.load(hist_ptr + r[:, None] * E1P + cols[None, :], mask=(r < NB)[:, None], other=0)
        total += tl.sum(h, axis=0)
        before += tl.sum(tl.where((r < b)[:, None], h, 0), axis=0)
    end = tl.cumsum(total, axis=0)  # [E1P] inclusive end row of each bucket
    if b == 0:
        tl.store(counts_ptr + cols, total.to(tl.int64), mask=cols <= E)
        tl.store(ends_ptr + cols, end, mask=cols < E)
    base = end - total + before  # [E1P] first row of this block's pairs in each bucket
    for c in range(0, BLOCK, SUB):
        p = b * BLOCK + c + tl.arange(0, SUB)  # [SUB]
        mp = p < S
        keys = tl.load(idx_ptr + p, mask=mp, other=-1).to(tl.int32)
        hit = (keys[:, None] == cols[None, :]).to(tl.int32)  # [SUB, E1P] one-hot
        incl = tl.cumsum(hit, axis=0)  # [SUB, E1P] rank + 1 among this step's pairs of each bucket
        dest = tl.sum(hit * (incl - 1 + base[None, :]), axis=1)  # [SUB]
        ok = mp & (keys >= 0) & (keys <= E)  # an index outside [0, E] is dropped, never written anywhere
        tl.store(pos_ptr + p, dest.to(tl.int64), mask=ok)
        tl.store(order_ptr + dest, p.to(tl.int64), mask=ok)
        base += tl.sum(hit, axis=0)


@triton.jit
def expert_of_block(pid, counts_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(expert, first sorted row of row block ``pid``, end row of that expert, rows of that expert)."""
    oe = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + oe, mask=oe < E, other=0)  # [E_PAD] pairs per expert
    blocks = (cnt + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)  # [E_PAD] inclusive
    row_end = tl.cumsum(cnt, axis=0)
    e = tl.sum((block_end <= pid).to(tl.int32), axis=0)  # the expert whose block range holds pid (E: none)
    sel = oe == e
    n_e = tl.sum(tl.where(sel, cnt, 0), axis=0)
    row0 = (
        tl.sum(tl.where(sel, row_end - cnt, 0), axis=0)
        + (pid - tl.sum(tl.where(sel, block_end - blocks, 0), axis=0)) * BLOCK_M
    )
    row_stop = tl.sum(tl.where(sel, row_end, 0), axis=0)
    return e, row0, row_stop, n_e


def sort_by_expert(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Counting sort of the pairs by expert on the device: (order, pos, counts, ends), no host sync.

    ``top_k_index`` [T, K] (E = no expert). ``order`` [S] int64 pair ids sorted by expert (stable, no-expert
    pairs last), ``pos`` [S] int64 the sorted row of each pair, ``counts`` [E+1] int64 pairs per bucket,
    ``ends`` [E] int32 the end row of each expert (``torch._grouped_mm``'s offsets). Same contract as
    :func:`ffnkit.kernels.moe.sort_pairs`, in two launches.

    Example:
        >>> order, pos, counts, ends = sort_by_expert(idx, 64)  # doctest: +SKIP
    """
    flat = top_k_index.reshape(-1).contiguous()  # [S]
    s = flat.numel()
    c = STREAM_CONFIGS["sort"]
    block = c["BLOCK"]
    while triton.cdiv(s, block) > c.get("MAX_PROGRAMS", 1 << 30):
        block *= 2  # 16,384 tokens x top-8: 512 pairs per program (54 us against 65 at 256)
    nb = max(1, triton.cdiv(s, block))
    e1p = triton.next_power_of_2(num_experts + 1)
    dev = flat.device
    hist = torch.empty(nb, e1p, dtype=torch.int32, device=dev)  # [NB, E1P]
    order = torch.empty(s, dtype=torch.int64, device=dev)
    pos = torch.empty(s, dtype=torch.int64, device=dev)
    counts = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
    ends = torch.empty(num_experts, dtype=torch.int32, device=dev)
    meta = dict(E1P=e1p, BLOCK=block, SUB=c["SUB"], num_warps=c["num_warps"])
    _histogram_kernel[(nb,)](flat, hist, s, **meta)
    nbc = min(64, triton.next_power_of_2(nb))
    _rank_scatter_kernel[(nb,)](flat, hist, order, pos, counts, ends, s, nb, num_experts, NBC=nbc, **meta)
    return order, pos, counts, ends


@triton.jit
def _scatter_rows_kernel(x_ptr, pos_ptr, xs_ptr, T, D, K: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr):  # fmt: skip
    """xs[pos[t*K + k]] = x[t] for every k: each token's row read once, written to its K sorted rows."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mt = t < T
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m = mt[:, None] & (offs < D)[None, :]
    v = tl.load(x_ptr + t[:, None].to(tl.int64) * D + offs[None, :], mask=m, other=0.0)  # [BT, BD]
    for kk in tl.static_range(K):
        row = tl.load(pos_ptr + t.to(tl.int64) * K + kk, mask=mt, other=0)  # [BT]
        tl.store(xs_ptr + row[:, None] * D + offs[None, :], v, mask=m)


def scatter_rows(x: Tensor, pos: Tensor, k: int) -> Tensor:
    """xs [S, D] with xs[pos[t*K + k]] = x[t]: x's rows in expert order (the grouped GEMM's input).

    Example:
        >>> xs = scatter_rows(x, pos, 8)  # doctest: +SKIP
    """
    t, d = x.shape
    xs = x.new_empty(t * k, d)  # [S, D]
    c = STREAM_CONFIGS["scatter"]
    grid = (triton.cdiv(t, c["BLOCK_T"]), triton.cdiv(d, c["BLOCK_D"]))
    _scatter_rows_kernel[grid](
        x, pos, xs, t, d, K=k, BLOCK_T=c["BLOCK_T"], BLOCK_D=c["BLOCK_D"], num_warps=c["num_warps"]
    )
    return xs


@triton.jit
def _act_mul_rows_kernel(gu_ptr, h_ptr, S, F, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_N: tl.constexpr):  # fmt: skip
    """h[r, n] = act(gu[r, n]) * gu[r, F + n] over a [BLOCK_R, BLOCK_N] tile, float32 in between."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m = (r < S)[:, None] & (offs < F)[None, :]
    src = gu_ptr + r[:, None].to(tl.int64) * 2 * F + offs[None, :]
    g = tl.load(src, mask=m, other=0.0).to(tl.float32)
    u = tl.load(src + F, mask=m, other=0.0).to(tl.float32)
    h = apply_act(g, ACT) * u
    tl.store(h_ptr + r[:, None].to(tl.int64) * F + offs[None, :], h.to(h_ptr.dtype.element_ty), mask=m)


def act_mul(gu: Tensor, act_code: int) -> Tensor:
    """h [S, F] = act(gu[:, :F]) * gu[:, F:] for gu [S, 2F] (``act_code``: 0 silu, 1 gelu, 2 gelu_tanh, 3 relu).

    Example:
        >>> h = act_mul(gu, 0)  # doctest: +SKIP
    """
    s, f2 = gu.shape
    f = f2 // 2
    h = gu.new_empty(s, f)  # [S, F]
    c = STREAM_CONFIGS["act"]
    grid = (triton.cdiv(s, c["BLOCK_R"]), triton.cdiv(f, c["BLOCK_N"]))
    _act_mul_rows_kernel[grid](
        gu, h, s, f, ACT=act_code, BLOCK_R=c["BLOCK_R"], BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"]
    )
    return h


@triton.jit
def _combine_rows_kernel(y_ptr, pos_ptr, idx_ptr, w_ptr, out_ptr, T, E, D, K: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """out[t, n] = sum_k w[t, k] * y[pos[t, k], n] over a [BLOCK_T, BLOCK_D] tile; index E skipped."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mt = t < T
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    md = offs < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for kk in tl.static_range(K):
        p = t.to(tl.int64) * K + kk
        e = tl.load(idx_ptr + p, mask=mt, other=E)  # [BT]
        use = mt & (e < E)
        wt = tl.load(w_ptr + p, mask=use, other=0.0).to(tl.float32)
        row = tl.load(pos_ptr + p, mask=use, other=0).to(tl.int64)
        v = tl.load(y_ptr + row[:, None] * D + offs[None, :], mask=use[:, None] & md[None, :], other=0.0)
        acc += wt[:, None] * v.to(tl.float32)
    out = out_ptr + t[:, None].to(tl.int64) * D + offs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mt[:, None] & md[None, :])


def combine_rows(y: Tensor, pos: Tensor, idx: Tensor, w: Tensor, num_experts: int) -> Tensor:
    """out [T, D]: out[t] = sum_k w[t, k] * y[pos[t*K + k]] (float32 sum; pairs with index E skipped).

    ``y`` [S, D] rows in sorted order, ``pos`` [S] the sorted row of each pair, ``idx`` / ``w`` [T, K].

    Example:
        >>> out = combine_rows(y, pos, idx, w, 64)  # doctest: +SKIP
    """
    t, k = idx.shape
    d = y.shape[1]
    out = y.new_empty(t, d)  # [T, D]
    c = STREAM_CONFIGS["combine"]
    grid = (triton.cdiv(t, c["BLOCK_T"]), triton.cdiv(d, c["BLOCK_D"]))
    _combine_rows_kernel[grid](
        y, pos, idx.reshape(-1).contiguous(), w.reshape(-1).contiguous(), out, t, num_experts, d, K=k,
        BLOCK_T=c["BLOCK_T"], BLOCK_D=c["BLOCK_D"], num_warps=c["num_warps"],
    )  # fmt: skip
    return out


__all__ = ["STREAM_CONFIGS", "act_mul", "combine_rows", "expert_of_block", "scatter_rows", "sort_by_expert"]
