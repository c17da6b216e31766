"""The ``cpu`` backend: the C kernels of :mod:`ffnkit.kernels.cpu_source`, or pure torch when they can't build.

Inputs arrive validated (:mod:`ffnkit.kernels.sparse_ffn`). The C kernels accumulate in float32 and read
float32, bfloat16 or float16 weights in place; activations (x, h) are small and converted to float32 here.

Example:
    >>> import torch
    >>> from ffnkit.kernels.cpu_sparse_ffn import gather_ffn
    >>> gather_ffn(torch.randn(1, 8), torch.randn(16, 3, 8), torch.tensor([1, 4])).shape
    torch.Size([1, 8])
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ffnkit.kernels.cpu_build import load_cpu_library
from ffnkit.kernels.reference import activation

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
# Software prefetch distance in neurons (0 = off, the default): off was 5-12% faster than 1, 2 or 4 at 25-80%
# skipped on the Qwen2.5-0.5B shape, 2 threads (each neuron's block is long enough for the hardware
# prefetcher; prefetching the next block competes with the current one).
PREFETCH = int(os.environ.get("FFNKIT_CPU_PREFETCH", "0"))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _use_c(weight: Tensor) -> bool:
    return weight.dtype in DTYPE_CODES and load_cpu_library() is not None


def ffn_rows(
    x: Tensor,
    rows: tuple[Tensor, Tensor, Tensor],
    idx: Tensor | None,
    thr: float | Tensor | None,
    act: str = "silu",
    scale: Tensor | None = None,
) -> Tensor:
    """The C kernel on neuron rows ``(gate [F, D], up [F, D], down^T [F, D])`` sharing one row stride.

    The views of a packed tensor (``packed[:, 0]``, ...) or three contiguous tensors both qualify (the
    benchmark compares the two layouts). ``idx`` None = every neuron; ``thr`` None = no CATS threshold, a
    number, or a float32 [F] tensor of per-neuron thresholds.

    Example:
        >>> p = torch.randn(16, 3, 8)
        >>> ffn_rows(torch.randn(1, 8), (p[:, 0], p[:, 1], p[:, 2]), torch.tensor([3]), None).shape
        torch.Size([1, 8])
    """
    gate, up, down_t = rows
    d = gate.shape[1]
    rs = gate.stride(0)
    assert all(r.stride() == (rs, 1) and r.dtype == gate.dtype for r in rows), "rows must share one stride"
    x2 = x.reshape(-1, d).to(torch.float32).contiguous()  # [N, D]
    y = torch.empty_like(x2)  # [N, D] float32, written by the kernel
    idx64 = None if idx is None else idx.to(torch.int64).contiguous()
    n_rows = gate.shape[0] if idx is None else idx64.numel()
    sc = None if scale is None else scale.to(torch.float32).contiguous()  # [N, K]
    tv = thr.to(torch.float32).contiguous() if isinstance(thr, Tensor) else None  # [F]
    rc = load_cpu_library().ffnkit_ffn_rows(
        DTYPE_CODES[gate.dtype], _ptr(x2), x2.shape[0], d, _ptr(gate), _ptr(up), _ptr(down_t), rs,
        _ptr(idx64), n_rows, int(thr is not None), 0.0 if tv is not None else float(thr or 0.0), _ptr(tv),
        ACT_CODES[act], _ptr(sc), _ptr(y), torch.get_num_threads(), PREFETCH,
    )  # fmt: skip
    assert rc == 0
    return y.to(x.dtype).reshape(x.shape)


def _rows(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return packed[:, 0, :], packed[:, 1, :], packed[:, 2, :]


def gather_ffn(
    x: Tensor, packed: Tensor, idx: Tensor, act: str = "silu", scale: Tensor | None = None
) -> Tensor:
    """The gated FFN over the neurons in ``idx`` only, straight from the packed rows (C, or torch fallback).

    Example:
        >>> gather_ffn(torch.randn(2, 8), torch.randn(16, 3, 8), torch.arange(16)).shape
        torch.Size([2, 8])
    """
    if _use_c(packed):
        return ffn_rows(x, _rows(packed), idx, None, act, scale)
    d = packed.shape[2]
    w = packed.index_select(0, idx.long())  # [K, 3, D]: the copy the C kernel avoids
    x2 = x.reshape(-1, d)
    h = activation(act, x2 @ w[:, 0, :].T) * (x2 @ w[:, 1, :].T)  # [N, K]
    if scale is not None:
        h = h * scale.to(h.dtype)
    return (h @ w[:, 2, :]).reshape(x.shape)


def predicted_ffn(
    x: Tensor,
    packed: Tensor,
    z: Tensor,
    pred_b: Tensor,
    pred_bias: Tensor,
    threshold: float,
    act: str = "silu",
) -> Tensor:
    """Deja Vu: score the neurons, then :func:`gather_ffn` over the union of the rows' kept neurons, each
    row weighted by its own keep mask.

    Example:
        >>> predicted_ffn(torch.randn(1, 8), torch.randn(16, 3, 8), torch.randn(1, 2), torch.randn(16, 2),
        ...               torch.zeros(16), 0.0).shape
        torch.Size([1, 8])
    """
    d = packed.shape[2]
    rows = x.numel() // d
    keep = (z.reshape(rows, -1).float() @ pred_b.float().T + pred_bias.float()) > threshold  # [N, F]
    idx = keep.any(0).nonzero().flatten()
    if idx.numel() == 0:
        return torch.zeros_like(x)
    return gather_ffn(x, packed, idx, act, keep[:, idx].to(x.dtype))


def threshold_ffn(x: Tensor, packed: Tensor, threshold: float | Tensor, act: str = "silu") -> Tensor:
    """CATS: dense gate, then the up rows and down columns of the neurons above ``threshold`` (a number or
    one per neuron, [F]) only.

    Example:
        >>> threshold_ffn(torch.randn(1, 8), torch.randn(16, 3, 8), 0.5).shape
        torch.Size([1, 8])
    """
    if _use_c(packed):
        return ffn_rows(x, _rows(packed), None, threshold, act, None)
    d = packed.shape[2]
    x2 = x.reshape(-1, d)
    a = activation(act, x2 @ packed[:, 0, :].T)  # [N, F]
    keep = a.abs() > threshold
    idx = keep.any(0).nonzero().flatten()  # the union of the rows' active neurons
    w = packed.index_select(0, idx)  # [K, 3, D]
    h = torch.where(keep[:, idx], a[:, idx], torch.zeros_like(a[:, idx])) * (x2 @ w[:, 1, :].T)  # [N, K]
    # (with per-neuron thresholds ``a.abs() > threshold`` broadcasts the [F] tensor over the rows)
    return (h @ w[:, 2, :]).reshape(x.shape)


def sparse_input_linear(x: Tensor, w_t: Tensor, threshold: float | Tensor) -> Tensor:
    """TEAL: (x * [|x| >= t]) @ W_t reading only the rows of ``w_t`` [in, out] whose input is kept (``t`` a
    number or one per input, [in]).

    Example:
        >>> sparse_input_linear(torch.randn(1, 8), torch.randn(8, 5), 0.5).shape
        torch.Size([1, 5])
    """
    n_in, n_out = w_t.shape
    if _use_c(w_t):
        x2 = x.reshape(-1, n_in).to(torch.float32).contiguous()  # [N, in]
        y = torch.empty(x2.shape[0], n_out, dtype=torch.float32)  # [N, out]
        tv = threshold.to(torch.float32).contiguous() if isinstance(threshold, Tensor) else None  # [in]
        rc = load_cpu_library().ffnkit_input_rows(
            DTYPE_CODES[w_t.dtype], _ptr(x2), x2.shape[0], n_in, n_out, _ptr(w_t),
            0.0 if tv is not None else float(threshold), _ptr(tv), _ptr(y), torch.get_num_threads(), PREFETCH,
        )  # fmt: skip
        assert rc == 0
        return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
    x2 = x.reshape(-1, n_in)
    keep = (x2.abs() >= threshold) & (x2 != 0)
    cols = keep.any(0).nonzero().flatten()
    xs = torch.where(keep[:, cols], x2[:, cols], torch.zeros_like(x2[:, cols]))  # [N, K]
    w = w_t.index_select(0, cols)  # [K, out]: the copy the C kernel avoids
    y = xs @ w if xs.dtype == w.dtype else (xs.float() @ w.float()).to(x.dtype)  # teal_ffn passes float32 h
    return y.reshape(*x.shape[:-1], n_out)


def teal_ffn(
    x: Tensor,
    gate_up_t: Tensor,
    down_t: Tensor,
    t_in: float | Tensor,
    t_mid: float | Tensor,
    act: str = "silu",
) -> Tensor:
    """TEAL on a whole gated FFN: two input-sparse products around the activation (C kernels, or torch).

    Both products take float32 activations (the kernels read any weight dtype), so no rounding is added
    between them and the mid threshold sees the same h as the reference.

    Example:
        >>> teal_ffn(torch.randn(1, 4), torch.randn(4, 12), torch.randn(6, 4), 0.1, 0.1).shape
        torch.Size([1, 4])
    """
    f = down_t.shape[0]
    gu = sparse_input_linear(x.float(), gate_up_t, t_in)  # [..., 2F] float32
    h = activation(act, gu[..., :f]) * gu[..., f:]  # [..., F] float32
    return sparse_input_linear(h, down_t, t_mid).to(x.dtype)  # [..., D]
