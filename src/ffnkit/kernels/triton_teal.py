"""The ``triton`` backend of TEAL (input-sparse products): compact the kept inputs on the GPU, then stream
only their rows of the input-major weights.

Why not mask inside one weight loop: a loop over every input row whose weight load is masked by the value
of x still walks every row and waits on x before each load; on an H200 (Llama-3-8B FFN, bf16) that path
ran 119 us at 50% of the bytes skipped against 100 us for the dense FFN. The launches:

1. ``_compact_kernel``: per block of ``BLOCK_C`` inputs of v [N, L], the inputs some row keeps
   (|v| >= t and v != 0) are listed in order at idx[b * BLOCK_C:] and counted in cnt[b]. Blocks are
   independent (no global scan): one short parallel launch. A product kernel finds position p of the
   whole kept list from the block counts (a prefix sum over the few blocks, in registers).
2. The product, one of two kernels (``CONFIGS[...]["KIND"]``):
   ``_loop_kernel`` ("loop"): program (m, s) owns BM output columns and the s-th of S equal shares of
   the kept list (S fixed at launch, the share computed on the device from the count), and loops over
   its rows BK at a time, the next step's row indices loaded one step ahead so no weight load waits on
   an index load; float32 products accumulate in registers and are reduced once. ``_strip_kernel``
   ("strip"): program (c, g) owns R kept rows (indices and values loaded once) and streams their
   columns c * COLS .. BM at a time, writing one partial per group of R rows; groups past the kept count
   exit at once. ``PAIR`` reads a second slice at column offset F (the up half of ``gate_up_t``) with the
   first (the gate half). Rows of v are thresholded again per batch row, so the union of the rows'
   active sets is read once and each row still sees only its own kept inputs.
3. ``_teal_mid_kernel`` (whole FFN): sums the gate/up partials, h = act(gate) * up, writes h [N, F] and
   compacts the kept h per block for the down product; ``_reduce_kernel`` sums the down partials.

No host synchronisation and fixed shapes: the counts stay on the device (each program reads them), so the
whole FFN can be captured in a CUDA graph. Thresholds are a number or a float32 tensor, one per input.

Example:
    >>> y = teal_ffn(x, gate_up_t, down_t, 0.1, 0.05)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffnkit.kernels.triton_sparse_ffn import ACT_CODES, apply_act, sm_count

# Launch parameters per stage and batch class. Stages: "in" = the gate/up product (PAIR), "out" = the down
# product and sparse_input_linear. Batch classes: "1" (one row on the CUDA cores) and "n" (rows padded to 16
# through tl.dot). KIND "loop" (_loop_kernel): BK kept rows per step, BM columns per program, about WAVES
# programs per multiprocessor; KIND "strip" (_strip_kernel): R kept rows per program, BM columns per step,
# COLS columns per program. BLOCK_C / MID_C: compaction blocks of the inputs and of the intermediates.
CONFIGS: dict[str, dict | int] = {
    "in_1": {"KIND": "loop", "BK": 16, "BM": 256, "WAVES": 4, "num_warps": 4, "num_stages": 2},
    "out_1": {"KIND": "loop", "BK": 16, "BM": 256, "WAVES": 4, "num_warps": 4, "num_stages": 2},
    "in_n": {"KIND": "loop", "BK": 16, "BM": 128, "WAVES": 4, "num_warps": 4, "num_stages": 2},
    "out_n": {"KIND": "loop", "BK": 16, "BM": 128, "WAVES": 4, "num_warps": 4, "num_stages": 2},
    "BLOCK_C": 256,
    "MID_C": 128,
}
MAX_BLOCKS = 256  # compaction blocks per list at most (the strip kernel's prefix sum spans them all)


@triton.jit(do_not_specialize=["N", "L", "thr"])
def _compact_kernel(
    v_ptr, thr_ptr, idx_ptr, cnt_ptr, N, L, thr, HAS_TVEC: tl.constexpr, BLOCK_C: tl.constexpr
):
    b = tl.program_id(0)
    offs = b * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < L
    if HAS_TVEC:
        t = tl.load(thr_ptr + offs, mask=m, other=0.0)
    else:
        t = thr
    keep = tl.zeros([BLOCK_C], dtype=tl.int32)
    for n in range(0, N):
        v = tl.load(v_ptr + n * L + offs, mask=m, other=0.0).to(tl.float32)
        keep = keep | ((tl.abs(v) >= t) & (v != 0.0) & m).to(tl.int32)
    pos = tl.cumsum(keep, 0) - 1  # [BC] slot of each kept input within the block
    tl.store(idx_ptr + b * BLOCK_C + pos, offs, mask=keep > 0)
    tl.store(cnt_ptr + b, tl.sum(keep, 0))


@triton.jit
def _kept_total(cnt_ptr, NB, NBP: tl.constexpr):
    """(counts [NBP] int32, total kept) of a block-compacted list (device code)."""
    ob = tl.arange(0, NBP)
    cn = tl.load(cnt_ptr + ob, mask=ob < NB, other=0)
    return cn, tl.sum(cn, 0)


@triton.jit(do_not_specialize=["N", "L", "M", "NB", "thr", "pair_off", "out_w", "cols"])
def _strip_kernel(
    v_ptr, w_ptr, idx_ptr, cnt_ptr, thr_ptr, part_ptr, N, L, M, NB, thr, w_stride, pair_off, out_w, cols,
    HAS_TVEC: tl.constexpr, PAIR: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, NBP: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    g = tl.program_id(1)
    cn, total = _kept_total(cnt_ptr, NB, NBP)
    incl = tl.cumsum(cn, 0)  # [NBP] kept inputs up to and including each block
    p = g * R + tl.arange(0, R)  # [R] this program's positions in the whole kept list
    valid = p < total
    before = incl[None, :] <= p[:, None]  # [R, NBP] blocks wholly before position p
    blk = tl.sum(before.to(tl.int32), axis=1)
    local = p - tl.sum(tl.where(before, cn[None, :], 0), axis=1)
    rows = tl.load(idx_ptr + blk * BLOCK_C + local, mask=valid, other=0)  # [R] kept input indices
    if HAS_TVEC:
        t = tl.load(thr_ptr + rows, mask=valid, other=0.0)  # [R]
    else:
        t = tl.zeros([R], dtype=tl.float32) + thr
    offs_n = tl.arange(0, BLOCK_N)
    mn = offs_n < N
    if USE_DOT:
        v = tl.load(v_ptr + offs_n[:, None] * L + rows[None, :], mask=mn[:, None] & valid[None, :], other=0.0)
        v = v.to(tl.float32)  # [BN, R]
        v = tl.where(tl.abs(v) >= t[None, :], v, 0.0)  # each batch row keeps only its own inputs
        v = v.to(w_ptr.dtype.element_ty)
    else:
        v = tl.load(v_ptr + rows, mask=valid, other=0.0).to(tl.float32)  # [R]
        v = tl.where(tl.abs(v) >= t, v, 0.0)
    m_lo = c * cols
    m_hi = tl.minimum(m_lo + cols, M)
    m_hi = tl.where(g * R < total, m_hi, m_lo)  # groups past the kept count stream nothing
    wbase = w_ptr + rows.to(tl.int64)[:, None] * w_stride  # [R, 1]
    pbase = part_ptr + g.to(tl.int64) * N * out_w
    for m0 in range(m_lo, m_hi, BM):
        om = m0 + tl.arange(0, BM)  # [BM] output columns
        mm = om < m_hi
        wm = valid[:, None] & mm[None, :]
        w = tl.load(wbase + om[None, :], mask=wm, other=0.0)  # [R, BM]
        if PAIR:
            wq = tl.load(wbase + pair_off + om[None, :], mask=wm, other=0.0)
        if USE_DOT:
            om2 = mn[:, None] & mm[None, :]
            out = pbase + offs_n[:, None] * out_w + om[None, :]
            if IEEE:
                tl.store(out, tl.dot(v, w, input_precision="ieee"), mask=om2)
                if PAIR:
                    tl.store(out + pair_off, tl.dot(v, wq, input_precision="ieee"), mask=om2)
            else:
                tl.store(out, tl.dot(v, w), mask=om2)
                if PAIR:
                    tl.store(out + pair_off, tl.dot(v, wq), mask=om2)
        else:
            tl.store(pbase + om, tl.sum(v[:, None] * w.to(tl.float32), axis=0), mask=mm)
            if PAIR:
                tl.store(pbase + pair_off + om, tl.sum(v[:, None] * wq.to(tl.float32), axis=0), mask=mm)


@triton.jit
def _rows_at(p, hi, idx_ptr, cn, incl, BLOCK_C: tl.constexpr):
    """(input index [BK], valid [BK]) at positions p of a block-compacted kept list (device code)."""
    valid = p < hi
    before = incl[None, :] <= p[:, None]  # [BK, NBP] blocks wholly before position p
    blk = tl.sum(before.to(tl.int32), axis=1)
    local = p - tl.sum(tl.where(before, cn[None, :], 0), axis=1)
    return tl.load(idx_ptr + blk * BLOCK_C + local, mask=valid, other=0), valid


@triton.jit(do_not_specialize=["N", "L", "M", "NB", "thr", "pair_off", "out_w", "S"])
def _loop_kernel(
    v_ptr, w_ptr, idx_ptr, cnt_ptr, thr_ptr, part_ptr, N, L, M, NB, thr, w_stride, pair_off, out_w, S,
    HAS_TVEC: tl.constexpr, PAIR: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, NBP: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Program (m, s): columns m * BM .. of the kept rows in the s-th of S equal shares of the kept list,
    BK rows per step, the next step's row indices loaded one step ahead (no weight load waits on them)."""
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    cn, total = _kept_total(cnt_ptr, NB, NBP)
    incl = tl.cumsum(cn, 0)
    per = ((total + S - 1) // S + BK - 1) // BK * BK  # kept rows per share, whole steps
    k_lo = s * per
    k_hi = tl.minimum(k_lo + per, total)
    offs_m = pid_m * BM + tl.arange(0, BM)  # [BM] output columns
    mm = offs_m < M
    offs_n = tl.arange(0, BLOCK_N)
    mn = offs_n < N
    ok = tl.arange(0, BK)
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BM], dtype=tl.float32)
        acc_p = tl.zeros([BLOCK_N, BM], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BK, BM], dtype=tl.float32)  # reduced over the rows once, after the loop
        acc2_p = tl.zeros([BK, BM], dtype=tl.float32)
    rows, valid = _rows_at(k_lo + ok, k_hi, idx_ptr, cn, incl, BLOCK_C)
    for k0 in range(k_lo, k_hi, BK):
        rows_n, valid_n = _rows_at(k0 + BK + ok, k_hi, idx_ptr, cn, incl, BLOCK_C)  # the next step's rows
        if HAS_TVEC:
            t = tl.load(thr_ptr + rows, mask=valid, other=0.0)
        else:
            t = tl.zeros([BK], dtype=tl.float32) + thr
        wp = w_ptr + rows.to(tl.int64)[:, None] * w_stride + offs_m[None, :]
        wmask = valid[:, None] & mm[None, :]
        w = tl.load(wp, mask=wmask, other=0.0)  # [BK, BM]
        if PAIR:
            wq = tl.load(wp + pair_off, mask=wmask, other=0.0)
        if USE_DOT:
            v = tl.load(
                v_ptr + offs_n[:, None] * L + rows[None, :], mask=mn[:, None] & valid[None, :], other=0.0
            )
            v = v.to(tl.float32)  # [BN, BK]
            v = tl.where(tl.abs(v) >= t[None, :], v, 0.0).to(w.dtype)  # each batch row keeps its own inputs
            if IEEE:
                acc += tl.dot(v, w, input_precision="ieee")
                if PAIR:
                    acc_p += tl.dot(v, wq, input_precision="ieee")
            else:
                acc += tl.dot(v, w)
                if PAIR:
                    acc_p += tl.dot(v, wq)
        else:
            v = tl.load(v_ptr + rows, mask=valid, other=0.0).to(tl.float32)  # [BK]
            v = tl.where(tl.abs(v) >= t, v, 0.0)[:, None]
            acc2 += v * w.to(tl.float32)
            if PAIR:
                acc2_p += v * wq.to(tl.float32)
        rows, valid = rows_n, valid_n
    if not USE_DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
        acc_p = tl.sum(acc2_p, axis=0)[None, :]
    out = part_ptr + s.to(tl.int64) * N * out_w + offs_n[:, None] * out_w + offs_m[None, :]
    omask = mn[:, None] & mm[None, :]
    tl.store(out, acc, mask=omask)
    if PAIR:
        tl.store(out + pair_off, acc_p, mask=omask)


@triton.jit(do_not_specialize=["NB", "N", "F", "thr", "S_ALL"])
def _teal_mid_kernel(
    part_ptr, h_ptr, idx_ptr, cnt_ptr, thr_ptr, cin_ptr, NB, N, F, thr, S_ALL,
    HAS_TVEC: tl.constexpr, ACT: tl.constexpr, R: tl.constexpr, NBP: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    if R == 0:  # the loop kernel: every share wrote its partial
        S = S_ALL
    else:  # the strip kernel: groups past the kept count wrote nothing
        _, total = _kept_total(cin_ptr, NB, NBP)
        S = (total + R - 1) // R
    offs = b * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < F
    os_ = tl.arange(0, BLOCK_S)
    if HAS_TVEC:
        t = tl.load(thr_ptr + offs, mask=m, other=0.0)
    else:
        t = thr
    keep = tl.zeros([BLOCK_C], dtype=tl.int32)
    for n in range(0, N):
        g2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        u2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + os_
            base = part_ptr + ss.to(tl.int64)[:, None] * N * 2 * F + n * 2 * F + offs[None, :]  # [BS, BC]
            m2 = (ss < S)[:, None] & m[None, :]
            g2 += tl.load(base, mask=m2, other=0.0)
            u2 += tl.load(base + F, mask=m2, other=0.0)
        h = apply_act(tl.sum(g2, axis=0), ACT) * tl.sum(u2, axis=0)  # [BC]
        tl.store(h_ptr + n * F + offs, h, mask=m)
        keep = keep | ((tl.abs(h) >= t) & (h != 0.0) & m).to(tl.int32)
    pos = tl.cumsum(keep, 0) - 1
    tl.store(idx_ptr + b * BLOCK_C + pos, offs, mask=keep > 0)
    tl.store(cnt_ptr + b, tl.sum(keep, 0))


@triton.jit(do_not_specialize=["NB", "NM", "S_ALL"])
def _reduce_kernel(
    part_ptr, y_ptr, cnt_ptr, NB, NM, S_ALL, R: tl.constexpr, NBP: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """y = sum of the live partials of part [S, NM] (R > 0: groups past the kept count were never written)."""
    if R == 0:
        S = S_ALL
    else:
        _, total = _kept_total(cnt_ptr, NB, NBP)
        S = (total + R - 1) // R
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NM
    acc = tl.zeros([BLOCK_S, BLOCK], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        os_ = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(
            part_ptr + os_.to(tl.int64)[:, None] * NM + offs[None, :],
            mask=(os_ < S)[:, None] & m[None, :],
            other=0.0,
        )
    tl.store(y_ptr + offs, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------ launch


def stage_config(n: int, pair: bool) -> tuple[int, bool, dict]:
    """(BLOCK_N, USE_DOT, launch config) of a strip launch over n rows (``pair``: the gate/up stage).

    Example:
        >>> stage_config(1, True)[:2], stage_config(5, False)[:2]
        ((1, False), (16, True))
    """
    stage = "in" if pair else "out"
    if n == 1:
        return 1, False, dict(CONFIGS[f"{stage}_1"])
    return max(16, triton.next_power_of_2(n)), True, dict(CONFIGS[f"{stage}_n"])


def compact_block(length: int, base: int | None = None) -> int:
    """The compaction block for a list of ``length`` inputs: ``base`` (default CONFIGS["BLOCK_C"]), or
    larger when more than :data:`MAX_BLOCKS` blocks would be needed, and at most the padded length.

    Example:
        >>> compact_block(4096, 256), compact_block(100, 256), compact_block(1 << 20, 256)
        (256, 128, 4096)
    """
    block = max(int(base or CONFIGS["BLOCK_C"]), triton.next_power_of_2(triton.cdiv(length, MAX_BLOCKS)))
    return int(min(block, max(16, triton.next_power_of_2(length))))


def launch_compact(v: Tensor, thr: float | Tensor, block_c: int) -> tuple[Tensor, Tensor]:
    """Kept inputs of v [N, L] per block: (idx [NB * block_c] int32, cnt [NB] int32), on the device.

    Example:
        >>> idx, cnt = launch_compact(x2, 0.1, 256)  # doctest: +SKIP
    """
    n, length = v.shape
    nb = triton.cdiv(length, block_c)
    idx = torch.empty(nb * block_c, device=v.device, dtype=torch.int32)
    cnt = torch.empty(nb, device=v.device, dtype=torch.int32)
    tvec = isinstance(thr, Tensor)
    _compact_kernel[(nb,)](
        v, thr if tvec else cnt, idx, cnt, n, length, 0.0 if tvec else float(thr),
        HAS_TVEC=tvec, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return idx, cnt


def launch_product(
    v: Tensor,
    w: Tensor,
    idx: Tensor,
    cnt: Tensor,
    thr: float | Tensor,
    block_c: int,
    m: int,
    pair_off: int = 0,
) -> tuple[Tensor, int]:
    """Partial sums [S, N, out] float32 of thr(v)[:, kept] @ w[kept, :m] (and of the paired slice at
    ``pair_off``: out = 2m, the second half holding it), and R: with the strip kernel (R > 0) the partials
    of groups of R kept inputs, only the first ceil(kept / R) written; with the loop kernel (R = 0) one
    partial per share of the kept list, all written.

    Example:
        >>> part, r = launch_product(x2, w_t, idx, cnt, 0.1, 256, w_t.shape[1])  # doctest: +SKIP
    """
    n, length = v.shape
    nb = cnt.numel()
    bn, use_dot, cfg = stage_config(n, pair_off > 0)
    kind = cfg.pop("KIND")
    out_w = 2 * m if pair_off else m
    tvec = isinstance(thr, Tensor)
    nbp = max(2, triton.next_power_of_2(nb))
    common = dict(HAS_TVEC=tvec, PAIR=pair_off > 0, USE_DOT=use_dot, IEEE=w.dtype == torch.float32, BLOCK_N=bn,
                  NBP=nbp, BLOCK_C=block_c)  # fmt: skip
    t_ptr, t_val = (thr, 0.0) if tvec else (cnt, float(thr))
    if kind == "loop":
        bk, bm, waves = cfg.pop("BK"), cfg.pop("BM"), cfg.pop("WAVES")
        bm = min(bm, max(16, triton.next_power_of_2(m)))
        m_blocks = triton.cdiv(m, bm)
        shares = max(1, min(triton.cdiv(length, bk), triton.cdiv(waves * sm_count(v.device), m_blocks)))
        part = torch.empty(shares, n, out_w, device=v.device, dtype=torch.float32)  # [S, N, out]
        _loop_kernel[(m_blocks, shares)](
            v, w, idx, cnt, t_ptr, part, n, length, m, nb, t_val, w.stride(0), pair_off, out_w, shares,
            BK=bk, BM=bm, **common, **cfg,
        )  # fmt: skip
        return part, 0
    r, bm, cols = cfg.pop("R"), cfg.pop("BM"), cfg.pop("COLS")
    bm = min(bm, max(16, triton.next_power_of_2(m)))
    cols = triton.cdiv(min(cols, m), bm) * bm  # a whole number of steps per program
    groups = triton.cdiv(length, r)
    part = torch.empty(groups, n, out_w, device=v.device, dtype=torch.float32)  # [S, N, out]
    _strip_kernel[(triton.cdiv(m, cols), groups)](
        v, w, idx, cnt, t_ptr, part, n, length, m, nb, t_val, w.stride(0), pair_off, out_w, cols,
        R=r, BM=bm, **common, **cfg,
    )  # fmt: skip
    return part, r


def launch_reduce(part: Tensor, cnt: Tensor, r: int, out_dtype: torch.dtype) -> Tensor:
    """[S, N, M] float32 partial sums (see :func:`launch_product`: ``r`` its R, ``cnt`` the list's block
    counts) -> [N, M] in out_dtype, summing only the live partials.

    Example:
        >>> y = launch_reduce(part, cnt, 32, torch.bfloat16)  # doctest: +SKIP
    """
    s, n, m = part.shape
    y = torch.empty(n, m, device=part.device, dtype=out_dtype)
    block = 32 if n * m <= 16384 else 128  # many programs, one round trip (latency, not bytes)
    block_s = min(max(2, triton.next_power_of_2(s)), 8192 // block)
    nb = cnt.numel()
    _reduce_kernel[(triton.cdiv(n * m, block),)](
        part, y, cnt, nb, n * m, s, R=r, NBP=max(2, triton.next_power_of_2(nb)), BLOCK=block, BLOCK_S=block_s,
        num_warps=4,
    )  # fmt: skip
    return y


def sparse_input_linear(x: Tensor, w_t: Tensor, threshold: float | Tensor) -> Tensor:
    """TEAL linear (see :func:`ffnkit.kernels.sparse_input_linear`) on the GPU: compact, stream, reduce.

    Example:
        >>> sparse_input_linear(x, w_t, 0.1)  # doctest: +SKIP
    """
    n_in, n_out = w_t.shape
    x2 = x.reshape(-1, n_in).contiguous()  # [N, in]
    block_c = compact_block(n_in)
    idx, cnt = launch_compact(x2, threshold, block_c)
    part, r = launch_product(x2, w_t, idx, cnt, threshold, block_c, n_out)  # [S, N, out]
    return launch_reduce(part, cnt, r, x.dtype).reshape(*x.shape[:-1], n_out)


def launch_mid(
    gu: Tensor, cnt_in: Tensor, r_in: int, t_mid: float | Tensor, f: int, act: str
) -> tuple[Tensor, Tensor, Tensor, int]:
    """h = act(gate) * up [N, F] float32 from the gate/up partials, and its kept list (idx, cnt, block).

    Example:
        >>> h, idx_h, cnt_h, c_mid = launch_mid(gu, cnt, 32, 0.05, f, "silu")  # doctest: +SKIP
    """
    n = gu.shape[1]
    c_mid = compact_block(f, CONFIGS["MID_C"])
    nb_mid = triton.cdiv(f, c_mid)
    h = torch.empty(n, f, device=gu.device, dtype=torch.float32)  # [N, F]
    idx_h = torch.empty(nb_mid * c_mid, device=gu.device, dtype=torch.int32)
    cnt_h = torch.empty(nb_mid, device=gu.device, dtype=torch.int32)
    tvec = isinstance(t_mid, Tensor)
    s = gu.shape[0]
    nb_in = cnt_in.numel()
    _teal_mid_kernel[(nb_mid,)](
        gu, h, idx_h, cnt_h, t_mid if tvec else h, cnt_in, nb_in, n, f, 0.0 if tvec else float(t_mid), s,
        HAS_TVEC=tvec, ACT=ACT_CODES[act], R=r_in, NBP=max(2, triton.next_power_of_2(nb_in)),
        BLOCK_S=max(1, min(triton.next_power_of_2(s), 4096 // c_mid)), BLOCK_C=c_mid, num_warps=4,
    )  # fmt: skip
    return h, idx_h, cnt_h, c_mid


def teal_ffn(
    x: Tensor,
    gate_up_t: Tensor,
    down_t: Tensor,
    t_in: float | Tensor,
    t_mid: float | Tensor,
    act: str = "silu",
) -> Tensor:
    """TEAL on a whole gated FFN (see :func:`ffnkit.kernels.teal_ffn`) on the GPU, in five launches.

    Example:
        >>> teal_ffn(x, w.gate_up_t, w.down_t, 0.1, 0.05)  # doctest: +SKIP
    """
    f, d = down_t.shape
    x2 = x.reshape(-1, d).contiguous()  # [N, D]
    c_in = compact_block(d)
    idx, cnt = launch_compact(x2, t_in, c_in)
    gu, r_in = launch_product(x2, gate_up_t, idx, cnt, t_in, c_in, f, pair_off=f)  # [S, N, 2F]
    h, idx_h, cnt_h, c_mid = launch_mid(gu, cnt, r_in, t_mid, f, act)
    part, r_out = launch_product(h, down_t, idx_h, cnt_h, t_mid, c_mid, d)  # [S, N, D]
    return launch_reduce(part, cnt_h, r_out, x.dtype).reshape(x.shape)
