"""The ``triton`` backend: GPU kernels of the sparse FFN (imported only when a CUDA tensor takes this path).

Three small kernels, each streaming contiguous weight rows (the neuron-major layout of ``pack_ffn``):

1. ``_gate_up_kernel``: h[n, k] = act(<gate row of neuron k, x_n>) * <up row, x_n> for a block of neurons
   per program (gathered through ``idx``), or, for CATS, the dense gate of every neuron followed by the up
   rows of the neurons some row keeps (masked-off loads issue no memory traffic).
2. ``_rows_kernel``: y_part[s, n, :] = sum over a slice s of the rows k of h[n, k] * W[row k, :], skipping
   rows whose h is zero in every batch row; the grid is (output column blocks) x (slices of k) so that a
   short active list still fills the GPU; it is the down projection (rows = down columns of the active
   neurons). TEAL's input-sparse products live in :mod:`ffnkit.kernels.triton_teal`.
3. ``_reduce_kernel``: y = sum over the slices, cast to the output dtype (deterministic, no atomics).

A single row (decode at batch 1) takes, by default, a fourth kernel instead: ``_fused_1_kernel``, a
persistent grid whose programs each stream whole neurons (gate row, up row, down column: one contiguous
block) and keep their share of y in registers, followed by ``_reduce_kernel`` over the programs' partial
sums. On an H200 (Llama-3-8B FFN, bf16, 50% of the neurons) it took 49.5 us against 62 us for the
three-kernel path and 52 us for the tl.dot path, the dense cuBLAS FFN 100 us
(benchmarks/results/sparse_kernel_h200.json). Batches above 1 use ``tl.dot`` with the rows padded to 16 (h
then enters the down product in the weight dtype, as in a dense bf16 FFN); a single row otherwise
multiplies in float32 on the CUDA cores. Block sizes come from :data:`CONFIGS`, chosen by
``benchmarks/sparse_kernel.py --sweep`` on that H200.

Example:
    >>> import torch  # doctest: +SKIP
    >>> from ffnkit.kernels import pack_ffn, gather_ffn
    >>> p = pack_ffn(*(torch.randn(64, 32, device="cuda"),) * 2, torch.randn(32, 64, device="cuda"))
    >>> gather_ffn(torch.randn(1, 32, device="cuda"), p, torch.arange(8, device="cuda"), backend="triton")
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffnkit.kernels.backend import LAUNCH

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: LAUNCH["pdl"] has no effect
    gdc_launch_dependents = gdc_wait = None

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

# Launch parameters, per kernel and batch class ("1": one row on the CUDA cores, "n": rows padded to 16
# through tl.dot), as measured on an H200 (benchmarks/sparse_kernel.py --sweep, 50% of the bytes skipped).
# "batch1" picks the path of a single row: "fused" (one persistent pass + reduce), "split" (the "1"
# kernels) or "dot" (the "n" kernels with the row padded to 16).
CONFIGS: dict[str, dict] = {
    # reduce: "kernel" (a second launch) or "atomic" (in the fused kernel; 8B decode, gather at 50%: 3.242
    # against 3.249 ms/token, results/sparsity_decode_h200.json gather_50_atomic: no real gain, so off)
    "batch1": {"path": "fused", "reduce": "kernel"},
    "gate_up_1": {"BLOCK_K": 4, "BLOCK_D": 1024, "num_warps": 4, "num_stages": 3, "MIN_PROGRAMS_PER_SM": 2},
    "gate_up_n": {"BLOCK_K": 32, "BLOCK_D": 128, "num_warps": 4, "num_stages": 3},
    "rows_1": {"BLOCK_K": 32, "BLOCK_M": 128, "num_warps": 4, "num_stages": 3, "WAVES": 4},
    "rows_n": {"BLOCK_K": 32, "BLOCK_M": 256, "num_warps": 4, "num_stages": 3, "WAVES": 4},
    # the whole rows of BLOCK_K neurons live in registers: only for D <= MAX_D
    "fused_1": {"BLOCK_K": 2, "num_warps": 8, "num_stages": 2, "PROGRAMS_PER_SM": 2, "MAX_D": 8192},
    # predicted_ffn at batch 1 (the fused kernel scoring its own neurons first): fastest of five in the 8B
    # decode (results/sparsity_decode_h200.json, predictor_50*: 3.821 ms/token against 3.825-4.114)
    "pred_1": {"BLOCK_K": 4, "num_warps": 8, "num_stages": 2, "PROGRAMS_PER_SM": 2, "MAX_D": 8192},
}


# Programmatic dependent launch (Hopper and later; off by default). With LAUNCH["pdl"]
# (ffnkit.kernels.programmatic_launch) the decode kernels (the fused gather kernel, its reduce, the GEMV) are
# launched so that they may start while the kernel before them finishes: each may first load what the kernel
# just before does not write (the GEMV its weights; the gather kernel its active list and first neurons, only
# with LAUNCH["prefetch_active"]), then waits for that kernel (gdc_wait) before it reads its input or writes
# anything, and lets the next kernel launch. Inside a CUDA graph this hides a launch and a DRAM round trip per
# kernel (benchmarks/sparsity_decode_gpu.py, the *_pdl configurations).


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch (LAUNCH["pdl"], sm90+).

    Example:
        >>> use_pdl(torch.device("cpu"))
        False
    """
    if not LAUNCH["pdl"] or device.type != "cuda" or gdc_wait is None:
        return False
    return _sm90_or_later(device)


@functools.cache
def _sm90_or_later(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_args(device: torch.device) -> dict:
    """The ``PDL`` constexpr and the ``launch_pdl`` option of a kernel launched now on ``device`` (a kernel
    taking them calls :func:`pdl_wait` before it reads anything the previous kernel may write).

    Example:
        >>> pdl_args(torch.device("cpu"))
        {'PDL': False, 'launch_pdl': False}
    """
    on = use_pdl(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has finished (its writes visible), then let the next kernel
    launch (device code; a no-op without PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def apply_act(g, ACT: tl.constexpr):
    """The activation ``ACT`` (an :data:`ACT_CODES` value) of float32 ``g``, elementwise (Triton device code)."""
    if ACT == 0:
        r = g * tl.sigmoid(g)
    elif ACT == 1:
        r = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        r = 0.5 * g * (2.0 * tl.sigmoid(2.0 * z))  # 1 + tanh(z) = 2 sigmoid(2z)
    else:
        r = tl.maximum(g, 0.0)
    return r


@triton.jit
def _row_dots(w_ptrs, wmask, x_ptr, offs_n, mn, D, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """[BN, BK] float32: <row k, x_n> for the BK rows starting at ``w_ptrs`` (rows with wmask False: 0)."""
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            od = d0 + tl.arange(0, BLOCK_D)
            md = od < D
            xt = tl.load(x_ptr + offs_n[:, None] * D + od[None, :], mask=mn[:, None] & md[None, :], other=0.0)
            w = tl.load(w_ptrs[:, None] + od[None, :], mask=wmask[:, None] & md[None, :], other=0.0)
            if IEEE:
                acc += tl.trans(tl.dot(w, tl.trans(xt), input_precision="ieee"))
            else:
                acc += tl.trans(tl.dot(w, tl.trans(xt)))
        r = acc
    else:
        # one row of x: accumulate products elementwise and reduce once at the end (no shuffles in the loop)
        acc2 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            od = d0 + tl.arange(0, BLOCK_D)
            md = od < D
            xr = tl.load(x_ptr + od, mask=md, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs[:, None] + od[None, :], mask=wmask[:, None] & md[None, :], other=0.0)
            acc2 += w.to(tl.float32) * xr[None, :]
        r = tl.sum(acc2, axis=1)[None, :]
    return r


@triton.jit
def _row_dots2(g_ptrs, wmask, D, x_ptr, offs_n, mn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Like _row_dots for the gate rows at ``g_ptrs`` and the up rows at ``g_ptrs + D`` in one loop (twice
    the bytes in flight per iteration)."""
    if USE_DOT:
        ag = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        au = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            od = d0 + tl.arange(0, BLOCK_D)
            md = od < D
            xt = tl.load(x_ptr + offs_n[:, None] * D + od[None, :], mask=mn[:, None] & md[None, :], other=0.0)
            m2 = wmask[:, None] & md[None, :]
            wg = tl.load(g_ptrs[:, None] + od[None, :], mask=m2, other=0.0)
            wu = tl.load(g_ptrs[:, None] + D + od[None, :], mask=m2, other=0.0)
            if IEEE:
                ag += tl.trans(tl.dot(wg, tl.trans(xt), input_precision="ieee"))
                au += tl.trans(tl.dot(wu, tl.trans(xt), input_precision="ieee"))
            else:
                ag += tl.trans(tl.dot(wg, tl.trans(xt)))
                au += tl.trans(tl.dot(wu, tl.trans(xt)))
        g = ag
        u = au
    else:
        ag2 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        au2 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            od = d0 + tl.arange(0, BLOCK_D)
            md = od < D
            xr = tl.load(x_ptr + od, mask=md, other=0.0).to(tl.float32)
            m2 = wmask[:, None] & md[None, :]
            wg = tl.load(g_ptrs[:, None] + od[None, :], mask=m2, other=0.0)
            wu = tl.load(g_ptrs[:, None] + D + od[None, :], mask=m2, other=0.0)
            ag2 += wg.to(tl.float32) * xr[None, :]
            au2 += wu.to(tl.float32) * xr[None, :]
        g = tl.sum(ag2, axis=1)[None, :]
        u = tl.sum(au2, axis=1)[None, :]
    return g, u


@triton.jit(do_not_specialize=["N", "K", "thr"])
def _gate_up_kernel(
    x_ptr, p_ptr, idx_ptr, h_ptr, scale_ptr, thr_ptr, N, K, D, thr, stride_row,
    HAS_IDX: tl.constexpr, USE_THR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_TVEC: tl.constexpr,
    ACT: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK] positions in the neuron list
    mk = offs_k < K
    if HAS_IDX:
        rows = tl.load(idx_ptr + offs_k, mask=mk, other=0).to(tl.int64)
    else:
        rows = offs_k.to(tl.int64)
    gate_ptrs = p_ptr + rows * stride_row  # [BK] start of each neuron's gate row; its up row follows at +D
    offs_n = tl.arange(0, BLOCK_N)
    mn = offs_n < N
    if USE_THR:
        g = _row_dots(
            gate_ptrs, mk, x_ptr, offs_n, mn, D, BLOCK_N, BLOCK_K, BLOCK_D, USE_DOT, IEEE
        )  # [BN, BK]
        a = apply_act(g, ACT)
        if HAS_TVEC:  # CHESS-style: one threshold per neuron
            t = tl.load(thr_ptr + rows, mask=mk, other=0.0)[None, :]  # [1, BK]
        else:
            t = thr
        keep = (tl.abs(a) > t) & mn[:, None]  # [BN, BK]
        live = mk & (tl.max(keep.to(tl.int32), axis=0) > 0)  # [BK]: some row keeps the neuron
        u = _row_dots(gate_ptrs + D, live, x_ptr, offs_n, mn, D, BLOCK_N, BLOCK_K, BLOCK_D, USE_DOT, IEEE)
        h = tl.where(keep, a * u, 0.0)
    else:
        g, u = _row_dots2(gate_ptrs, mk, D, x_ptr, offs_n, mn, BLOCK_N, BLOCK_K, BLOCK_D, USE_DOT, IEEE)
        h = apply_act(g, ACT) * u
    hm = mn[:, None] & mk[None, :]
    if HAS_SCALE:
        h = h * tl.load(scale_ptr + offs_n[:, None] * K + offs_k[None, :], mask=hm, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs_n[:, None] * K + offs_k[None, :], h, mask=hm)


@triton.jit(do_not_specialize=["N", "K", "thr", "k_per_split"])
def _rows_kernel(
    h_ptr, w_ptr, idx_ptr, part_ptr, N, K, M, thr, stride_row, k_per_split,
    HAS_IDX: tl.constexpr, TEAL: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] output columns
    mm = offs_m < M
    offs_n = tl.arange(0, BLOCK_N)
    mn = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)  # reduced over k once, after the loop
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        mk = ok < k_hi
        h = tl.load(h_ptr + offs_n[:, None] * K + ok[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        h = h.to(tl.float32)  # [BN, BK]
        if TEAL:
            h = tl.where(tl.abs(h) >= thr, h, 0.0)
        if HAS_IDX:
            live = mk  # gathered neurons are live: no wait on h before the weight loads
        else:
            live = mk & (tl.max(tl.abs(h), axis=0) > 0.0)  # a row of W whose h is 0 in every row is not read
        if HAS_IDX:
            rows = tl.load(idx_ptr + ok, mask=mk, other=0).to(tl.int64)
        else:
            rows = ok.to(tl.int64)
        w = tl.load(
            w_ptr + rows[:, None] * stride_row + offs_m[None, :], mask=live[:, None] & mm[None, :], other=0.0
        )
        if USE_DOT:
            if IEEE:
                acc += tl.dot(h.to(w.dtype), w, input_precision="ieee")
            else:
                acc += tl.dot(h.to(w.dtype), w)
        else:
            acc2 += tl.trans(h) * w.to(tl.float32)  # [BK, 1] * [BK, BM]
    if not USE_DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
    out = part_ptr + pid_s * N * M + offs_n[:, None] * M + offs_m[None, :]
    tl.store(out, acc, mask=mn[:, None] & mm[None, :])


@triton.jit
def _neuron_rows(p_ptr, rows, mk, od, md, D, stride_row):
    """The gate, up and down-column rows [BK, BD] of the neurons ``rows`` (mask mk), float32 (device code)."""
    base = p_ptr + rows * stride_row  # [BK] start of each neuron's gate row; up at +D, down column at +2D
    m2 = mk[:, None] & md[None, :]
    wg = tl.load(base[:, None] + od[None, :], mask=m2, other=0.0).to(tl.float32)  # [BK, BD]
    wu = tl.load(base[:, None] + D + od[None, :], mask=m2, other=0.0).to(tl.float32)
    wd = tl.load(base[:, None] + 2 * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
    return wg, wu, wd


@triton.jit
def _neuron_sum(wg, wu, wd, xr, scale_ptr, ok, mk, HAS_SCALE: tl.constexpr, ACT: tl.constexpr):
    """[BD] float32: sum over the loaded neurons of h_k * their down column (device code)."""
    h = apply_act(tl.sum(wg * xr[None, :], axis=1), ACT) * tl.sum(wu * xr[None, :], axis=1)  # [BK]
    if HAS_SCALE:
        h = h * tl.load(scale_ptr + ok, mask=mk, other=0.0).to(tl.float32)
    return tl.sum(h[:, None] * wd, axis=0)


@triton.jit
def _neuron_block(x_ptr, p_ptr, scale_ptr, rows, ok, mk, xr, od, md, D, stride_row, HAS_SCALE: tl.constexpr,
                  ACT: tl.constexpr):  # fmt: skip
    """[BD] float32: sum over the BK neurons ``rows`` (mask mk) of h_k * their down column (device code)."""
    wg, wu, wd = _neuron_rows(p_ptr, rows, mk, od, md, D, stride_row)
    return _neuron_sum(wg, wu, wd, xr, scale_ptr, ok, mk, HAS_SCALE, ACT)


@triton.jit(do_not_specialize=["K", "n_blocks", "thr", "R"])
def _fused_1_kernel(
    x_ptr, p_ptr, idx_ptr, part_ptr, scale_ptr, z_ptr, pb_ptr, pbias_ptr, list_ptr, y_ptr, sum_ptr, ticket_ptr,
    K, D, stride_row, n_blocks, thr, R,
    HAS_SCALE: tl.constexpr, HAS_PRED: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, SLOTS: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """Batch 1 in one pass: a persistent program takes BLOCK_K neurons at a time, reads their three whole
    rows (gate, up, down column: one contiguous block each), and keeps its share of y in registers.

    HAS_PRED (Deja Vu at decode, no ``idx``): first the program scores all the neurons it owns (blocks pid,
    pid + G, ...: pred_b[i] . z + pred_bias[i] > thr, in one vectorised pass) and lists the kept ones in its
    own slice of ``list_ptr``; then it streams only those, as the gather does, so the weight loads never
    wait on a score and the predicted set needs no extra launch.

    ATOMIC: no partial sums and no reduce launch: each program adds its share into the float32 ``sum_ptr``
    [D] and takes a ticket; the last one reads the sum, writes y in its dtype and re-zeroes the sum and the
    ticket for the next call (both buffers start at zero).

    PDL: wait for the previous kernel before reading x (see LAUNCH); PREFETCH: read the active list and the
    first block's weights before that wait (an active list the previous kernel does not write)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    od = tl.arange(0, BLOCK_D)
    md = od < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid
    if PREFETCH and not HAS_PRED:  # the first block's weights in flight while the previous kernel finishes
        ok = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = (ok < K) & (pid < n_blocks)
        rows = tl.load(idx_ptr + ok, mask=mk, other=0).to(tl.int64)
        wg, wu, wd = _neuron_rows(p_ptr, rows, mk, od, md, D, stride_row)
        pdl_wait(PDL)
        xr = tl.load(x_ptr + od, mask=md, other=0.0).to(tl.float32)  # [BD]
        acc += _neuron_sum(wg, wu, wd, xr, scale_ptr, ok, mk, HAS_SCALE, ACT)
        first = pid + n_prog
    else:
        pdl_wait(PDL)
        xr = tl.load(x_ptr + od, mask=md, other=0.0).to(tl.float32)  # [BD]
    if HAS_PRED:
        sl = tl.arange(0, SLOTS)  # this program's neurons: slot -> neuron
        blk = pid + (sl // BLOCK_K) * n_prog
        nid = blk * BLOCK_K + sl % BLOCK_K
        ms = (blk < n_blocks) & (nid < K)
        orr = tl.arange(0, BLOCK_R)
        mr = orr < R
        zr = tl.load(z_ptr + orr, mask=mr, other=0.0).to(tl.float32)  # [BR]
        pb = tl.load(
            pb_ptr + nid.to(tl.int64)[:, None] * R + orr[None, :], mask=ms[:, None] & mr[None, :], other=0.0
        )
        score = tl.sum(pb.to(tl.float32) * zr[None, :], axis=1)  # [SLOTS]
        score += tl.load(pbias_ptr + nid, mask=ms, other=0.0).to(tl.float32)
        keep = (ms & (score > thr)).to(tl.int32)
        pos = tl.cumsum(keep, 0) - 1
        own = list_ptr + pid * SLOTS
        tl.store(own + pos, nid, mask=keep > 0)
        cnt = tl.sum(keep, 0)
        tl.debug_barrier()  # the list is written by other threads of this program
        for j0 in range(0, cnt, BLOCK_K):
            ok = j0 + tl.arange(0, BLOCK_K)
            mk = ok < cnt
            rows = tl.load(own + ok, mask=mk, other=0).to(tl.int64)
            acc += _neuron_block(x_ptr, p_ptr, scale_ptr, rows, ok, mk, xr, od, md, D, stride_row, False, ACT)
    else:
        for blk in range(first, n_blocks, n_prog):
            ok = blk * BLOCK_K + tl.arange(0, BLOCK_K)
            mk = ok < K
            rows = tl.load(idx_ptr + ok, mask=mk, other=0).to(tl.int64)
            acc += _neuron_block(
                x_ptr, p_ptr, scale_ptr, rows, ok, mk, xr, od, md, D, stride_row, HAS_SCALE, ACT
            )
    if ATOMIC:
        tl.atomic_add(sum_ptr + od, acc, mask=md, sem="release")
        tl.debug_barrier()  # every thread's share is added before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == n_prog - 1:
            zero = tl.zeros([BLOCK_D], dtype=tl.float32)
            total = tl.atomic_add(sum_ptr + od, zero, mask=md, sem="acquire")  # read at L2: every share is in
            tl.store(y_ptr + od, total.to(y_ptr.dtype.element_ty), mask=md)
            tl.store(sum_ptr + od, zero, mask=md)  # the other programs are done: plain stores re-zero
            tl.store(ticket_ptr, 0)
    else:
        tl.store(part_ptr + pid * D + od, acc, mask=md)


@triton.jit
def sum_partials(part_ptr, offs, m, S, NM, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """[BLOCK] float32: sum over s < S of part[s, offs] (part [S, NM] float32, mask m), BLOCK_S rows at once
    (device code)."""
    acc = tl.zeros([BLOCK_S, BLOCK], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        os_ = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(
            part_ptr + os_[:, None] * NM + offs[None, :], mask=(os_ < S)[:, None] & m[None, :], other=0.0
        )
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["S", "NM"])
def _reduce_kernel(part_ptr, y_ptr, S, NM, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """y = sum over S of part [S, NM]; each program owns BLOCK outputs and reads BLOCK_S partials at once."""
    pdl_wait(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NM
    tl.store(
        y_ptr + offs,
        sum_partials(part_ptr, offs, m, S, NM, BLOCK, BLOCK_S).to(y_ptr.dtype.element_ty),
        mask=m,
    )


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's multiprocessor count (4 for CPU tensors, as under ``TRITON_INTERPRET=1``).

    Example:
        >>> sm_count(torch.device("cpu"))
        4
    """
    if device.type != "cuda":
        return 4  # the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors
    return torch.cuda.get_device_properties(device).multi_processor_count


def _batch_block(n: int) -> tuple[int, bool, str]:
    """(BLOCK_N, USE_DOT, config class) for n rows."""
    if n == 1 and CONFIGS["batch1"]["path"] != "dot":
        return 1, False, "1"
    return max(16, triton.next_power_of_2(n)), True, "n"


def launch_gate_up(
    x2: Tensor,
    packed: Tensor,
    idx: Tensor | None,
    thr: float | Tensor | None,
    act: str,
    scale: Tensor | None,
) -> Tensor:
    """Stage 1: h [N, K] float32 for the neurons ``idx`` (all with ``idx`` None; CATS with ``thr``, a number
    or a float32 [F] tensor of per-neuron thresholds).

    Example:
        >>> h = launch_gate_up(x2, packed, idx, None, "silu", None)  # doctest: +SKIP
    """
    n, d = x2.shape
    k = packed.shape[0] if idx is None else idx.numel()
    h = torch.empty(n, k, device=x2.device, dtype=torch.float32)  # [N, K]
    bn, use_dot, cls = _batch_block(n)
    cfg = dict(CONFIGS[f"gate_up_{cls}"])
    bk, bd = cfg.pop("BLOCK_K"), cfg.pop("BLOCK_D")
    if not use_dot:
        # Few neurons: fewer per program (and longer row chunks) so that the grid still fills the GPU.
        while bk > 1 and triton.cdiv(k, bk) < cfg["MIN_PROGRAMS_PER_SM"] * sm_count(x2.device):
            bk, bd = bk // 2, bd * 2
    cfg.pop("MIN_PROGRAMS_PER_SM", None)
    bd = min(bd, max(16, triton.next_power_of_2(d)))
    tvec = isinstance(thr, Tensor)
    _gate_up_kernel[(triton.cdiv(k, bk),)](
        x2, packed, idx if idx is not None else h, h, scale if scale is not None else h,
        thr if tvec else h, n, k, d, 0.0 if tvec else float(thr or 0.0), packed.stride(0),
        HAS_IDX=idx is not None, USE_THR=thr is not None, HAS_SCALE=scale is not None, HAS_TVEC=tvec,
        ACT=ACT_CODES[act],
        USE_DOT=use_dot, IEEE=packed.dtype == torch.float32, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, **cfg,
    )  # fmt: skip
    return h


def launch_rows(h: Tensor, w_rows: Tensor, idx: Tensor | None, teal_thr: float | None) -> Tensor:
    """Stage 2: partial sums [S, N, M] float32 of sum_k h[:, k] * w_rows[idx[k] or k, :] over S slices of k.

    Example:
        >>> part = launch_rows(h, packed[:, 2, :], idx, None)  # doctest: +SKIP
    """
    n, k = h.shape
    m = w_rows.shape[1]
    bn, use_dot, cls = _batch_block(n)
    cfg = dict(CONFIGS[f"rows_{cls}"])
    bk, bm, waves = cfg.pop("BLOCK_K"), cfg.pop("BLOCK_M"), cfg.pop("WAVES")
    bm = min(bm, max(16, triton.next_power_of_2(m)))
    m_blocks = triton.cdiv(m, bm)
    # Slices of k so that m_blocks x slices ~ WAVES programs per multiprocessor, each at least one block.
    splits = max(1, min(triton.cdiv(k, bk), triton.cdiv(waves * sm_count(h.device), m_blocks)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per_split)
    part = torch.empty(splits, n, m, device=h.device, dtype=torch.float32)  # [S, N, M]
    _rows_kernel[(m_blocks, splits)](
        h, w_rows, idx if idx is not None else h, part, n, k, m, float(teal_thr or 0.0), w_rows.stride(0),
        k_per_split, HAS_IDX=idx is not None, TEAL=teal_thr is not None, USE_DOT=use_dot,
        IEEE=w_rows.dtype == torch.float32, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, **cfg,
    )  # fmt: skip
    return part


def launch_reduce(part: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Stage 3: [S, N, M] float32 partial sums -> [N, M] in out_dtype.

    Example:
        >>> y = launch_reduce(part, torch.bfloat16)  # doctest: +SKIP
    """
    s, n, m = part.shape
    y = torch.empty(n, m, device=part.device, dtype=out_dtype)
    # narrow column blocks and all partials at once: many programs, one round trip (latency, not bytes)
    block = 32 if n * m <= 16384 else 128
    block_s = min(max(2, triton.next_power_of_2(s)), 8192 // block)
    _reduce_kernel[(triton.cdiv(n * m, block),)](
        part, y, s, n * m, BLOCK=block, BLOCK_S=block_s, **pdl_args(part.device), num_warps=4
    )
    return y


def _rows(h: Tensor, w_rows: Tensor, idx: Tensor | None, teal_thr: float | None, out_dtype: torch.dtype):
    """sum_k h[:, k] * w_rows[idx[k] or k, :] -> [N, M] in out_dtype (w_rows: [R, M] with unit column stride)."""
    return launch_reduce(launch_rows(h, w_rows, idx, teal_thr), out_dtype)


_SUMS: dict[tuple, tuple[Tensor, Tensor]] = {}


def atomic_buffers(device: torch.device, d: int) -> tuple[Tensor, Tensor]:
    """The zeroed float32 sum [D] and int32 ticket of the ATOMIC path on ``device`` (made once; every
    call leaves them zero again). Kernels on one stream share them; calls on concurrent streams must not.

    Example:
        >>> s, t = atomic_buffers(torch.device("cpu"), 4); s.tolist(), t.tolist()
        ([0.0, 0.0, 0.0, 0.0], [0])
    """
    key = (device, d)
    if key not in _SUMS:
        _SUMS[key] = (
            torch.zeros(d, device=device, dtype=torch.float32),
            torch.zeros(1, device=device, dtype=torch.int32),
        )
    return _SUMS[key]


def launch_fused_1(
    x2: Tensor,
    packed: Tensor,
    idx: Tensor | None,
    act: str,
    scale: Tensor | None,
    pred: tuple[Tensor, Tensor, Tensor, float] | None = None,
    out_dtype: torch.dtype | None = None,
    partials: bool = False,
) -> Tensor:
    """Batch 1 in one pass: y [1, D] in ``out_dtype`` (partial sums of the G persistent programs, then
    the reduce launch; or with CONFIGS["batch1"]["reduce"] == "atomic", summed inside the kernel).

    ``partials``: return the G programs' float32 partial sums [G, 1, D] unreduced (y is their sum), for a
    caller that folds the sum into its next launch (the decode benchmark's residual add + RMSNorm).

    ``pred`` = (z [R] float32, pred_b [F, R] float32, pred_bias [F] float32, threshold): every neuron whose
    score pred_b · z + pred_bias exceeds the threshold, in place of ``idx``.

    Example:
        >>> y = launch_fused_1(x2, packed, idx, "silu", None, out_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    d = packed.shape[2]
    out_dtype = out_dtype or x2.dtype
    k = packed.shape[0] if pred is not None else idx.numel()
    cfg = dict(CONFIGS["pred_1" if pred is not None else "fused_1"])
    bk, per_sm = cfg.pop("BLOCK_K"), cfg.pop("PROGRAMS_PER_SM")
    cfg.pop("MAX_D")
    n_blocks = triton.cdiv(k, bk)
    grid = min(n_blocks, per_sm * sm_count(x2.device))
    atomic = CONFIGS["batch1"].get("reduce", "kernel") == "atomic" and not partials
    pdl = pdl_args(x2.device)
    y = torch.empty(1, d, device=x2.device, dtype=out_dtype)  # [1, D]
    part = y if atomic else torch.empty(grid, 1, d, device=x2.device, dtype=torch.float32)  # [G, 1, D]
    sums, ticket = atomic_buffers(x2.device, d) if atomic else (part, part)
    z, pb, pbias, thr = pred if pred is not None else (part, part, part, 0.0)
    r = pb.shape[1] if pred is not None else 0
    slots = triton.next_power_of_2(triton.cdiv(n_blocks, grid) * bk) if pred is not None else 1
    lst = (
        torch.empty(grid * slots, device=x2.device, dtype=torch.int32) if pred is not None else part
    )  # [G*SLOTS]
    _fused_1_kernel[(grid,)](
        x2, packed, idx if idx is not None else part, part, scale if scale is not None else part, z, pb, pbias, lst,
        y, sums, ticket, k, d, packed.stride(0), n_blocks, float(thr), r,
        HAS_SCALE=scale is not None, HAS_PRED=pred is not None, ACT=ACT_CODES[act], BLOCK_K=bk,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_R=max(16, triton.next_power_of_2(r)), SLOTS=slots, ATOMIC=atomic,
        PREFETCH=pdl["PDL"] and LAUNCH["prefetch_active"], **pdl, **cfg,
    )  # fmt: skip
    if partials:
        return part
    return y if atomic else launch_reduce(part, out_dtype).reshape(1, d)


def gather_ffn(
    x: Tensor, packed: Tensor, idx: Tensor, act: str = "silu", scale: Tensor | None = None
) -> Tensor:
    """The gated FFN over the neurons ``idx`` (see :func:`ffnkit.kernels.gather_ffn`), on the GPU.

    Example:
        >>> gather_ffn(x, packed, idx)  # doctest: +SKIP
    """
    d = packed.shape[2]
    x2 = x.reshape(-1, d).contiguous()  # [N, D]
    sc = None if scale is None else scale.to(torch.float32).contiguous()
    if x2.shape[0] == 1 and CONFIGS["batch1"]["path"] == "fused" and d <= CONFIGS["fused_1"]["MAX_D"]:
        return launch_fused_1(x2, packed, idx.contiguous(), act, sc, out_dtype=x.dtype).reshape(x.shape)
    h = launch_gate_up(x2, packed, idx.contiguous(), None, act, sc)  # [N, K] float32
    return _rows(h, packed[:, 2, :], idx.contiguous(), None, x.dtype).reshape(x.shape)


def threshold_ffn(x: Tensor, packed: Tensor, threshold: float | Tensor, act: str = "silu") -> Tensor:
    """CATS (see :func:`ffnkit.kernels.threshold_ffn`; ``threshold`` a number or float32 [F]), on the GPU.

    Example:
        >>> threshold_ffn(x, packed, 0.1)  # doctest: +SKIP
    """
    d = packed.shape[2]
    x2 = x.reshape(-1, d).contiguous()
    h = launch_gate_up(x2, packed, None, threshold, act, None)  # [N, F], zero where skipped
    return _rows(h, packed[:, 2, :], None, None, x.dtype).reshape(x.shape)


def predicted_ffn(
    x: Tensor,
    packed: Tensor,
    z: Tensor,
    pred_b: Tensor,
    pred_bias: Tensor,
    threshold: float,
    act: str = "silu",
) -> Tensor:
    """Deja Vu (see :func:`ffnkit.kernels.predicted_ffn`) on the GPU: one row in one pass that scores the
    neurons itself (no host sync, capturable); more rows gather the union of the rows' sets, each row
    weighted by its own keep mask.

    Example:
        >>> predicted_ffn(x, packed, z, pred_b, pred_bias, 0.0)  # doctest: +SKIP
    """
    d = packed.shape[2]
    x2 = x.reshape(-1, d).contiguous()  # [N, D]
    z2 = z.reshape(x2.shape[0], -1).to(torch.float32).contiguous()  # [N, R]
    pb, pbias = pred_b.to(torch.float32).contiguous(), pred_bias.to(torch.float32).contiguous()
    if x2.shape[0] == 1 and d <= CONFIGS["pred_1"]["MAX_D"]:
        y = launch_fused_1(
            x2, packed, None, act, None, pred=(z2[0], pb, pbias, float(threshold)), out_dtype=x.dtype
        )
        return y.reshape(x.shape)
    keep = (z2 @ pb.T + pbias) > threshold  # [N, F]
    idx = keep.any(0).nonzero()[:, 0]  # the union (a host sync: batches are not the decode path)
    if idx.numel() == 0:
        return torch.zeros_like(x)
    return gather_ffn(x, packed, idx, act, keep[:, idx].to(torch.float32))
