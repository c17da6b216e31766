"""The ``triton`` backend of TEAL (input-sparse products): compact the kept inputs on the GPU, then read only
their rows of the input-major weights.

Why not mask inside one weight loop: a loop over every input row whose weight load is masked by the value
of x still walks every row and waits on x before each load; on an H200 (Llama-3-8B FFN, bf16) that path
ran 119 us at 50% of the bytes skipped against 100 us for the dense FFN (results/sparse_kernel_h200.json
before this module). Here each step reads only what it needs:

1. ``_compact_kernel``: per block of ``BLOCK_C`` columns of v [N, L], the columns some row keeps
   (|v| >= t and v != 0) are listed in order at idx[b * BLOCK_C:] and counted in cnt[b]. Blocks are
   independent (no global scan), so the compaction is one short parallel launch.
2. ``_compact_rows_kernel``: grid (output column blocks) x (compaction blocks); program (m, b) streams the
   rows idx[b * BLOCK_C + k], k < cnt[b], of W [L, M] (contiguous slices of BLOCK_M columns) and writes a
   float32 partial sum part[b, n, m]. Each row of v is thresholded again per batch row, so the union of the
   rows' active sets is read once and each row still sees only its own kept inputs. With ``PAIR`` a second
   slice at column offset F (the up half of ``gate_up_t``) is read with the first (the gate half).
3. ``_teal_mid_kernel`` (whole FFN): sums the gate/up partials, h = act(gate) * up, writes h [N, F] and
   compacts the kept h per block for the down product; ``launch_reduce`` sums the down partials.

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

from ffnkit.kernels.triton_sparse_ffn import ACT_CODES, apply_act, launch_reduce, sm_count

# Launch parameters per batch class ("1": one row on the CUDA cores, "n": rows padded to 16 through
# tl.dot). WAVES: target programs per multiprocessor, which sets the compaction block (a power of two in
# [MIN_C, MAX_C]). The values are the fastest of `benchmarks/sparse_kernel.py --sweep teal` on an H200
# (Llama-3-8B FFN, bf16, 50% skipped; results/sparse_kernel_h200.json "sweep_teal"): batch 1 in 80.4 us
# against 84-139 us for the six other configs tried, batch 8 in 134.9 us against 138-280 us.
CONFIGS: dict[str, dict] = {
    "rows_1": {"BLOCK_K": 32, "BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "WAVES": 12},
    "rows_n": {"BLOCK_K": 16, "BLOCK_M": 256, "num_warps": 4, "num_stages": 3, "WAVES": 8},
    "MIN_C": 64,
    "MAX_C": 4096,
}


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
    pos = tl.cumsum(keep, 0) - 1  # [BC] slot of each kept column within the block
    tl.store(idx_ptr + b * BLOCK_C + pos, offs, mask=keep > 0)
    tl.store(cnt_ptr + b, tl.sum(keep, 0))


@triton.jit(do_not_specialize=["N", "L", "M", "thr", "pair_off", "out_w"])
def _compact_rows_kernel(
    v_ptr, w_ptr, idx_ptr, cnt_ptr, thr_ptr, part_ptr, N, L, M, thr, w_stride, pair_off, out_w,
    HAS_TVEC: tl.constexpr, PAIR: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
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


@triton.jit(do_not_specialize=["S", "N", "F", "thr"])
def _teal_mid_kernel(
    part_ptr, h_ptr, idx_ptr, cnt_ptr, thr_ptr, S, N, F, thr,
    HAS_TVEC: tl.constexpr, ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
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


def _batch(n: int) -> tuple[int, bool, dict]:
    """(BLOCK_N, USE_DOT, config) for n rows."""
    if n == 1:
        return 1, False, dict(CONFIGS["rows_1"])
    return max(16, triton.next_power_of_2(n)), True, dict(CONFIGS["rows_n"])


def compact_block(length: int, m_blocks: int, waves: int, device: torch.device) -> int:
    """The compaction block (a power of two) that gives about ``waves`` programs per multiprocessor.

    Example:
        >>> compact_block(4096, 32, 4, torch.device("cpu"))  # 4 SMs under the interpreter
        4096
    """
    want = max(1, triton.cdiv(waves * sm_count(device), m_blocks))  # compaction blocks wanted
    block = triton.next_power_of_2(max(1, triton.cdiv(length, want)))
    return int(min(max(block, CONFIGS["MIN_C"]), CONFIGS["MAX_C"], max(16, triton.next_power_of_2(length))))


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
        HAS_TVEC=tvec, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return idx, cnt


def launch_compact_rows(
    v: Tensor,
    w: Tensor,
    idx: Tensor,
    cnt: Tensor,
    thr: float | Tensor,
    block_c: int,
    m: int,
    pair_off: int = 0,
) -> Tensor:
    """Partial sums [NB, N, out] float32 of thr(v)[:, kept] @ w[kept, :m] (and of the paired slice at
    ``pair_off``: out = 2m, the second half holding it), one per compaction block.

    Example:
        >>> part = launch_compact_rows(x2, w_t, idx, cnt, 0.1, 512, w_t.shape[1])  # doctest: +SKIP
    """
    n, length = v.shape
    nb = cnt.numel()
    bn, use_dot, cfg = _batch(n)
    bk, bm = cfg.pop("BLOCK_K"), cfg.pop("BLOCK_M")
    cfg.pop("WAVES")
    bm = min(bm, max(16, triton.next_power_of_2(m)))
    out_w = 2 * m if pair_off else m
    part = torch.empty(nb, n, out_w, device=v.device, dtype=torch.float32)  # [NB, N, out]
    tvec = isinstance(thr, Tensor)
    _compact_rows_kernel[(triton.cdiv(m, bm), nb)](
        v, w, idx, cnt, thr if tvec else part, part, n, length, m, 0.0 if tvec else float(thr), w.stride(0),
        pair_off, out_w, HAS_TVEC=tvec, PAIR=pair_off > 0, USE_DOT=use_dot, IEEE=w.dtype == torch.float32,
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, BLOCK_C=block_c, **cfg,
    )  # fmt: skip
    return part


def _block_for(length: int, m: int, n: int, device: torch.device) -> int:
    _, _, cfg = _batch(n)
    bm = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(m)))
    return compact_block(length, triton.cdiv(m, bm), cfg["WAVES"], device)


def sparse_input_linear(x: Tensor, w_t: Tensor, threshold: float | Tensor) -> Tensor:
    """TEAL linear (see :func:`ffnkit.kernels.sparse_input_linear`) on the GPU: compact, stream, reduce.

    Example:
        >>> sparse_input_linear(x, w_t, 0.1)  # doctest: +SKIP
    """
    n_in, n_out = w_t.shape
    x2 = x.reshape(-1, n_in).contiguous()  # [N, in]
    block_c = _block_for(n_in, n_out, x2.shape[0], x2.device)
    idx, cnt = launch_compact(x2, threshold, block_c)
    part = launch_compact_rows(x2, w_t, idx, cnt, threshold, block_c, n_out)  # [NB, N, out]
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
    c_in = _block_for(d, f, n, x2.device)
    idx, cnt = launch_compact(x2, t_in, c_in)
    gu = launch_compact_rows(x2, gate_up_t, idx, cnt, t_in, c_in, f, pair_off=f)  # [NB, N, 2F]
    c_mid = _block_for(f, d, n, x2.device)
    nb_mid = triton.cdiv(f, c_mid)
    h = torch.empty(n, f, device=x.device, dtype=torch.float32)  # [N, F]
    idx_h = torch.empty(nb_mid * c_mid, device=x.device, dtype=torch.int32)
    cnt_h = torch.empty(nb_mid, device=x.device, dtype=torch.int32)
    tvec = isinstance(t_mid, Tensor)
    s = gu.shape[0]
    _teal_mid_kernel[(nb_mid,)](
        gu, h, idx_h, cnt_h, t_mid if tvec else h, s, n, f, 0.0 if tvec else float(t_mid),
        HAS_TVEC=tvec, ACT=ACT_CODES[act], BLOCK_S=max(1, min(triton.next_power_of_2(s), 4096 // c_mid)),
        BLOCK_C=c_mid, num_warps=8,
    )  # fmt: skip
    part = launch_compact_rows(h, down_t, idx_h, cnt_h, t_mid, c_mid, d)  # [NB, N, D]
    return launch_reduce(part, x.dtype).reshape(x.shape)
