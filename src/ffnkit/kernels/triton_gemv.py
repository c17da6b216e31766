"""The ``triton`` backend of :func:`ffnkit.kernels.gemv`: y = x W^T for one to a few rows (decode), bf16 or
float32 weights, float32 accumulation (imported only when a CUDA tensor takes this path).

At batch 1 a linear layer is bound by reading W once; cuBLAS's GEMV for the attention projections of a
Llama-3-8B layer ([6144, 4096] q/k/v fused and [4096, 4096] o, bf16) ran at about 70% of the copy bandwidth
on an H200 (benchmarks/results/sparsity_decode_h200_profile.json: 28.5 us a layer against a 19.7 us bound).
Here each program owns BLOCK_O whole output rows of W and streams them in BLOCK_K chunks (every load a
contiguous stretch of each row), multiplying on the CUDA cores into a [rows, BLOCK_O, BLOCK_K] float32
accumulator that is summed once after the loop (no shuffles in it), as ffnkit's fused gather kernel does.
No split of K, no atomics, no second launch: one launch per product, no host sync (CUDA-graph capturable).

With ``NORM`` the program first recomputes the RMS of its rows of x (plus ``residual``: the K-element input
is a few KB, read from L2 by every program) and multiplies the normalised input, rounded to x's dtype as
the unfused ``rms_norm`` would return it, into the same accumulator; program 0 also writes x + residual.
That is the residual add and RMSNorm in front of the q/k/v projection in the same launch.

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

# Launch parameters (benchmarks/sparsity_decode_gpu.py --gemv-configs tries others in the 8B decode and
# keeps the fastest). MAX_ROWS: more rows go to cuBLAS (F.linear), which is no longer bound by one pass.
# MAX_ACC: cap on BLOCK_N * BLOCK_O * BLOCK_K (float32 registers of the accumulator per program).
CONFIGS: dict[str, int] = {
    "BLOCK_O": 4,
    "BLOCK_K": 512,
    "num_warps": 4,
    "num_stages": 3,
    "MAX_ROWS": 4,
    "MAX_ACC": 8192,
}


@triton.jit(do_not_specialize=["N", "eps"])
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, res_ptr, nw_ptr, h_ptr, N, K, M, stride_w, eps,
    NORM: tl.constexpr, RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[n, o] = sum_k xin[n, k] * w[o, k] for the BLOCK_O rows o of this program (x, y, residual and h are
    contiguous [N, K] / [N, M]; w has unit column stride)."""
    pid = tl.program_id(0)
    oo = pid * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO] output rows of this program
    mo = oo < M
    on = tl.arange(0, BLOCK_N)
    mn = on < N
    w_rows = w_ptr + oo.to(tl.int64)[:, None] * stride_w  # [BO, 1]
    if NORM:
        ss = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)
            m = mn[:, None] & (ok < K)[None, :]
            xv = tl.load(x_ptr + on[:, None] * K + ok[None, :], mask=m, other=0.0)
            if RES:  # the residual sum rounded to x's dtype, as the unfused add returns it
                rv = tl.load(res_ptr + on[:, None] * K + ok[None, :], mask=m, other=0.0)
                xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(x_ptr.dtype.element_ty)
            xf = xv.to(tl.float32)
            ss += xf * xf
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)  # [BN]
    acc = tl.zeros([BLOCK_N, BLOCK_O, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        mk = ok < K
        w = tl.load(w_rows + ok[None, :], mask=mo[:, None] & mk[None, :], other=0.0)  # [BO, BK]
        m = mn[:, None] & mk[None, :]
        xv = tl.load(x_ptr + on[:, None] * K + ok[None, :], mask=m, other=0.0)  # [BN, BK]
        if NORM:
            if RES:
                rv = tl.load(res_ptr + on[:, None] * K + ok[None, :], mask=m, other=0.0)
                xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(x_ptr.dtype.element_ty)
                tl.store(h_ptr + on[:, None] * K + ok[None, :], xv, mask=m & (pid == 0))
            nw = tl.load(nw_ptr + ok, mask=mk, other=0.0).to(tl.float32)
            xv = (xv.to(tl.float32) * rstd[:, None] * nw[None, :]).to(x_ptr.dtype.element_ty)
        acc += xv.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [BN, BO]
    tl.store(
        y_ptr + on[:, None] * M + oo[None, :], y.to(y_ptr.dtype.element_ty), mask=mn[:, None] & mo[None, :]
    )


def launch(
    x2: Tensor,
    weight: Tensor,
    norm: tuple[Tensor, float] | None = None,
    residual: Tensor | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(y [N, O] in x's dtype, x2 + residual [N, K] or None) for x2 [N, K] (N <= MAX_ROWS), weight [O, K].

    ``norm`` = (RMSNorm weight [K], eps): the product of the normalised (x2 + residual) instead of x2.
    ``config`` overrides :data:`CONFIGS` for this call (the benchmark's sweep).

    Example:
        >>> y, _ = launch(x2, weight)  # doctest: +SKIP
    """
    cfg = {**CONFIGS, **(config or {})}
    n, k = x2.shape
    o = weight.shape[0]
    bn = max(1, triton.next_power_of_2(n))
    bo = min(cfg["BLOCK_O"], triton.next_power_of_2(o))
    bk = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(k)))
    while bn * bo * bk > cfg["MAX_ACC"] and bk > 64:  # more rows: shorter chunks, same registers
        bk //= 2
    y = torch.empty(n, o, device=x2.device, dtype=x2.dtype)  # [N, O]
    h = torch.empty_like(x2) if residual is not None else None  # [N, K]
    nw, eps = norm if norm is not None else (y, 0.0)
    _gemv_kernel[(triton.cdiv(o, bo),)](
        x2, weight, y, residual if residual is not None else x2, nw, h if h is not None else y,
        n, k, o, weight.stride(0), float(eps),
        NORM=norm is not None, RES=residual is not None, BLOCK_N=bn, BLOCK_O=bo, BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
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
        return torch.nn.functional.linear(x, weight)
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
        h = x if residual is None else x + residual
        a = torch.nn.functional.rms_norm(h, (k,), norm_weight, eps)
        return torch.nn.functional.linear(a, weight), h
    r2 = None if residual is None else residual.reshape(-1, k).contiguous()
    y, h2 = launch(x2.contiguous(), weight, (norm_weight.contiguous(), eps), r2, config)
    h = x if h2 is None else h2.reshape(x.shape)
    return y.reshape(*x.shape[:-1], weight.shape[0]), h
