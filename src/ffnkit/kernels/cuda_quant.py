"""The GPU path of the quantised matmul: torch's int4 weight-only CUDA kernel (tinygemm,
``aten._weight_int4pack_mm``), registered under the ``triton`` backend (the switch's GPU backend; this
path itself needs no Triton).

What tinygemm takes, and how ffnkit's integers are mapped to it (once per matrix and device):
- 2–4-bit values, as unsigned nibbles q + 8 packed two per byte (even input in the high nibble), then
  ``aten._convert_weight_to_int4pack(w [out, in/2] uint8, inner_k_tiles)`` (8, 4 or 2 tiles of 16 inputs).
- bfloat16 activations; ``out`` a multiple of 8; a group size of 32, 64, 128 or 256: ffnkit's group size
  must be a multiple of 32, and a larger one (per-row scales too) repeats its scale over kernel groups.
- one bfloat16 [in / group, out, 2] tensor of (scale, zero) with W = (q + 8 − 8) · scale + zero, so
  ffnkit's zero point z becomes zero = −z · scale (rounded to bfloat16: the one extra rounding).
Anything else packs for ``reference`` (dequantise, then matmul), with the reason in ``QuantPack.note``.

Example:
    >>> pack = quant_pack(q.cuda(), scale.cuda().bfloat16(), None, 4, torch.bfloat16)  # doctest: +SKIP
    >>> quant_linear(x.cuda().bfloat16(), pack).shape  # doctest: +SKIP
    torch.Size([1, 14336])
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ffnkit.kernels.quant_matmul import QuantPack, reference_linear, reference_pack

KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes tinygemm accepts, largest first
# inner k tiles tried in order (the first that divides in / 16 wins); FFNKIT_TINYGEMM_TILES="4,8,2" reorders
TILES = tuple(int(t) for t in os.environ.get("FFNKIT_TINYGEMM_TILES", "8,4,2").split(",")) + (2,)


def unsupported(q: Tensor, scale: Tensor, bits: int, dtype: torch.dtype) -> str | None:
    """Why tinygemm cannot run this matrix (None when it can).

    Example:
        >>> unsupported(torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 1), 8, torch.bfloat16)
        '8-bit values (tinygemm takes 2-4 bits)'
    """
    out, n = q.shape
    g = n // scale.shape[1]
    if bits > 4:
        return f"{bits}-bit values (tinygemm takes 2-4 bits)"
    if dtype != torch.bfloat16:
        return f"{dtype} activations (tinygemm takes bfloat16)"
    if out % 8:
        return f"{out} outputs (tinygemm needs a multiple of 8)"
    if g % 32:
        return f"group size {g} (tinygemm needs a multiple of 32)"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "this torch has no aten._weight_int4pack_mm"
    return None


def quant_pack(
    q: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, dtype: torch.dtype | None = None
) -> QuantPack:
    """Repack integers q [out, in] (on a CUDA device) for tinygemm, or for ``reference`` with the reason.

    Example:
        >>> quant_pack(q.cuda(), s.cuda().bfloat16(), None, 4).path  # doctest: +SKIP
        'tinygemm'
    """
    dtype = dtype or scale.dtype
    why = unsupported(q, scale, bits, dtype)
    if why is not None:
        return reference_pack(q, scale, zero_point, bits, note=why)
    out, n = q.shape
    g = n // scale.shape[1]
    kg = next(k for k in KERNEL_GROUPS if g % k == 0)
    tiles = next(t for t in TILES if n % (16 * t) == 0)  # n is a multiple of 32 (g is)
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # [out, in], unsigned nibbles
    nibbles = ((u[:, ::2] << 4) | u[:, 1::2]).contiguous()  # [out, in/2], even input high
    w = torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
    s = scale.detach().to(torch.float32)  # [out, G]
    zero = torch.zeros_like(s) if zero_point is None else -zero_point.to(torch.float32) * s
    rep = g // kg
    sz = torch.stack([s.repeat_interleave(rep, 1), zero.repeat_interleave(rep, 1)], -1)  # [out, in/kg, 2]
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # [in/kg, out, 2]
    return QuantPack("tinygemm", "triton", n, out, kg, (w, sz), f"inner_k_tiles={tiles}")


def quant_linear(x: Tensor, pack: QuantPack, bias: Tensor | None = None) -> Tensor:
    """y [..., out] = x [..., in] · Wᵀ + bias through tinygemm (bfloat16 in and out).

    Example:
        >>> quant_linear(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16), pack).dtype  # doctest: +SKIP
        torch.bfloat16
    """
    if pack.path == "reference":
        return reference_linear(x, pack, bias)
    w, sz = pack.tensors
    x2 = x.reshape(-1, pack.in_features).to(torch.bfloat16).contiguous()  # [N, in]
    y = torch.ops.aten._weight_int4pack_mm(x2, w, pack.group_size, sz)  # [N, out]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], pack.out_features)
