"""The ``triton`` backend of TEAL (input-sparse products): compact the kept inputs on the GPU, then read only
their rows of the input-major weights.

Why not mask inside one weight loop: a loop over every input row whose weight load is masked by the value
of x still walks every row and waits on x before each load; on an H200 (Llama-3-8B FFN, bf16) that path
ran 119 us at 50% of the bytes skipped against 100 us for the dense FFN (results/sparse_kernel_h200.json
before this module). Here each step reads only what it needs:

1. ``_compact_kernel``: per block of ``BLOCK_C`` columns of v [N, L], the columns some row keeps
   (|v| >= t and v != 0) are listed in order at idx[b * BLOCK_C:] and counted in cnt[b]. Blocks are
   independent (no global scan), so the compaction is one short parallel launch.
2. The product, one of two kernels (a stage config's ``KIND``), each writing float32 partial sums
   part[s, n, m], one per share s of the kept rows. ``_compact_rows_kernel`` ("blocks"): grid (output
   column blocks) x (compaction blocks); program (m, b) streams the rows idx[b * BLOCK_C + k], k < cnt[b],
   of W [L, M] (contiguous slices of BLOCK_M columns). ``_loop_kernel`` ("loop"): grid (output column
   blocks) x (S shares); program (m, s) takes the s-th of S equal shares of the whole kept list (found
   from the block counts by a prefix sum in registers, so the shares stay even whatever the blocks hold)
   and loads the next step's row indices one step ahead. Each row of v is thresholded again per batch
   row, so the union of the rows' active sets is read once and each row still sees only its own kept
   inputs. With ``PAIR`` a second slice at column offset F (the up half of ``gate_up_t``) is read with
   the first (the gate half).
3. ``_teal_mid_kernel`` (whole FFN): sums the gate/up partials, h = act(gate) * up, writes h [N, F] and
   compacts the kept h per block for the down product; ``launch_reduce`` sums the down partials.

Measured on an H200 (Llama-3-8B FFN, bf16, batch 1, 50% of the bytes skipped; the bound is 42 us): "blocks"
81.1 us (results/sparse_kernel_h200.json); "loop" 84.9 us with its fastest configs
(results/sparse_kernel_h200_tealfast.json: gate/up 49.7 us against a 28 us bound, down 28.8 us against
14 us); a third kernel that streamed column strips of R kept rows per program, since removed, 100.4 us
(results/sparse_kernel_h200_tealfast_strip.json). Every product ran at about half the copy bandwidth, so
"blocks" stays the default and the target (within 1.25x of the bound) is not reached.

No host synchronisation and fixed shapes: the counts stay on the device (each program reads its own), so the
whole FFN can be captured in a CUDA graph. Thresholds are a number or a float32 tensor, one per input.

Example:
    >>> y = teal_ffn(x, gate_up_t, down_t, 0.1, 0.05)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffnkit.kernels.triton_sparse_ffn import ACT_CODES, apply_act, launch_reduce, pdl_args, pdl_wait, sm_count

# Launch parameters per stage ("in": the gate/up product, PAIR; "out": the down product and
# sparse_input_linear) and batch class ("1": one row on the CUDA cores, "n": rows padded to 16 through tl.dot).
# KIND "blocks": BLOCK_K rows per step, BLOCK_M columns per program, the compaction block a power of two in
# [MIN_C, MAX_C] giving about WAVES programs per multiprocessor. KIND "loop": BLOCK_K rows per step, BLOCK_M
# columns per program, about WAVES programs per multiprocessor, the compaction block BLOCK_C. The "blocks"
# values are the fastest of `benchmarks/sparse_kernel.py --sweep teal` on an H200 (Llama-3-8B FFN, bf16, 50%
# skipped; results/sparse_kernel_h200.json "sweep_teal"): batch 1 in 80.4 us against 84-139 us for the six
# other configs tried, batch 8 in 134.9 us against 138-280 us; no "loop" config beat them
# (results/sparse_kernel_h200_tealfast.json: 83-126 us at batch 1, 150-236 us at batch 8).
CONFIGS: dict[str, dict | int] = {
    "in_1": {"KIND": "blocks", "BLOCK_K": 32, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "WAVES": 12},
    "out_1": {"KIND": "blocks", "BLOCK_K": 32, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "WAVES": 12},
    "in_n": {"KIND": "blocks", "BLOCK_K": 16, "BLOCK_M": 256, "num_warps": 4, "num_stages": 3, "WAVES": 8},
    "out_n": {"KIND": "blocks", "BLOCK_K": 16, "BLOCK_M": 256, "num_warps": 4, "num_stages": 3, "WAVES": 8},
    "MIN_C": 64,
    "MAX_C": 4096,
    "BLOCK_C": 256,
}
MAX_BLOCKS = 256  # "loop": compaction blocks per list at most (its prefix sum spans them all)


@triton.jit(do_not_specialize=["N", "L", "thr"])
def _compact_kernel(
    v_ptr,
    thr_ptr,
    idx_ptr,
    cnt_ptr,
    N,
    L,
    thr,
    HAS_TVEC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
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
    pos = tl.cumsum(keep, 0) - 1  # [BC] slot of each kept column within the block
    tl.store(idx_ptr + b * BLOCK_C + pos, offs, mask=keep > 0)
    tl.store(cnt_ptr + b, tl.sum(keep, 0))


@triton.jit(do_not_specialize=["N", "L", "M", "thr", "pair_off", "out_w"])
def _compact_rows_kernel(
    v_ptr, w_ptr, idx_ptr, cnt_ptr, thr_ptr, part_ptr, N, L, M, thr, w_stride, pair_off, out_w,
    HAS_TVEC: tl.constexpr, PAIR: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(PDL)
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] output columns
    mm = offs_m < M
    offs_n = tl.arange(0, BLOCK_N)
    mn = offs_n < N
    cnt = tl.load(cnt_ptr + b)
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_p = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)  # reduced over k once, after the loop
        acc2_p = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, cnt, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        mk = ok < cnt
        rows = tl.load(idx_ptr + b * BLOCK_C + ok, mask=mk, other=0)  # [BK] kept input columns
        v = tl.load(v_ptr + offs_n[:, None] * L + rows[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        v = v.to(tl.float32)  # [BN, BK]
        if HAS_TVEC:
            t = tl.load(thr_ptr + rows, mask=mk, other=0.0)[None, :]
        else:
            t = thr
        v = tl.where(tl.abs(v) >= t, v, 0.0)  # each batch row keeps only its own inputs
        wp = w_ptr + rows.to(tl.int64)[:, None] * w_stride + offs_m[None, :]
        wmask = mk[:, None] & mm[None, :]
        w = tl.load(wp, mask=wmask, other=0.0)  # [BK, BM]
        if PAIR:
            wq = tl.load(wp + pair_off, mask=wmask, other=0.0)
        if USE_DOT:
            if IEEE:
                acc += tl.dot(v.to(w.dtype), w, input_precision="ieee")
                if PAIR:
                    acc_p += tl.dot(v.to(w.dtype), wq, input_precision="ieee")
            else:
                acc += tl.dot(v.to(w.dtype), w)
                if PAIR:
                    acc_p += tl.dot(v.to(w.dtype), wq)
        else:
            vt = tl.trans(v)  # [BK, 1]
            acc2 += vt * w.to(tl.float32)
            if PAIR:
                acc2_p += vt * wq.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
        acc_p = tl.sum(acc2_p, axis=0)[None, :]
    out = part_ptr + b * N * out_w + offs_n[:, None] * out_w + offs_m[None, :]
    omask = mn[:, None] & mm[None, :]
    tl.store(out, acc, mask=omask)
    if PAIR:
        tl.store(out + pair_off, acc_p, mask=omask)


@triton.jit
def _kept_total(cnt_ptr, NB, NBP: tl.constexpr):
    """(counts [NBP] int32, total kept) of a block-compacted list (device code)."""
    ob = tl.arange(0, NBP)
    cn = tl.load(cnt_ptr + ob, mask=ob < NB, other=0)
    return cn, tl.sum(cn, 0)


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
    PDL: tl.constexpr,
):  # fmt: skip
    """Program (m, s): columns m * BM .. of the kept rows in the s-th of S equal shares of the kept list,
    BK rows per step, the next step's row indices loaded one step ahead (no weight load waits on them)."""
    pdl_wait(PDL)
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


@triton.jit(do_not_specialize=["S", "N", "F", "thr"])
def _teal_mid_kernel(
    part_ptr, h_ptr, idx_ptr, cnt_ptr, thr_ptr, S, N, F, thr,
    HAS_TVEC: tl.constexpr, ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(PDL)
    b = tl.program_id(0)
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
            base = part_ptr + ss[:, None] * N * 2 * F + n * 2 * F + offs[None, :]  # [BS, BC]
            m2 = (ss < S)[:, None] & m[None, :]
            g2 += tl.load(base, mask=m2, other=0.0)
            u2 += tl.load(base + F, mask=m2, other=0.0)
        h = apply_act(tl.sum(g2, axis=0), ACT) * tl.sum(u2, axis=0)  # [BC]
        tl.store(h_ptr + n * F + offs, h, mask=m)
        keep = keep | ((tl.abs(h) >= t) & (h != 0.0) & m).to(tl.int32)
    pos = tl.cumsum(keep, 0) - 1
    tl.store(idx_ptr + b * BLOCK_C + pos, offs, mask=keep > 0)
    tl.store(cnt_ptr + b, tl.sum(keep, 0))


# ------------------------------------------------------------------------------------------------ launch


def stage_config(n: int, pair: bool) -> tuple[int, bool, dict]:
    """(BLOCK_N, USE_DOT, launch config) of a product over n rows (``pair``: the gate/up stage).

    Example:
        >>> stage_config(1, True)[:2], stage_config(5, False)[:2]
        ((1, False), (16, True))
    """
    stage = "in" if pair else "out"
    if n == 1:
        return 1, False, dict(CONFIGS[f"{stage}_1"])
    return max(16, triton.next_power_of_2(n)), True, dict(CONFIGS[f"{stage}_n"])


def compact_block(length: int, m_blocks: int, waves: int, device: torch.device) -> int:
    """ "blocks": the compaction block (a power of two) that gives about ``waves`` programs per multiprocessor.

    Example:
        >>> compact_block(4096, 32, 4, torch.device("cpu"))  # 4 SMs under the interpreter
        4096
    """
    want = max(1, triton.cdiv(waves * sm_count(device), m_blocks))  # compaction blocks wanted
    block = triton.next_power_of_2(max(1, triton.cdiv(length, want)))
    return int(min(max(block, CONFIGS["MIN_C"]), CONFIGS["MAX_C"], max(16, triton.next_power_of_2(length))))


def list_block(length: int) -> int:
    """ "loop": the compaction block, CONFIGS["BLOCK_C"] or larger where more than :data:`MAX_BLOCKS` blocks
    would be needed, and at most the padded length.

    Example:
        >>> list_block(4096), list_block(100), list_block(1 << 20)  # with BLOCK_C 256
        (256, 128, 4096)
    """
    block = max(int(CONFIGS["BLOCK_C"]), triton.next_power_of_2(triton.cdiv(length, MAX_BLOCKS)))
    return int(min(block, max(16, triton.next_power_of_2(length))))


def block_for(length: int, m: int, n: int, pair: bool, device: torch.device) -> int:
    """The compaction block of a product over ``length`` inputs into ``m`` outputs for n rows.

    Example:
        >>> block_for(4096, 14336, 1, True, torch.device("cuda"))  # doctest: +SKIP
        1024
    """
    _, _, cfg = stage_config(n, pair)
    if cfg["KIND"] == "loop":
        return list_block(length)
    bm = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(m)))
    return compact_block(length, triton.cdiv(m, bm), cfg["WAVES"], device)


def launch_compact(v: Tensor, thr: float | Tensor, block_c: int) -> tuple[Tensor, Tensor]:
    """Kept columns of v [N, L] per block: (idx [NB * block_c] int32, cnt [NB] int32), on the device.

    Example:
        >>> idx, cnt = launch_compact(x2, 0.1, 512)  # doctest: +SKIP
    """
    n, length = v.shape
    nb = triton.cdiv(length, block_c)
    idx = torch.empty(nb * block_c, device=v.device, dtype=torch.int32)
    cnt = torch.empty(nb, device=v.device, dtype=torch.int32)
    tvec = isinstance(thr, Tensor)
    _compact_kernel[(nb,)](
        v, thr if tvec else cnt, idx, cnt, n, length, 0.0 if tvec else float(thr),
        HAS_TVEC=tvec, BLOCK_C=block_c, **pdl_args(v.device), num_warps=4,
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
) -> Tensor:
    """Partial sums [S, N, out] float32 of thr(v)[:, kept] @ w[kept, :m] (and of the paired slice at
    ``pair_off``: out = 2m, the second half holding it), one per share of the kept rows (a compaction
    block for "blocks", an equal share of the whole list for "loop").

    Example:
        >>> part = launch_product(x2, w_t, idx, cnt, 0.1, 512, w_t.shape[1])  # doctest: +SKIP
    """
    n, length = v.shape
    nb = cnt.numel()
    bn, use_dot, cfg = stage_config(n, pair_off > 0)
    kind, bk, bm, waves = cfg.pop("KIND"), cfg.pop("BLOCK_K"), cfg.pop("BLOCK_M"), cfg.pop("WAVES")
    bm = min(bm, max(16, triton.next_power_of_2(m)))
    m_blocks = triton.cdiv(m, bm)
    out_w = 2 * m if pair_off else m
    tvec = isinstance(thr, Tensor)
    t_ptr, t_val = (thr, 0.0) if tvec else (cnt, float(thr))
    flags = dict(
        HAS_TVEC=tvec,
        PAIR=pair_off > 0,
        USE_DOT=use_dot,
        IEEE=w.dtype == torch.float32,
        BLOCK_N=bn,
        **pdl_args(v.device),
    )
    if kind == "loop":
        shares = max(1, min(triton.cdiv(length, bk), triton.cdiv(waves * sm_count(v.device), m_blocks)))
        part = torch.empty(shares, n, out_w, device=v.device, dtype=torch.float32)  # [S, N, out]
        _loop_kernel[(m_blocks, shares)](
            v, w, idx, cnt, t_ptr, part, n, length, m, nb, t_val, w.stride(0), pair_off, out_w, shares,
            BK=bk, BM=bm, NBP=max(2, triton.next_power_of_2(nb)), BLOCK_C=block_c, **flags, **cfg,
        )  # fmt: skip
        return part
    part = torch.empty(nb, n, out_w, device=v.device, dtype=torch.float32)  # [NB, N, out]
    _compact_rows_kernel[(m_blocks, nb)](
        v, w, idx, cnt, thr if tvec else part, part, n, length, m, t_val, w.stride(0), pair_off, out_w,
        BLOCK_K=bk, BLOCK_M=bm, BLOCK_C=block_c, **flags, **cfg,
    )  # fmt: skip
    return part


def launch_mid(gu: Tensor, t_mid: float | Tensor, c_mid: int, act: str) -> tuple[Tensor, Tensor, Tensor]:
    """h = act(gate) * up [N, F] float32 from the gate/up partials gu [S, N, 2F], and its kept list per
    block of ``c_mid`` (idx, cnt).

    Example:
        >>> h, idx_h, cnt_h = launch_mid(gu, 0.05, 1024, "silu")  # doctest: +SKIP
    """
    s, n, f2 = gu.shape
    f = f2 // 2
    nb_mid = triton.cdiv(f, c_mid)
    h = torch.empty(n, f, device=gu.device, dtype=torch.float32)  # [N, F]
    idx_h = torch.empty(nb_mid * c_mid, device=gu.device, dtype=torch.int32)
    cnt_h = torch.empty(nb_mid, device=gu.device, dtype=torch.int32)
    tvec = isinstance(t_mid, Tensor)
    _teal_mid_kernel[(nb_mid,)](
        gu, h, idx_h, cnt_h, t_mid if tvec else h, s, n, f, 0.0 if tvec else float(t_mid),
        HAS_TVEC=tvec, ACT=ACT_CODES[act], BLOCK_S=max(1, min(triton.next_power_of_2(s), 4096 // c_mid)),
        BLOCK_C=c_mid, **pdl_args(gu.device), num_warps=8,
    )  # fmt: skip
    return h, idx_h, cnt_h


def sparse_input_linear(x: Tensor, w_t: Tensor, threshold: float | Tensor) -> Tensor:
    """TEAL linear (see :func:`ffnkit.kernels.sparse_input_linear`) on the GPU: compact, stream, reduce.

    Example:
        >>> sparse_input_linear(x, w_t, 0.1)  # doctest: +SKIP
    """
    n_in, n_out = w_t.shape
    x2 = x.reshape(-1, n_in).contiguous()  # [N, in]
    block_c = block_for(n_in, n_out, x2.shape[0], False, x2.device)
    idx, cnt = launch_compact(x2, threshold, block_c)
    part = launch_product(x2, w_t, idx, cnt, threshold, block_c, n_out)  # [S, N, out]
    return launch_reduce(part, x.dtype).reshape(*x.shape[:-1], n_out)


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
    n = x2.shape[0]
    c_in = block_for(d, f, n, True, x2.device)
    idx, cnt = launch_compact(x2, t_in, c_in)
    gu = launch_product(x2, gate_up_t, idx, cnt, t_in, c_in, f, pair_off=f)  # [S, N, 2F]
    c_mid = block_for(f, d, n, False, x2.device)
    h, idx_h, cnt_h = launch_mid(gu, t_mid, c_mid, act)
    part = launch_product(h, down_t, idx_h, cnt_h, t_mid, c_mid, d)  # [S, N, D]
    return launch_reduce(part, x.dtype).reshape(x.shape)
