"""Dense products for decode: y = x W^T at batch 1 (and a few rows), optionally behind a fused RMSNorm.

A decode step reads every weight once, so a batch-1 linear layer is bound by memory bandwidth, and a GEMV
that streams W at the copy bandwidth is the floor of what any dense layer costs. These kernels serve the
parts of a decode step that every configuration shares (the attention projections): on CUDA with Triton a
bandwidth-bound Triton GEMV (:mod:`ffnkit.kernels.triton_gemv`), elsewhere torch's ``F.linear``.

- :func:`gemv`: ``F.linear(x, weight)`` for ``weight`` [out, in] (the nn.Linear layout, no copy).
- :func:`rms_norm_gemv`: ``(F.linear(rms_norm(x + residual), weight), x + residual)`` in one launch on the
  GPU (the residual add and the RMSNorm in front of a q/k/v projection).

Both accumulate in float32 and return x's dtype; the ``reference`` and ``cpu`` backends are torch (the
oracle of the tests), the ``triton`` one sends more than ``triton_gemv.CONFIGS["MAX_ROWS"]`` rows to
``F.linear`` as well. No host sync (CUDA-graph capturable).

Example:
    >>> import torch
    >>> from ffnkit.kernels import gemv
    >>> w, x = torch.randn(6, 4), torch.randn(1, 4)
    >>> torch.allclose(gemv(x, w), x @ w.T)
    True
"""

from __future__ import annotations

import torch  # noqa: F401  (the doctests use it)
import torch.nn.functional as F
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels.backend import dispatch


def _check(x: Tensor, weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise InvalidArgumentError("weight must be a floating-point [out, in] tensor (the nn.Linear layout)")
    if weight.stride(1) != 1:
        raise InvalidArgumentError(
            "weight rows must be contiguous ([out, in] with unit column stride): call .contiguous()"
        )
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InvalidArgumentError(
            f"x must be [..., {weight.shape[1]}] to match weight [out, in], got {shape}"
        )
    if x.dtype != weight.dtype or x.device != weight.device:
        raise InvalidArgumentError(
            f"x is {x.dtype} on {x.device} but the weight is {weight.dtype} on {weight.device}: cast or move one"
        )


def gemv(x: Tensor, weight: Tensor, *, backend: str | None = None) -> Tensor:
    """y = x W^T for ``weight`` [out, in]: ``F.linear(x, weight)``, on CUDA through a bandwidth-bound Triton
    GEMV when x has at most a few rows (float32 accumulation). Returns [..., out] in x's dtype.

    Example:
        >>> w = torch.randn(5, 3)
        >>> gemv(torch.randn(2, 3), w, backend="reference").shape
        torch.Size([2, 5])
    """
    _check(x, weight)
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], weight.shape[0])
    return dispatch("gemv", x, backend)(x, weight)


def rms_norm_gemv(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(RMSNorm(h) W^T, h) with h = x + residual (x without one): a pre-norm block's input projection with
    the residual add and the norm in the same launch on the GPU. ``norm_weight`` is [in]. Returns
    ([..., out], [..., in]) in x's dtype.

    Example:
        >>> w, g = torch.randn(5, 3), torch.ones(3)
        >>> y, h = rms_norm_gemv(torch.randn(1, 3), w, g, 1e-5, torch.randn(1, 3), backend="reference")
        >>> y.shape, h.shape
        (torch.Size([1, 5]), torch.Size([1, 3]))
    """
    _check(x, weight)
    k = weight.shape[1]
    if not isinstance(norm_weight, Tensor) or norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
        raise InvalidArgumentError(f"norm_weight must be a [{k}] tensor of x's dtype {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise InvalidArgumentError(f"residual must have x's shape {tuple(x.shape)} and dtype {x.dtype}")
    if not eps > 0:
        raise InvalidArgumentError(f"eps must be > 0, got {eps}")
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], weight.shape[0]), x
    return dispatch("rms_norm_gemv", x, backend)(x, weight, norm_weight, eps, residual)


def parse_gemv_config(spec: str) -> dict:
    """A launch configuration of the Triton GEMV from text: ``rows:BO:W:P`` (whole rows, BLOCK_O rows a
    step, W warps, P programs per multiprocessor, 0 = one program per block of rows) or
    ``[chunks:]BO:BK:W[:S]`` (BLOCK_O rows in BLOCK_K chunks, W warps, S stages); for the benchmarks' sweeps
    (``triton_gemv.CONFIGS`` / ``launch(config=...)``).

    Example:
        >>> parse_gemv_config("rows:2:8:0")
        {'path': 'rows', 'BLOCK_O': 2, 'num_warps': 8, 'PROGRAMS_PER_SM': 0}
    """
    parts = spec.strip().split(":")
    try:
        if parts[0] == "rows":
            bo, w, p = (int(t) for t in parts[1:])
            return {"path": "rows", "BLOCK_O": bo, "num_warps": w, "PROGRAMS_PER_SM": p}
        v = [int(t) for t in (parts[1:] if parts[0] == "chunks" else parts)]
        if len(v) not in (3, 4):
            raise ValueError(spec)
    except ValueError:
        raise InvalidArgumentError(
            f"bad GEMV config {spec!r}: use rows:BLOCK_O:WARPS:PROGRAMS_PER_SM or chunks:BLOCK_O:BLOCK_K:WARPS[:STAGES]"
        ) from None
    cfg = {"path": "chunks", "BLOCK_O": v[0], "BLOCK_K": v[1], "num_warps": v[2]}
    if len(v) == 4:
        cfg["num_stages"] = v[3]
    return cfg


def linear_torch(x: Tensor, weight: Tensor) -> Tensor:
    """The ``reference`` / ``cpu`` backend of :func:`gemv`: ``F.linear``.

    Example:
        >>> linear_torch(torch.ones(1, 2), torch.ones(3, 2)).tolist()
        [[2.0, 2.0, 2.0]]
    """
    return F.linear(x, weight)


def rms_norm_linear_torch(
    x: Tensor, weight: Tensor, norm_weight: Tensor, eps: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The ``reference`` / ``cpu`` backend of :func:`rms_norm_gemv`: add, ``F.rms_norm``, ``F.linear``.

    Example:
        >>> y, h = rms_norm_linear_torch(torch.ones(1, 2), torch.ones(3, 2), torch.ones(2), 1e-6)
        >>> [round(v, 4) for v in y[0].tolist()]
        [2.0, 2.0, 2.0]
    """
    h = x if residual is None else x + residual
    return F.linear(F.rms_norm(h, (weight.shape[1],), norm_weight, eps), weight), h
