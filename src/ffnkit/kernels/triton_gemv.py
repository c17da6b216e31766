"""The ``triton`` backend of :func:`ffnkit.kernels.gemv`: y = x W^T for one to a few rows (decode), bf16 or
float32 weights, float32 accumulation (imported only when a CUDA tensor takes this path).

At batch 1 a linear layer is bound by reading W once; cuBLAS's GEMV for the attention projections of a
Llama-3-8B layer ([6144, 4096] q/k/v fused and [4096, 4096] o, bf16) ran at about 70% of the copy bandwidth
on an H200 (benchmarks/results/sparsity_decode_h200_profile.json: 28.5 us a layer against a 19.7 us bound).
These kernels took 26.0 us a layer in the same decode (832.8 us a token over 64 launches,
sparsity_decode_h200_gemv.json's profile): 76% of the bandwidth, a 2.7% faster dense step (not the 89% of
the gather kernel; a persistent grid was slower still, 26.2 us on [6144, 4096], gemv_kernel_h200_rows.json).
Two kernels, both one launch per product with no split of K, no atomics and no host sync (CUDA-graph
capturable), multiplying on the CUDA cores in float32:
- ``_gemv_rows_kernel`` (one row, K <= MAX_K): each program loads x once into registers, then streams whole
  rows of W, BLOCK_O at a time (the layout of ffnkit's fused gather kernel, which reads at 89% of the copy
  bandwidth); a persistent grid (PROGRAMS_PER_SM > 0) or one program per block of rows.
- ``_gemv_kernel`` (up to MAX_ROWS rows, any K): each program owns BLOCK_O rows of W and streams them in
  BLOCK_K chunks into a [rows, BLOCK_O, BLOCK_K] float32 accumulator summed once after the loop.

With ``NORM`` (:func:`rms_norm_gemv`) the kernels also add ``residual`` to x (program 0 writes the sum), and
multiply by the RMSNorm of that sum: the rows kernel normalises its x once (rounded to x's dtype, as the
unfused ``rms_norm`` returns it), the chunked one accumulates the sum of squares in the same pass and scales
its result at the end. That is the residual add and RMSNorm in front of the q/k/v projection in one launch.
In the 8B decode it did not pay: 4.638-4.738 ms/token with the fused q/k/v against 4.571 without (the
compiled add + norm it replaces is one short launch; every program re-reads x and the residual from L2).

Inside :func:`ffnkit.kernels.programmatic_launch` (programmatic dependent launch, sm90+) the chunked kernel loads its
first chunk of W (``CONFIGS["chunks"]["PREFETCH"]``: 1; 2 was slower) before it waits for the previous
kernel, and the rows kernel waits first thing (results/sparsity_decode_h200_pdl*.json).

Example:
    >>> import torch  # doctest: +SKIP
    >>> from ffnkit.kernels.triton_gemv import gemv
    >>> gemv(torch.randn(1, 64, device="cuda"), torch.randn(96, 64, device="cuda")).shape
    torch.Size([1, 96])
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffnkit.kernels.dense_gemv import linear_torch, rms_norm_linear_torch  # more rows: the torch backend
from ffnkit.kernels.triton_sparse_ffn import pdl_args, pdl_wait, sm_count

# Launch parameters. A single row takes CONFIGS["path"]: "chunks" (_gemv_kernel, any K) or "rows"
# (_gemv_rows_kernel: whole rows of W, x held in registers, K <= MAX_K; PROGRAMS_PER_SM 0 = one program per
# block of rows, else a persistent grid). Chunks of 8 rows x 512 won the H200 decode trial of
# benchmarks/sparsity_decode_gpu.py (Llama-3-8B shape, results/sparsity_decode_h200_gemv.json: 4.571
# ms/token against 4.581-5.128 for the other configs and 4.700 for cuBLAS); alone (gemv_kernel_h200*.json)
# it takes 14.97 us on [6144, 4096] (cuBLAS 15.9-16.3) and 11.4 us on [4096, 4096] (cuBLAS 13.2). MAX_ROWS:
# more rows go to cuBLAS (F.linear): at 4 rows the chunked kernel took 25.6 / 17.9 us against cuBLAS's
# 15.9 / 13.2 us (gemv_kernel_h200.json). MAX_ACC caps BLOCK_N * BLOCK_O * BLOCK_K (accumulator size).
CONFIGS: dict = {
    "path": "chunks",
    # PREFETCH: chunks of W loaded before the wait under programmatic dependent launch (1 or 2)
    "chunks": {"BLOCK_O": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3, "MAX_ACC": 8192, "PREFETCH": 1},
    "rows": {"BLOCK_O": 2, "num_warps": 8, "PROGRAMS_PER_SM": 0, "MAX_K": 8192},
    "MAX_ROWS": 1,
}


@triton.jit
def _gemv_chunk(acc, ss, w, ok, mk, on, mn, x_ptr, res_ptr, nw_ptr, h_ptr, K, pid, NORM: tl.constexpr,
                RES: tl.constexpr):  # fmt: skip
    """Accumulate one [BO, BK] chunk ``w`` of W against x's chunk ``ok`` (device code): (acc, ss)."""
    m = mn[:, None] & mk[None, :]
    xv = tl.load(x_ptr + on[:, None] * K + ok[None, :], mask=m, other=0.0)  # [BN, BK]
    if RES:  # the residual sum rounded to x's dtype, as the unfused add returns it
        rv = tl.load(res_ptr + on[:, None] * K + ok[None, :], mask=m, other=0.0)
        xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + on[:, None] * K + ok[None, :], xv, mask=m & (pid == 0))
    xf = xv.to(tl.float32)
    if NORM:
        ss += xf * xf
        xf = xf * tl.load(nw_ptr + ok, mask=mk, other=0.0).to(tl.float32)[None, :]
    acc += xf[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc, ss


@triton.jit(do_not_specialize=["N", "eps"])
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, res_ptr, nw_ptr, h_ptr, N, K, M, stride_w, eps,
    NORM: tl.constexpr, RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """y[n, o] = sum_k xin[n, k] * w[o, k] for the BLOCK_O rows o of this program (x, y, residual and h are
    contiguous [N, K] / [N, M]; w has unit column stride). With NORM, xin = (x + res) * nw and the sum is
    scaled by rstd at the end (1 / rms of x + res, accumulated in the same pass). With PDL the first
    PREFETCH (1 or 2) chunks of W are loaded before waiting for the previous kernel."""
    pid = tl.program_id(0)
    oo = pid * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO] output rows of this program
    mo = oo < M
    on = tl.arange(0, BLOCK_N)
    mn = on < N
    w_rows = w_ptr + oo.to(tl.int64)[:, None] * stride_w  # [BO, 1]
    ss = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_O, BLOCK_K], dtype=tl.float32)
    k_first = 0
    if PDL:
        ok = tl.arange(0, BLOCK_K)
        mk = ok < K
        w = tl.load(w_rows + ok[None, :], mask=mo[:, None] & mk[None, :], other=0.0)  # [BO, BK]
        if PREFETCH > 1:
            ok2 = BLOCK_K + tl.arange(0, BLOCK_K)
            mk2 = ok2 < K
            w2 = tl.load(w_rows + ok2[None, :], mask=mo[:, None] & mk2[None, :], other=0.0)
        pdl_wait(PDL)
        acc, ss = _gemv_chunk(acc, ss, w, ok, mk, on, mn, x_ptr, res_ptr, nw_ptr, h_ptr, K, pid, NORM, RES)
        k_first = BLOCK_K
        if PREFETCH > 1:
            acc, ss = _gemv_chunk(
                acc, ss, w2, ok2, mk2, on, mn, x_ptr, res_ptr, nw_ptr, h_ptr, K, pid, NORM, RES
            )
            k_first = 2 * BLOCK_K
    for k0 in range(k_first, K, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        mk = ok < K
        w = tl.load(w_rows + ok[None, :], mask=mo[:, None] & mk[None, :], other=0.0)  # [BO, BK]
        acc, ss = _gemv_chunk(acc, ss, w, ok, mk, on, mn, x_ptr, res_ptr, nw_ptr, h_ptr, K, pid, NORM, RES)
    y = tl.sum(acc, axis=2)  # [BN, BO]
    if NORM:
        y = y / tl.sqrt(tl.sum(ss, axis=1) / K + eps)[:, None]
    tl.store(
        y_ptr + on[:, None] * M + oo[None, :], y.to(y_ptr.dtype.element_ty), mask=mn[:, None] & mo[None, :]
    )


@triton.jit(do_not_specialize=["n_blocks", "eps"])
def _gemv_rows_kernel(
    x_ptr, w_ptr, y_ptr, res_ptr, nw_ptr, h_ptr, K, M, stride_w, eps, n_blocks,
    NORM: tl.constexpr, RES: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One row x [K] (BLOCK_K >= K): the program loads x once (normalised with NORM, rounded to x's dtype
    as the unfused rms_norm returns it), then streams whole rows of W, BLOCK_O at a time, over the blocks
    pid, pid + G, ... (the same layout as the fused gather kernel's neurons)."""
    pdl_wait(PDL)
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    ok = tl.arange(0, BLOCK_K)
    mk = ok < K
    xv = tl.load(x_ptr + ok, mask=mk, other=0.0)  # [BK]
    if RES:
        rv = tl.load(res_ptr + ok, mask=mk, other=0.0)
        xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + ok, xv, mask=mk & (pid == 0))
    xf = xv.to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)
        nw = tl.load(nw_ptr + ok, mask=mk, other=0.0).to(tl.float32)
        xf = (xf * rstd * nw).to(x_ptr.dtype.element_ty).to(tl.float32)
    for blk in range(pid, n_blocks, n_prog):
        oo = blk * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
        mo = oo < M
        w = tl.load(
            w_ptr + oo.to(tl.int64)[:, None] * stride_w + ok[None, :],
            mask=mo[:, None] & mk[None, :],
            other=0.0,
        )
        y = tl.sum(w.to(tl.float32) * xf[None, :], axis=1)  # [BO]
        tl.store(y_ptr + oo, y.to(y_ptr.dtype.element_ty), mask=mo)


def launch(
    x2: Tensor,
    weight: Tensor,
    norm: tuple[Tensor, float] | None = None,
    residual: Tensor | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(y [N, M] in x's dtype, x2 + residual [N, K] or None) for x2 [N, K], weight [M, K].

    ``norm`` = (RMSNorm weight [K], eps): the product of the normalised (x2 + residual) instead of x2.
    ``config`` overrides :data:`CONFIGS` for this call: ``path`` and that path's launch parameters.

    Example:
        >>> y, _ = launch(x2, weight)  # doctest: +SKIP
    """
    n, k = x2.shape
    m = weight.shape[0]
    path = (config or {}).get("path", CONFIGS["path"])
    cfg = {**CONFIGS[path], **{a: b for a, b in (config or {}).items() if a != "path"}}
    if path == "rows" and (n > 1 or k > cfg["MAX_K"]):
        path, cfg = "chunks", CONFIGS["chunks"]
    y = torch.empty(n, m, device=x2.device, dtype=x2.dtype)  # [N, M]
    h = torch.empty_like(x2) if residual is not None else None  # [N, K]
    nw, eps = norm if norm is not None else (y, 0.0)
    res, hh = (residual if residual is not None else x2), (h if h is not None else y)
    bo = min(cfg["BLOCK_O"], triton.next_power_of_2(m))
    pdl = pdl_args(x2.device)
    if path == "rows":
        n_blocks = triton.cdiv(m, bo)
        per_sm = cfg["PROGRAMS_PER_SM"]
        grid = n_blocks if per_sm <= 0 else min(n_blocks, per_sm * sm_count(x2.device))
        _gemv_rows_kernel[(grid,)](
            x2, weight, y, res, nw, hh, k, m, weight.stride(0), float(eps), n_blocks,
            NORM=norm is not None, RES=residual is not None, BLOCK_O=bo,
            BLOCK_K=max(16, triton.next_power_of_2(k)), **pdl, num_warps=cfg["num_warps"],
        )  # fmt: skip
        return y, h
    bn = max(1, triton.next_power_of_2(n))
    bk = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(k)))
    while bn * bo * bk > cfg["MAX_ACC"] and bk > 64:  # more rows: shorter chunks, same registers
        bk //= 2
    _gemv_kernel[(triton.cdiv(m, bo),)](
        x2, weight, y, res, nw, hh, n, k, m, weight.stride(0), float(eps),
        NORM=norm is not None, RES=residual is not None, BLOCK_N=bn, BLOCK_O=bo, BLOCK_K=bk, **pdl,
        PREFETCH=cfg.get("PREFETCH", 1), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return y, h


def gemv(x: Tensor, weight: Tensor, config: dict | None = None) -> Tensor:
    """y = x W^T (see :func:`ffnkit.kernels.gemv`) on the GPU; more than MAX_ROWS rows go to F.linear.

    Example:
        >>> gemv(x, weight)  # doctest: +SKIP
    """
    k = weight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] > CONFIGS["MAX_ROWS"]:
        return linear_torch(x, weight)
    y, _ = launch(x2.contiguous(), weight, config=config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def rms_norm_gemv(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor,
    eps: float,
    residual: Tensor | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + residual) W^T, x + residual) in one launch (see :func:`ffnkit.kernels.rms_norm_gemv`).

    Example:
        >>> y, h = rms_norm_gemv(x, weight, norm_weight, 1e-5, residual)  # doctest: +SKIP
    """
    k = weight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] > CONFIGS["MAX_ROWS"]:
        return rms_norm_linear_torch(x, weight, norm_weight, eps, residual)
    r2 = None if residual is None else residual.reshape(-1, k).contiguous()
    y, h2 = launch(x2.contiguous(), weight, (norm_weight.contiguous(), eps), r2, config)
    h = x if h2 is None else h2.reshape(x.shape)
    return y.reshape(*x.shape[:-1], weight.shape[0]), h
