"""Storage of quantised FFN weights: b-bit integers packed into bytes, with their scales (and zero points)
in plain buffers, dequantised on the fly exactly as torchao does.

Why not torchao's own tensors: its CPU int4 tensor subclasses do not serialise to safetensors, and
loading them needs torchao; plain packed buffers save as they are and load anywhere. torchao still
chooses the integers (``ffnkit.compress.quantize``); this module only stores and unpacks them.

- :func:`pack_ints` / :func:`unpack_ints`: 2/4/8 bits share bytes, 3/5/6/7 bits use bit planes.
- :class:`QuantizedLinear` replaces a Linear / Conv1D (``weight`` reads the dequantised [out, in]).
- :class:`PackedExperts`, a ``torch.nn.utils.parametrize`` parametrization of a v5 3-D expert tensor,
  dequantised once per forward of the experts module.

Example:
    >>> packed = pack_ints(q, 4); torch.equal(unpack_ints(packed, 4, q.numel()), q.flatten())
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError

__all__ = [
    "PackedExperts",
    "QuantizedLinear",
    "pack_ints",
    "quantized_numel",
    "tensor_bytes",
    "unpack_ints",
]


# ----- packing: b-bit integers into bytes ---------------------------------------------------------
def _packed_len(n: int, bits: int) -> int:
    if bits == 8:
        return n
    if 8 % bits == 0:
        return -(-n // (8 // bits))
    return bits * -(-n // 8)


def pack_ints(q: Tensor, bits: int) -> Tensor:
    """Pack signed ``bits``-bit integers (any shape, values in [-2^(b-1), 2^(b-1)-1]) into uint8 bytes.

    8 bits: one byte each; 4 and 2 bits: 2 and 4 values per byte; 3, 5, 6, 7 bits: ``bits`` bit
    planes of 8 values per byte. n values take about n·bits/8 bytes; :func:`unpack_ints` inverts it.

    Example:
        >>> q = torch.tensor([-8, 7, 0, 3], dtype=torch.int8)
        >>> torch.equal(unpack_ints(pack_ints(q, 4), 4, 4), q)
        True
    """
    u = (q.flatten().to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)  # offset to [0, 2^b)
    if bits == 8:
        return u
    dev = u.device
    if 8 % bits == 0:  # values side by side in a byte
        per = 8 // bits
        u = F.pad(u, (0, -u.numel() % per)).view(-1, per)
        shifts = torch.arange(0, 8, bits, device=dev, dtype=torch.uint8)
        return (u << shifts).sum(-1, dtype=torch.uint8)  # disjoint bits: the sum is an OR
    u = F.pad(u, (0, -u.numel() % 8))
    planes = (u[None] >> torch.arange(bits, device=dev, dtype=torch.uint8)[:, None]) & 1  # [b, n8]
    shifts = torch.arange(8, device=dev, dtype=torch.uint8)
    return (planes.view(bits, -1, 8) << shifts).sum(-1, dtype=torch.uint8).flatten()  # [b * n8 / 8]


def unpack_ints(packed: Tensor, bits: int, n: int) -> Tensor:
    """The first ``n`` signed integers (int8, flat) stored by :func:`pack_ints`.

    Example:
        >>> unpack_ints(pack_ints(torch.tensor([-2, 1], dtype=torch.int8), 2), 2, 2).tolist()
        [-2, 1]
    """
    dev = packed.device
    if bits == 8:
        u = packed
    elif 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=dev, dtype=torch.uint8)
        u = ((packed[:, None] >> shifts) & ((1 << bits) - 1)).flatten()[:n]
    else:
        shifts = torch.arange(8, device=dev, dtype=torch.uint8)
        planes = ((packed.view(bits, -1, 1) >> shifts) & 1).view(bits, -1)[:, :n]  # [b, n]
        u = (planes << torch.arange(bits, device=dev, dtype=torch.uint8)[:, None]).sum(0, dtype=torch.uint8)
    return (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


# ----- the quantised matrix -----------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """y = x · W^T + b where W [out, in] is stored as packed ``bits``-bit integers q and one scale per
    group of ``group_size`` inputs: W = (q − zero_point) · scale, torchao's dequantisation (the zero
    point only with ``zero_point=True``, asymmetric quantisation; 0 otherwise).

    ``weight`` gives the dequantised [out, in] matrix (like ``nn.Linear.weight``), a fresh copy;
    buffers ``qweight`` (uint8, packed), ``scale`` [out, in / group_size] and ``zero_point`` (packed,
    or None) are what is stored and saved. The shape and weights cannot be edited (pruning a quantised
    matrix raises a clear error).

    Example:
        >>> q = QuantizedLinear(576, 1536, bits=4, group_size=64)
        >>> q.weight.shape, q(torch.randn(2, 576)).shape
        (torch.Size([1536, 576]), torch.Size([2, 1536]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        *,
        zero_point: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise InvalidArgumentError(f"group_size {group_size} does not divide in_features {in_features}")
        dtype = dtype or torch.get_default_dtype()
        self._shape = (int(in_features), int(out_features), int(bits), int(group_size))
        n = in_features * out_features
        self.register_buffer("qweight", torch.zeros(_packed_len(n, bits), dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=dtype, device=device))
        zp = torch.zeros(_packed_len(out_features * groups, bits), dtype=torch.uint8, device=device)
        self.register_buffer("zero_point", zp if zero_point else None)  # packed like the values
        b = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_parameter("bias", b)

    @property
    def in_features(self) -> int:
        return self._shape[0]

    @property
    def out_features(self) -> int:
        return self._shape[1]

    @property
    def bits(self) -> int:
        return self._shape[2]

    @property
    def group_size(self) -> int:
        return self._shape[3]

    @property
    def weight(self) -> Tensor:  # [out, in], dequantised
        n, m, bits, g = self._shape
        q = unpack_ints(self.qweight, bits, n * m).view(m, n // g, g)  # [out, groups, g]
        zp = None if self.zero_point is None else unpack_ints(self.zero_point, bits, m * n // g)
        return _dequantise(q, self.scale, zp).view(m, n)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # [..., in] -> [..., out]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "bias" and self._same_bias_shape(value):
            super().__setattr__(name, value)  # the loader filling the saved bias
            return
        if (
            name in ("weight", "bias", "in_features", "out_features", "nx", "nf")
            and "_shape" in self.__dict__
        ):
            raise InvalidArgumentError(
                f"this matrix is quantised to {self.bits} bits; its weights and shape cannot be edited — "
                "prune or edit before quantize_"
            )
        super().__setattr__(name, value)

    def _same_bias_shape(self, value: Any) -> bool:
        bias = self._parameters.get("bias") if "_parameters" in self.__dict__ else None
        return isinstance(value, Tensor) and bias is not None and value.shape == bias.shape

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"zero_point={self.zero_point is not None}"
        )


def _dequantise(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """torchao's ``dequantize_affine``, bit for bit: (q - zero_point) · scale in the scale's dtype.

    q [..., groups, g] int8; scale [..., groups]; zero_point (flat, int8) or None (symmetric).
    """
    w = q.to(scale.dtype)
    if zero_point is not None:
        w = w - zero_point.view(scale.shape).to(scale.dtype)[..., None]
    return w * scale[..., None]


def tensor_bytes(t: Tensor | nn.Module) -> int:
    """Bytes a tensor (or a module's parameters and buffers) really stores.

    Example:
        >>> tensor_bytes(torch.zeros(10, 10))
        400
    """
    if isinstance(t, nn.Module):
        return sum(tensor_bytes(x) for x in [*t.parameters(), *t.buffers()])
    return t.numel() * t.element_size()


# ----- v5 3-D expert tensors: a parametrization over packed buffers ---------------------------------
class PackedExperts(nn.Module):
    """Parametrization (``torch.nn.utils.parametrize``) that gives a v5 3-D expert tensor from packed
    ``bits``-bit integers and scales: ``experts.gate_up_proj`` reads as the dequantised [E, a, b] tensor
    while ``experts.parametrizations.gate_up_proj.original0/1`` (packed uint8, scales) are what is stored.

    Groups run along each expert's input dimension (the last one, or dim 1 when ``transpose``: the
    layout some models keep). Writing the tensor (pruning experts) raises a clear error.

    Example:
        >>> experts.gate_up_proj.shape  # after quantize_: the same shape, dequantised on the fly
        torch.Size([8, 128, 64])
    """

    def __init__(
        self, shape: list[int], bits: int, group_size: int, transpose: bool, init: tuple[Tensor, ...]
    ) -> None:
        super().__init__()
        self.stored_shape = [int(x) for x in shape]  # [E, a, b] as the model keeps it
        self.bits, self.group_size, self.transpose = int(bits), int(group_size), bool(transpose)
        # (packed values, scales [E, out, groups], packed zero points if asymmetric), handed over once
        self._init: tuple[Tensor, ...] | None = init

    def forward(self, qweight: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
        e, a, b = self.stored_shape
        out, n = (b, a) if self.transpose else (a, b)
        g = self.group_size
        q = unpack_ints(qweight, self.bits, e * out * n).view(e, out, n // g, g)
        zp = None if zero_point is None else unpack_ints(zero_point, self.bits, e * out * n // g)
        w = _dequantise(q, scale, zp).view(e, out, n)  # [E, out, in]
        return w.transpose(1, 2).contiguous() if self.transpose else w

    def right_inverse(self, value: Tensor) -> tuple[Tensor, ...]:
        if self._init is None:
            raise InvalidArgumentError(
                f"these expert weights are quantised to {self.bits} bits; they cannot be edited — prune or "
                "edit before quantize_"
            )
        init, self._init = self._init, None
        return init


def _cache_on(module: nn.Module, args: Any) -> None:
    # one dequantisation per forward, however many experts read the tensor
    cm = P.cached()
    cm.__enter__()
    module.__dict__.setdefault("_ffnkit_caches", []).append(cm)


def _cache_off(module: nn.Module, args: Any, output: Any) -> None:
    stack = module.__dict__.get("_ffnkit_caches")
    if stack:
        stack.pop().__exit__(None, None, None)


def _refuse_expert_writes(self: nn.Module, name: str, value: Any) -> None:
    """``__setattr__`` of a module with packed experts: writing a quantised tensor is a clear error."""
    plist = self.__dict__.get("_modules", {}).get("parametrizations")
    if plist is not None and name in plist and isinstance(plist[name][0], PackedExperts):
        plist[name][0].right_inverse(value)  # raises: the tensor is quantised
    nn.Module.__setattr__(self, name, value)


def _parametrize_experts(mod: nn.Module, name: str, pz: PackedExperts) -> None:
    """Replace expert tensor ``mod.<name>`` (a Parameter) by the packed parametrization ``pz``."""
    old = mod._parameters.pop(name)
    try:
        mod.register_buffer(name, old.detach())  # a buffer: the packed originals must not require grad
        P.register_parametrization(mod, name, pz, unsafe=True)
    except BaseException:
        mod.__dict__.get("_buffers", {}).pop(name, None)
        mod._parameters[name] = old
        raise
    # parametrize gave this module its own class: make assignments (pruning) fail clearly there
    type(mod).__setattr__ = _refuse_expert_writes
    if not getattr(mod, "_ffnkit_cache_hooks", False):
        mod.register_forward_pre_hook(_cache_on)
        mod.register_forward_hook(_cache_off, always_call=True)
        mod._ffnkit_cache_hooks = True


def _unparametrize_experts(mod: nn.Module, name: str, old: nn.Parameter) -> None:
    """Undo :func:`_parametrize_experts` (atomic quantize_): the original Parameter comes back."""
    P.remove_parametrizations(mod, name, leave_parametrized=True)
    mod._buffers.pop(name, None)
    mod._parameters[name] = old


def quantized_numel(model: nn.Module) -> int:
    """How many weights the quantised matrices stand for. Their packed values live in buffers, which
    ``model.parameters()`` does not list, so parameter counts add this to stay what they were.

    Example:
        >>> quantized_numel(model)  # 0 before quantize_
    """
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            total += mod.in_features * mod.out_features
        elif isinstance(mod, PackedExperts):
            total += int(torch.Size(mod.stored_shape).numel())
    return total
