"""Quantised matrix products y = x · Wᵀ (+ b) with W = (q − z) · s stored as b-bit integers: one repack
per matrix and device (:func:`pack_quant`), then :func:`quant_linear` on the kernel path that fits.

Paths, chosen by the kernel backend switch (:mod:`ffnkit.kernels.backend`) and by what the integers allow:
- ``reference`` (any backend, any bits / group size): dequantise, then ``F.linear``; the test oracle,
  and exactly what :class:`ffnkit.modules.quantized.QuantizedLinear` computed before these kernels.
- ``cpu_int4`` / ``cpu_int8`` (backend ``cpu``): the C loops of :mod:`ffnkit.kernels.cpu_quant_source`,
  2–4 bits through the int4 loop (group size a multiple of 16), 5–8 bits through the int8 loop (multiple
  of 8); float32 accumulation, x converted to float32.
- ``tinygemm`` (the GPU backend, registered as ``triton``; it needs no Triton itself): torch's int4
  weight-only CUDA kernel ``aten._weight_int4pack_mm`` for 2–4 bits, bfloat16 activations, group sizes
  that are multiples of 32, ``out`` a multiple of 8.
A backend whose fast path does not fit a matrix packs it for ``reference`` and says why (``QuantPack.note``).

Example:
    >>> q = torch.randint(-8, 8, (16, 64), dtype=torch.int8); s = torch.rand(16, 1)
    >>> pack = pack_quant(q, s, None, bits=4)  # the cpu backend for CPU tensors
    >>> x = torch.randn(2, 64)
    >>> torch.allclose(quant_linear(x, pack), dequant_linear(x, q, s, None), atol=1e-4)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels.backend import KERNELS, kernel_function, resolve_backend

__all__ = [
    "QuantFFNPack",
    "QuantPack",
    "dequant_linear",
    "dequantise",
    "pack_quant",
    "pack_quant_ffn",
    "quant_ffn",
    "quant_linear",
]


def dequantise(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """torchao's ``dequantize_affine``, bit for bit: (q - zero_point) · scale in the scale's dtype.

    q [..., groups, g] int8; scale [..., groups]; zero_point (flat, int8) or None (symmetric).

    Example:
        >>> dequantise(torch.ones(1, 1, 2, dtype=torch.int8), torch.full((1, 1), 0.5), None).tolist()
        [[[0.5, 0.5]]]
    """
    w = q.to(scale.dtype)
    if zero_point is not None:
        w = w - zero_point.view(scale.shape).to(scale.dtype)[..., None]
    return w * scale[..., None]


def dequant_linear(
    x: Tensor, q: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None = None
) -> Tensor:
    """The oracle: y [..., out] = x [..., in] · dequantise(q, scale, zero_point)ᵀ + bias.

    q [out, in] int8; scale [out, groups]; zero_point [out, groups] int8 or None.

    Example:
        >>> q = torch.ones(3, 4, dtype=torch.int8)
        >>> dequant_linear(torch.ones(1, 4), q, torch.full((3, 2), 0.5), None).tolist()
        [[2.0, 2.0, 2.0]]
    """
    out, n = q.shape
    groups = scale.shape[1]
    w = dequantise(q.view(out, groups, n // groups), scale, zero_point).view(out, n)  # [out, in]
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@dataclass(frozen=True)
class QuantPack:
    """One quantised matrix in the layout of one kernel path (made by :func:`pack_quant`, read by
    :func:`quant_linear`); ``tensors`` are the path's own buffers, ``note`` why this path was taken.

    Example:
        >>> pack = pack_quant(torch.zeros(8, 32, dtype=torch.int8), torch.ones(8, 1), None, bits=4,
        ...                   backend="reference")
        >>> pack.path, pack.in_features, pack.out_features
        ('reference', 32, 8)
    """

    path: str  # "reference" | "cpu_int4" | "cpu_int8" | "tinygemm"
    backend: str  # the concrete backend that packed it (its quant_linear runs it)
    in_features: int
    out_features: int
    group_size: int  # the kernel's group size (a divisor of the stored one)
    tensors: tuple[Tensor, ...] = field(repr=False)
    note: str = ""


def check_ints(q: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int) -> None:
    """One-line errors for integers that no path can run: shapes, dtypes, bits.

    Example:
        >>> check_ints(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 2), None, 4)
    """
    if q.dim() != 2 or q.dtype != torch.int8:
        raise InvalidArgumentError(f"q must be a 2-D int8 tensor [out, in], got {tuple(q.shape)} {q.dtype}")
    if not 2 <= int(bits) <= 8:
        raise InvalidArgumentError(f"bits must be in 2..8, got {bits}")
    if scale.dim() != 2 or scale.shape[0] != q.shape[0] or q.shape[1] % scale.shape[1]:
        raise InvalidArgumentError(
            f"scale {tuple(scale.shape)} must be [out, groups] with groups dividing in={q.shape[1]}"
        )
    if zero_point is not None and zero_point.shape != scale.shape:
        raise InvalidArgumentError(
            f"zero_point {tuple(zero_point.shape)} must match scale {tuple(scale.shape)}"
        )


def reference_pack(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    bits: int,
    dtype: torch.dtype | None = None,
    note: str = "",
) -> QuantPack:
    """The ``reference`` path: the integers as they are (int8 [out, in]), scales, zero points.

    Example:
        >>> reference_pack(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 2), None, 4).group_size
        4
    """
    out, n = q.shape
    zp = () if zero_point is None else (zero_point,)
    return QuantPack("reference", "reference", n, out, n // scale.shape[1], (q, scale, *zp), note)


def reference_linear(x: Tensor, pack: QuantPack, bias: Tensor | None = None) -> Tensor:
    """:func:`dequant_linear` on a ``reference`` pack.

    Example:
        >>> p = reference_pack(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 2), None, 4)
        >>> reference_linear(torch.ones(1, 8), p).tolist()
        [[8.0, 8.0, 8.0, 8.0]]
    """
    q, scale, *zp = pack.tensors
    return dequant_linear(x, q, scale, zp[0] if zp else None, bias)


def pack_quant(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    *,
    bits: int,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> QuantPack:
    """Repack integers q [out, in] (int8 holding ``bits``-bit values), scales [out, groups] and zero points
    [out, groups] (int8) or None for the kernel of ``backend`` (None: the switch's choice for q's device),
    to multiply activations of ``dtype`` (default: the scales' dtype).

    Done once per matrix and device; the result is cached by the caller (QuantizedLinear keeps it beside
    its saved buffers, which stay as they are).

    Example:
        >>> p = pack_quant(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16, 2), None, bits=4)
        >>> p.path in ("cpu_int4", "reference")
        True
    """
    check_ints(q, scale, zero_point, bits)
    name = resolve_backend(q, backend)
    return kernel_function("quant_pack", name)(q, scale, zero_point, int(bits), dtype)


def quant_linear(x: Tensor, pack: QuantPack, bias: Tensor | None = None) -> Tensor:
    """y [..., out] = x [..., in] · Wᵀ + bias on the path ``pack`` was made for (:func:`pack_quant`).

    Equal to :func:`dequant_linear` up to float rounding (float32 accumulation on the CPU paths; on
    ``tinygemm`` bfloat16 zero·scale terms and the kernel's own accumulation order).

    Example:
        >>> q = torch.randint(-8, 8, (16, 64), dtype=torch.int8); s = torch.rand(16, 2)
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(quant_linear(x, pack_quant(q, s, None, bits=4)), dequant_linear(x, q, s, None),
        ...                atol=1e-4)
        True
    """
    if x.shape[-1] != pack.in_features:
        raise InvalidArgumentError(f"x has {x.shape[-1]} features, the matrix takes {pack.in_features}")
    if pack.path == "reference":
        return reference_linear(x, pack, bias)
    return kernel_function("quant_linear", pack.backend)(x, pack, bias)


@dataclass(frozen=True)
class QuantFFNPack:
    """A whole gated FFN (gate, up, down) packed for a backend's fused FFN path (:func:`pack_quant_ffn`).

    Example:
        >>> QuantFFNPack("triton", ()).backend
        'triton'
    """

    backend: str
    tensors: tuple = field(repr=False)


FFN_ROWS = 8  # the fused FFN path reads the weights once per row of x: decode only (more rows: per matrix)


def pack_quant_ffn(
    gate: tuple[Tensor, Tensor, Tensor | None],
    up: tuple[Tensor, Tensor, Tensor | None],
    down: tuple[Tensor, Tensor, Tensor | None],
    *,
    bits: int,
    backend: str | None = None,
) -> QuantFFNPack | None:
    """The three (q, scale, zero_point) of a gated FFN packed for ``backend``'s fused FFN path (on the GPU:
    one tinygemm product over [gate | up], one act(gate)·up kernel, then down;
    :mod:`ffnkit.kernels.triton_quant`), or None where the backend has none or the integers do not fit it
    (then run the matrices one by one).

    Example:
        >>> q, s = torch.zeros(8, 32, dtype=torch.int8), torch.ones(8, 1)
        >>> pack_quant_ffn((q, s, None), (q, s, None), (q.T.contiguous(), torch.ones(32, 1), None), bits=4) is None
        True
    """
    for q, scale, zp in (gate, up, down):
        check_ints(q, scale, zp, bits)
    name = resolve_backend(gate[0], backend)
    if ("quant_ffn_pack", name) not in KERNELS:
        return None
    packs = kernel_function("quant_ffn_pack", name)(gate, up, down, int(bits))
    return None if packs is None else QuantFFNPack(name, packs)


def quant_ffn(x: Tensor, pack: QuantFFNPack, act: str = "silu") -> Tensor:
    """down(act(gate x) · up x) through the fused FFN path ``pack`` was made for; x [..., D] with at most
    :data:`FFN_ROWS` rows. Equal to dequantise-then-matmul up to float rounding (the kernels' bfloat16
    zero·scale terms, the intermediate rounded to x's dtype as in the float FFN).

    Example:
        >>> quant_ffn(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16), pack)  # doctest: +SKIP
    """
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > FFN_ROWS:
        raise InvalidArgumentError(
            f"the fused FFN path takes at most {FFN_ROWS} rows, got {rows}: run per matrix"
        )
    return kernel_function("quant_ffn", pack.backend)(x, pack.tensors, act)
