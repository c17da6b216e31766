"""Quantised FFN weights at run time: b-bit integers packed into bytes, with their scales (and zero points)
in plain buffers, dequantised on the fly exactly as torchao does.

Why not torchao's own tensors: its CPU int4 tensor subclasses do not serialise to safetensors, and
loading them needs torchao; plain packed buffers save as they are and load anywhere. torchao still
chooses the integers (``ffnkit.compress.quantize``); this module only stores and unpacks them.

- :func:`pack_ints` / :func:`unpack_ints`: 2/4/8 bits share bytes, 3/5/6/7 bits use bit planes;
  :func:`packed_len` is the number of bytes, :func:`dequantise` torchao's dequantisation (defined with
  the kernels, :mod:`ffnkit.kernels.quant_matmul`).
- :class:`QuantizedLinear` replaces a Linear (or GPT-2's Conv1D); ``weight`` reads the dequantised
  [out, in], read-only. Its forward runs a quantised-matmul kernel (:mod:`ffnkit.kernels.quant_matmul`:
  C loops on the CPU, torch's int4 tinygemm on CUDA) from a copy repacked once per device and dtype,
  kept beside the saved buffers (never saved); backend ``reference``, autograd through x or the bias, or
  a matrix no kernel fits dequantise and then multiply, as before.
- :class:`PackedExperts`, a ``torch.nn.utils.parametrize`` parametrization of a v5 3-D expert tensor,
  dequantised once per forward of the experts module (:meth:`PackedExperts.attach` / ``detach``).

Saved format (unchanged since ffnkit 0.1): buffers ``qweight``, ``scale``, ``zero_point`` of each
QuantizedLinear, ``<experts>.parametrizations.<tensor>.original0/1/2`` of each expert tensor, and change
records of kind ``ffn_quantized``.

Example:
    >>> packed = pack_ints(q, 4); torch.equal(unpack_ints(packed, 4, q.numel()), q.flatten())
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as P
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError, SavedModelError
from ffnkit.core.views import read_only
from ffnkit.kernels.backend import resolve_backend
from ffnkit.kernels.quant_matmul import (
    FFN_ROWS,
    QuantPack,
    dequantise,
    pack_quant,
    pack_quant_ffn,
    quant_ffn,
    quant_linear,
)
from ffnkit.modules.base import RuntimeModule, dtype_source

__all__ = [
    "quantized_gated_ffn",
    "PackedExperts",
    "QuantizedLinear",
    "dequantise",
    "pack_ints",
    "packed_len",
    "unpack_ints",
]


# ----- packing: b-bit integers into bytes ---------------------------------------------------------
def packed_len(n: int, bits: int) -> int:
    """Bytes that :func:`pack_ints` uses for ``n`` values of ``bits`` bits.

    Example:
        >>> packed_len(10, 4), packed_len(10, 3)
        (5, 6)
    """
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
class QuantizedLinear(RuntimeModule):
    """y = x · W^T + b where W [out, in] is stored as packed ``bits``-bit integers q and one scale per
    group of ``group_size`` inputs: W = (q − zero_point) · scale, torchao's dequantisation (the zero
    point only with ``zero_point=True``, asymmetric quantisation; 0 otherwise).

    ``weight`` gives the dequantised [out, in] matrix (like ``nn.Linear.weight``), a read-only copy;
    buffers ``qweight`` (uint8, packed), ``scale`` [out, in / group_size] and ``zero_point`` (packed,
    or None) are what is stored and saved. The shape and weights cannot be edited (pruning a quantised
    matrix raises a clear error).

    Example:
        >>> q = QuantizedLinear(576, 1536, bits=4, group_size=64)
        >>> q.weight.shape, q(torch.randn(2, 576)).shape
        (torch.Size([1536, 576]), torch.Size([2, 1536]))
    """

    change_kind = "ffn_quantized"
    weights_writable = False

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
        self.register_buffer("qweight", torch.zeros(packed_len(n, bits), dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=dtype, device=device))
        zp = torch.zeros(packed_len(out_features * groups, bits), dtype=torch.uint8, device=device)
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

    @classmethod
    def from_ints(
        cls, q: Tensor, scale: Tensor, zero_point: Tensor | None, bias: Tensor | None, *, bits: int
    ) -> QuantizedLinear:
        """The module holding integers q [out, in] (int8, in the ``bits``-bit range), scales
        [out, groups] (their dtype is the module's), zero points [out, groups] or None, and a copy of
        ``bias`` [out] (its ``requires_grad`` too).

        Example:
            >>> q = QuantizedLinear.from_ints(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 2), None,
            ...                               None, bits=4)
            >>> q.group_size, q.weight.abs().sum().item()
            (4, 0.0)
        """
        out, n = q.shape
        new = cls(
            n,
            out,
            bits,
            n // scale.shape[1],
            bias is not None,
            zero_point=zero_point is not None,
            dtype=scale.dtype,
            device=q.device,
        )
        with torch.no_grad():
            new.qweight.copy_(pack_ints(q, bits))
            new.scale.copy_(scale)  # [out, groups]
            if zero_point is not None:
                new.zero_point.copy_(pack_ints(zero_point, bits))
            if bias is not None:
                new.bias.copy_(bias.detach())
                new.bias.requires_grad_(bias.requires_grad)
        return new

    def packed_tensors(self) -> list[Tensor]:
        """The stored tensors that stand for the weights: packed values, scales (and packed zero points)."""
        return [self.qweight, self.scale] + ([] if self.zero_point is None else [self.zero_point])

    def dequantised(self) -> Tensor:
        """The matrix W [out, in] the packed values stand for (a fresh plain tensor)."""
        n, m, bits, g = self._shape
        q = unpack_ints(self.qweight, bits, n * m).view(m, n // g, g)  # [out, groups, g]
        zp = None if self.zero_point is None else unpack_ints(self.zero_point, bits, m * n // g)
        return dequantise(q, self.scale, zp).view(m, n)

    @property
    def weight(self) -> Tensor:  # [out, in], dequantised, read-only
        return read_only(self.dequantised(), f"dequantised from {self.bits}-bit integers")

    def ints(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The stored integers unpacked: q [out, in] int8, scales [out, groups], zero points [out, groups]
        int8 or None.

        Example:
            >>> q, s, z = QuantizedLinear(8, 4, 4, 8).ints(); q.shape, s.shape, z
            (torch.Size([4, 8]), torch.Size([4, 1]), None)
        """
        n, m, bits, g = self._shape
        q = unpack_ints(self.qweight, bits, n * m).view(m, n)  # [out, in]
        zp = None if self.zero_point is None else unpack_ints(self.zero_point, bits, m * n // g).view(m, -1)
        return q, self.scale, zp

    def kernel_pack(self, backend: str, dtype: torch.dtype) -> QuantPack:
        """The weights repacked for ``backend``'s kernel and activations of ``dtype``: made once, cached per
        (backend, dtype) for the buffers' current storage, rebuilt when the stored buffers change (loading
        fills them in place).

        Example:
            >>> QuantizedLinear(64, 16, 4, 64).kernel_pack("cpu", torch.float32).path in ("cpu_int4", "reference")
            True
        """
        cache = self.__dict__.setdefault("_kernel_packs", {})
        qw, sc, zp = self.qweight, self.scale, self.zero_point
        # the buffers' storage and in-place versions: .to(), load_state_dict and copy_ all change them
        stamp = tuple((t.data_ptr(), _version(t)) for t in (qw, sc, zp) if t is not None)
        key = (backend, dtype)
        hit = cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                q, scale, z = self.ints()
                hit = (stamp, pack_quant(q, scale, z, bits=self.bits, dtype=dtype, backend=backend))
            cache[key] = hit
        return hit[1]

    def clear_kernel_cache(self) -> None:
        """Drop the repacked copies (they are rebuilt on the next forward).

        Example:
            >>> QuantizedLinear(8, 4, 4, 8).clear_kernel_cache()
        """
        self.__dict__.pop("_kernel_packs", None)

    def forward(self, x: Tensor) -> Tensor:
        grads = torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        backend = "reference" if grads else resolve_backend(x)
        if backend != "reference":
            pack = self.kernel_pack(backend, x.dtype)
            if pack.path != "reference":
                return quant_linear(x, pack, self.bias)  # [..., in] -> [..., out]
        return F.linear(x, self.dequantised(), self.bias)  # [..., in] -> [..., out]

    def packed_numel(self) -> int:
        return self.in_features * self.out_features

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

    def to_record(self, path: str) -> dict[str, Any]:
        """The change record that rebuilds this module at ``path``.

        Example:
            >>> QuantizedLinear(8, 4, 4, 8).to_record("mlp.up_proj")["bits"]
            4
        """
        rec: dict[str, Any] = {
            "path": path,
            "in_features": self.in_features,
            "out_features": self.out_features,
        }
        rec.update(bits=self.bits, group_size=self.group_size, bias=self.bias is not None)
        rec["zero_point"] = self.zero_point is not None
        return rec

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: nn.Module) -> QuantizedLinear:
        """Placeholder buffers shaped as ``record`` says, in the dtype and device of ``like`` (the matrix
        module it replaces: a module without a 2-D weight is a corrupt record).

        Example:
            >>> QuantizedLinear.from_record({"in_features": 8, "out_features": 4, "bits": 4,
            ...                              "group_size": 8, "bias": False}, nn.Linear(8, 4)).bits
            4
        """
        weight = getattr(like, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise SavedModelError(
                f"{record.get('path')} is a {type(like).__name__}, not the Linear or Conv1D that was "
                "quantised; the folder does not match its config — save the model again"
            )
        src = dtype_source(like)
        return cls(
            int(record["in_features"]),
            int(record["out_features"]),
            int(record["bits"]),
            int(record["group_size"]),
            bool(record["bias"]),
            zero_point=bool(record.get("zero_point", False)),
            dtype=src.dtype,
            device=src.device,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"zero_point={self.zero_point is not None}"
        )


# ----- v5 3-D expert tensors: a parametrization over packed buffers ---------------------------------
class PackedExperts(RuntimeModule):
    """Parametrization (``torch.nn.utils.parametrize``) that gives a v5 3-D expert tensor from packed
    ``bits``-bit integers and scales: ``experts.<tensor>`` reads as the dequantised [E, a, b] tensor
    while ``experts.parametrizations.<tensor>.original0/1`` (packed uint8, scales) are what is stored.

    Groups run along each expert's input dimension (the last one, or dim 1 when ``transpose``: the
    layout some models keep). Writing the tensor (pruning experts) raises a clear error.

    Example:
        >>> pz = PackedExperts([8, 128, 64], 4, 64, False, init)
        >>> pz.attach(experts, "down_proj")   # experts.down_proj now reads the dequantised tensor
    """

    change_kind = "ffn_quantized"
    weights_writable = False

    def __init__(
        self, shape: list[int], bits: int, group_size: int, transpose: bool, init: tuple[Tensor, ...]
    ) -> None:
        super().__init__()
        self.stored_shape = [int(x) for x in shape]  # [E, a, b] as the model keeps it
        self.bits, self.group_size, self.transpose = int(bits), int(group_size), bool(transpose)
        # (packed values, scales [E, out, groups], packed zero points if asymmetric), handed over once
        self._init: tuple[Tensor, ...] | None = init
        self.has_zero_point = len(init) == 3

    @classmethod
    def from_ints(
        cls,
        q: Tensor,
        scale: Tensor,
        zero_point: Tensor | None,
        shape: list[int],
        transpose: bool,
        *,
        bits: int,
    ) -> PackedExperts:
        """The parametrization of an expert tensor of ``shape`` (as the model keeps it) from integers
        q [E·out, in] (rows: expert, output), scales [E, out, groups] and zero points [E·out, groups] or None.

        Example:
            >>> pz = PackedExperts.from_ints(q, scale, None, [8, 128, 64], False, bits=4)
        """
        init = (pack_ints(q, bits), scale)
        init += () if zero_point is None else (pack_ints(zero_point, bits),)
        return cls(shape, bits, q.shape[1] // scale.shape[-1], transpose, init)

    @property
    def stored(self) -> tuple[Tensor, ...]:
        """The tensors it will store (before :meth:`attach`): packed values, scales, packed zero points."""
        if self._init is None:
            raise InvalidArgumentError("this parametrization is attached; read its originals instead")
        return self._init

    def forward(self, qweight: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
        e, a, b = self.stored_shape
        out, n = (b, a) if self.transpose else (a, b)
        g = self.group_size
        q = unpack_ints(qweight, self.bits, e * out * n).view(e, out, n // g, g)
        zp = None if zero_point is None else unpack_ints(zero_point, self.bits, e * out * n // g)
        w = dequantise(q, scale, zp).view(e, out, n)  # [E, out, in]
        return w.transpose(1, 2).contiguous() if self.transpose else w

    def right_inverse(self, value: Tensor) -> tuple[Tensor, ...]:
        if self._init is None:
            raise InvalidArgumentError(
                f"these expert weights are quantised to {self.bits} bits; they cannot be edited — prune or "
                "edit before quantize_"
            )
        init, self._init = self._init, None
        return init

    def packed_numel(self) -> int:
        return int(torch.Size(self.stored_shape).numel())

    def attach(self, module: nn.Module, name: str) -> nn.Parameter:
        """Replace expert tensor ``module.<name>`` (a Parameter) by this packed parametrization; returns
        the Parameter it replaced (for :meth:`detach`).

        Example:
            >>> old = pz.attach(experts, "gate_up_proj")
        """
        self._position = list(module._parameters).index(name)  # detach puts it back in its place
        old = module._parameters.pop(name)
        try:
            module.register_buffer(name, old.detach())  # a buffer: the packed originals take no grad
            P.register_parametrization(module, name, self, unsafe=True)
        except BaseException:
            module.__dict__.get("_buffers", {}).pop(name, None)
            module._parameters[name] = old
            raise
        # parametrize gave this module its own class: make assignments (pruning) fail clearly there
        type(module).__setattr__ = _refuse_expert_writes
        if not getattr(module, "_ffnkit_cache_hooks", False):
            module.register_forward_pre_hook(_cache_on)
            module.register_forward_hook(_cache_off, always_call=True)
            module._ffnkit_cache_hooks = True
        return old

    def detach(self, module: nn.Module, name: str, old: nn.Parameter) -> None:
        """Undo :meth:`attach`: the original Parameter ``old`` comes back, in its place among the module's
        parameters (an atomic quantize_ that fails).

        Example:
            >>> pz.detach(experts, "gate_up_proj", old)
        """
        P.remove_parametrizations(module, name, leave_parametrized=True)
        module._buffers.pop(name, None)
        items = [(k, v) for k, v in module._parameters.items() if k != name]
        items.insert(getattr(self, "_position", len(items)), (name, old))
        module._parameters.clear()
        module._parameters.update(items)

    def to_record(self, path: str, tensor: str) -> dict[str, Any]:
        """The change record that rebuilds this parametrization on ``<path>.<tensor>``.

        Example:
            >>> pz.to_record("model.layers.0.mlp.experts", "down_proj")["tensor"]
            'down_proj'
        """
        rec: dict[str, Any] = {
            "path": path,
            "tensor": tensor,
            "shape": list(self.stored_shape),
            "transpose": self.transpose,
        }
        rec.update(bits=self.bits, group_size=self.group_size, zero_point=self.has_zero_point)
        return rec

    @classmethod
    def replay(cls, model: nn.Module, record: Mapping[str, Any]) -> PackedExperts:
        """Rebuild the packed parametrization of ``record`` on a freshly built model (placeholders).

        Example:
            >>> PackedExperts.replay(fresh_model, change["modules"][0])
        """
        mod, name = model.get_submodule(record["path"]), record["tensor"]
        old = mod._parameters.get(name)
        pz = cls.from_record(record, old)
        pz.attach(mod, name)
        return pz

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: Any) -> PackedExperts:
        """A parametrization with placeholder buffers; ``like`` is the expert tensor it replaces."""
        shape, transpose = [int(x) for x in record["shape"]], bool(record["transpose"])
        if not isinstance(like, Tensor) or list(like.shape) != shape:
            raise SavedModelError(
                f"{record['path']}.{record['tensor']} is not the {shape} expert tensor that was quantised"
            )
        bits, g = int(record["bits"]), int(record["group_size"])
        e, out, n = (shape[0], shape[2], shape[1]) if transpose else shape
        init = (
            torch.zeros(packed_len(e * out * n, bits), dtype=torch.uint8, device=like.device),
            torch.zeros(e, out, n // g, dtype=like.dtype, device=like.device),
        )
        if record.get("zero_point"):
            init += (torch.zeros(packed_len(e * out * n // g, bits), dtype=torch.uint8, device=like.device),)
        return cls(shape, bits, g, transpose, init)


def quantized_gated_ffn(
    x: Tensor, gate: QuantizedLinear, up: QuantizedLinear, down: QuantizedLinear, act: str = "silu"
) -> Tensor:
    """down(act(gate x) · up x) for three QuantizedLinear of one gated FFN. At decode on the GPU (at most
    ``FFN_ROWS`` rows, 2–4 bits, no bias, no gradient) the fused FFN path: [gate | up] in one int4 product,
    one activation-product kernel, then down (three launches instead of five; the repack is cached on
    ``gate`` and rebuilt when any of the three changes). Anything else runs the three modules as they are.

    Example:
        >>> g, u, d = QuantizedLinear(64, 32, 4, 32), QuantizedLinear(64, 32, 4, 32), QuantizedLinear(32, 64, 4, 32)
        >>> quantized_gated_ffn(torch.randn(1, 64), g, u, d).shape
        torch.Size([1, 64])
    """
    acts = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": torch.relu,
    }
    mods = (gate, up, down)
    rows = x.numel() // max(x.shape[-1], 1)
    fits = (
        rows <= FFN_ROWS
        and x.is_cuda
        and not torch.is_grad_enabled()
        and all(m.bias is None and m.bits <= 4 for m in mods)
        and resolve_backend(x) == "triton"
    )
    if fits:
        stamp = tuple(
            (t.data_ptr(), _version(t))
            for m in mods
            for t in (m.qweight, m.scale, m.zero_point)
            if t is not None
        )
        hit = gate.__dict__.get("_ffn_pack")
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, pack_quant_ffn(*(m.ints() for m in mods), bits=max(m.bits for m in mods)))
            gate.__dict__["_ffn_pack"] = hit
        if hit[1] is not None:
            return quant_ffn(x, hit[1], act)
    return down(acts[act](gate(x)) * up(x))


def _version(t: Tensor) -> int:
    """The in-place version counter of ``t``; -1 for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return -1


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
