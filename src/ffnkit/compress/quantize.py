"""Weight-only quantisation of FFN weights (MoQE-style) through torchao: ``quantize_(model, QuantizeConfig(4))``.

Only the FFN matrices change (W_in, W_gate, W_out of every selected dense FFN in any dense layout of
:mod:`ffnkit.core.layouts`, Phi-3's fused gate-and-up projection, the factors of low-rank matrices, MoE
experts and shared experts); attention, embeddings
and norms keep their precision. torchao (``IntxUnpackedToInt8Tensor.from_hp``) chooses the integers of
``bits`` bits and one scale per group of ``group_size`` inputs (per output row when ``group_size`` is
None), symmetric or with a zero point per group (``mapping="asymmetric"``). Each matrix then keeps
those integers *packed* (``bits`` bits per weight) with the scales in plain buffers: a ``QuantizedLinear``
replaces a dense matrix module and runs through the quantised-matmul kernels
(:mod:`ffnkit.kernels.quant_matmul`: C loops on the CPU, torch's int4 tinygemm on CUDA, dequantise-then-
matmul exactly as torchao does on backend ``reference``), and a ``PackedExperts`` parametrization
(``torch.nn.utils.parametrize``) a v5 3-D expert tensor, dequantised on the fly (both in
:mod:`ffnkit.modules.quantized`).
Plain buffers save to safetensors as they are: ``ffnkit.save`` writes a folder really smaller than the
float one and records an ``ffn_quantized`` change that ``ffnkit.load`` replays (loading and running
need no torchao; only quantising does).

Needs ``pip install ffnkit[quantize]`` (torchao) to quantise. A quantised matrix cannot be pruned or
resized (prune first, then quantise); it cannot be quantised twice.

Example:
    >>> report = quantize_(model, QuantizeConfig(bits=4, group_size=64))
    >>> report.ffn_bytes_after / report.ffn_bytes_before
    0.14
    >>> save(model, tok, "q4"); model2, _ = load("q4")  # the same logits, bit for bit
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import FFNKitError, InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.layouts import EXPERTS, find_layout, layout_of
from ffnkit.core.transaction import Transaction
from ffnkit.modules.base import tensor_bytes
from ffnkit.modules.quantized import PackedExperts, QuantizedLinear

__all__ = [
    "CHANGE_KIND",
    "QuantizeConfig",
    "QuantizeReport",
    "quantize_",
    "replay_quantized",
]

CHANGE_KIND = QuantizedLinear.change_kind  # "ffn_quantized"


@dataclass
class QuantizeConfig(JsonConfig):
    """How to quantise. JSON round trip: ``QuantizeConfig.from_dict(json.loads(c.to_json()))``.

    Example:
        >>> QuantizeConfig(bits=8, group_size=None).to_dict()["bits"]
        8
    """

    bits: int = 4  # 2..8
    group_size: int | None = 64  # inputs per scale; None = one scale per output row
    # "asymmetric": an integer zero point per group as well; on SmolLM2 int4/64 it gives Persuasion
    # perplexity 40.86 against symmetric's 43.47 for 0.06 more bits per weight (benchmarks/quantize_ffn.py)
    mapping: str = "asymmetric"
    layers: list[int] | None = None  # FFN indices (None = all)
    matrices: tuple[str, ...] | list[str] = ("in", "gate", "out")
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise InvalidArgumentError(f"bits must be an integer in 2..8, got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise InvalidArgumentError(
                f"group_size must be a positive integer or None, got {self.group_size}"
            )
        if self.mapping not in ("symmetric", "asymmetric"):
            raise InvalidArgumentError(f"mapping must be 'symmetric' or 'asymmetric', got {self.mapping!r}")
        self.matrices = list(self.matrices)
        if not self.matrices or any(m not in ("in", "gate", "out") for m in self.matrices):
            raise InvalidArgumentError(
                f"matrices must be a non-empty subset of in, gate, out; got {self.matrices}"
            )


@dataclass
class QuantizeReport:
    """What ``quantize_`` changed (JSON-ready through ``to_dict``)."""

    transform: str
    library: str
    config: dict[str, Any]
    layers: list[dict[str, Any]]  # per FFN: index, name, quantised matrices, shapes, bytes
    ffn_weights: int  # number of quantised weight values
    ffn_bytes_before: int
    ffn_bytes_after: int
    stored_bits_per_weight: float  # what is really stored (packed values + scales), bits / weight
    packed_bits_per_weight: float  # bits + scale overhead (equal to the stored bits: values are packed)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _torchao():
    try:
        import torchao
        from torchao.quantization import IntxUnpackedToInt8Tensor, MappingType
    except ImportError:
        raise FFNKitError(
            "weight quantisation needs torchao: pip install ffnkit[quantize] (or pip install torchao)"
        ) from None
    return torchao, IntxUnpackedToInt8Tensor, MappingType


# ----- planning -----------------------------------------------------------------------------------
@dataclass
class _Target:
    """One matrix to quantise: a dense matrix module, or a 3-D expert tensor ``module.<tensor>``."""

    label: str
    module: nn.Module
    tensor: str | None = None
    transpose: bool = False  # expert tensors kept as [E, in, out]

    @property
    def n_in(self) -> int:
        if self.tensor is None:
            return _dims(self.module)[0]
        shape = getattr(self.module, self.tensor).shape
        return int(shape[1] if self.transpose else shape[2])


def _targets(ffn: FFN, matrices: list[str]) -> list[_Target]:
    """What to quantise in one FFN: its projections, the factors of low-rank ones, expert tensors."""
    if ffn.kind == "moe":
        out = []
        if ffn.experts:
            if {"in", "gate"} & set(matrices) and not {"in", "gate"} <= set(matrices):
                raise InvalidArgumentError(
                    f"{ffn.name} keeps the experts' W_gate and W_in in one tensor: quantise 'in' and 'gate' "
                    "together"
                )
            e0 = ffn.experts[0]
            wanted = [("gate_up", e0.w_gate)] if "in" in matrices else []
            wanted += [("down", e0.w_out)] if "out" in matrices else []
            for label, ref in wanted:
                if not ref.writable:
                    raise InvalidArgumentError(f"{ffn.name}: the experts' {ref.tensor} is already quantised")
                out.append(_Target(f"experts.{label}", ref.module, ref.tensor, ref.transpose))
        if ffn.shared is not None:
            out += [replace(t, label=f"shared.{t.label}") for t in _targets(ffn.shared, matrices)]
        return out
    mods: list[tuple[str, nn.Module]] = []
    if ffn.fused_gate_up:
        if {"in", "gate"} & set(matrices):
            if not {"in", "gate"} <= set(matrices):
                raise InvalidArgumentError(
                    f"{ffn.name} keeps W_gate and W_in in one fused matrix: quantise 'in' and 'gate' together"
                )
            mods.append(("gate_up", ffn.in_proj))
    else:
        if "in" in matrices:
            mods.append(("in", ffn.in_proj))
        if "gate" in matrices and ffn.gate_proj is not None:
            mods.append(("gate", ffn.gate_proj))
    if "out" in matrices:
        mods.append(("out", ffn.out_proj))
    out = []
    for label, mod in mods:
        layout = find_layout(mod)
        if layout is None or layout is EXPERTS:
            raise InvalidArgumentError(
                f"{ffn.name}: matrix {label!r} is a {type(mod).__name__}, not a matrix module ffnkit knows"
            )
        if layout.dense:
            out.append(_Target(label, mod))
            continue
        parts = layout.parts(mod)  # the dense factors of a low-rank matrix; none for a quantised one
        if not parts:
            raise InvalidArgumentError(f"{ffn.name}: matrix {label!r} is already {layout.describe(mod)}")
        for part, sub in parts:
            if not layout_of(sub).dense:
                raise InvalidArgumentError(f"{ffn.name}: matrix {label}.{part} is already quantised")
            out.append(_Target(f"{label}.{part}", sub))
    return out


def _canonical(mod: nn.Module) -> Tensor:
    """The weight as [out, in], whatever the layout stores."""
    return layout_of(mod).weight(mod).detach()


def _dims(mod: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a matrix module."""
    out, n = layout_of(mod).dims(mod)
    return int(n), int(out)


def _ao_quantise(w: Tensor, bits: int, g: int, mapping: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """torchao's quantisation of w [rows, in] in groups of g inputs: (int8 values, scales [rows, in/g],
    zero points [rows, in/g] int8 or None when symmetric)."""
    _, IntxUnpackedToInt8Tensor, MappingType = _torchao()
    kind = MappingType.SYMMETRIC if mapping == "symmetric" else MappingType.ASYMMETRIC
    t = IntxUnpackedToInt8Tensor.from_hp(w, (1, g), getattr(torch, f"int{bits}"), mapping_type=kind)
    zp = t.zero_point.reshape(w.shape[0], -1)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if mapping == "symmetric" and bool((zp != 0).any()):
        raise FFNKitError("torchao returned non-zero zero points for symmetric quantisation; update ffnkit")
    if zp.dtype != torch.int8 or bool(((zp < lo) | (zp > hi)).any()):
        raise FFNKitError(f"torchao returned zero points outside the {bits}-bit range; update ffnkit")
    return t.qdata, t.scale.reshape(w.shape[0], -1), (zp if mapping == "asymmetric" else None)


def _quantise(mod: nn.Module, bits: int, group_size: int | None, mapping: str) -> QuantizedLinear:
    """A QuantizedLinear holding torchao's quantisation of ``mod`` (a dense matrix module) and its bias."""
    w = _canonical(mod)  # [out, in]
    g = group_size or w.shape[1]
    qdata, scale, zp = _ao_quantise(w, bits, g, mapping)
    return QuantizedLinear.from_ints(qdata, scale, zp, getattr(mod, "bias", None), bits=bits)


def _quantise_experts(t: _Target, bits: int, group_size: int | None, mapping: str) -> PackedExperts:
    """The packed parametrization of expert tensor ``t`` ([E, out, in], or [E, in, out] when transposed)."""
    w = getattr(t.module, t.tensor).detach()
    c = w.transpose(1, 2) if t.transpose else w  # [E, out, in]
    e, out, n = c.shape
    g = group_size or n
    qdata, scale, zp = _ao_quantise(c.reshape(e * out, n), bits, g, mapping)  # rows: (expert, output)
    return PackedExperts.from_ints(
        qdata, scale.reshape(e, out, n // g), zp, list(w.shape), t.transpose, bits=bits
    )


def quantize_(model: nn.Module, config: QuantizeConfig | None = None) -> QuantizeReport:
    """Quantise the FFN weights of ``model`` in place (weight-only, torchao); atomic; saveable.

    Example:
        >>> report = quantize_(model, QuantizeConfig(bits=8, group_size=None))
        >>> round(report.stored_bits_per_weight, 1)
        8.1
    """
    config = config or QuantizeConfig()
    torchao, _, _ = _torchao()
    start = time.perf_counter()
    ffns = select_ffns(find_ffns(model), config.layers)
    plan = [(f, _targets(f, list(config.matrices))) for f in ffns]  # validates before any change
    for f, targets in plan:
        for t in targets:
            if config.group_size is not None and t.n_in % config.group_size:
                raise InvalidArgumentError(
                    f"{f.name}: matrix {t.label!r} has {t.n_in} inputs, not a multiple of "
                    f"group_size={config.group_size}; choose a divisor or group_size=None (per row)"
                )
    paths = {id(m): name for name, m in model.named_modules()}
    built: list[tuple[_Target, nn.Module]] = []  # (target, QuantizedLinear or PackedExperts)
    records: list[dict[str, Any]] = []
    rows, n_weights, before, after = [], 0, 0, 0
    for f, targets in plan:  # compute everything first: the model is untouched until the swap
        row: dict[str, Any] = {"index": f.index, "name": f.name, "matrices": {}}
        for t in targets:
            path = paths[id(t.module)]
            if t.tensor is None:
                new = _quantise(t.module, config.bits, config.group_size, config.mapping)
                b0, stored = tensor_bytes(t.module.weight), new.packed_tensors()
                shape, numel = [new.out_features, new.in_features], new.in_features * new.out_features
                rec = new.to_record(path)
            else:
                new = _quantise_experts(t, config.bits, config.group_size, config.mapping)
                w = getattr(t.module, t.tensor)
                b0, stored, shape, numel = tensor_bytes(w), list(new.stored), list(w.shape), w.numel()
                rec = new.to_record(path, t.tensor)
            b1 = sum(tensor_bytes(x) for x in stored)
            row["matrices"][t.label] = {"path": path, "shape": shape, "bytes_before": b0, "bytes_after": b1}
            built.append((t, new))
            records.append(rec)
            n_weights += numel
            before += b0
            after += b1
        rows.append(row)
    change = {"kind": CHANGE_KIND, "library": f"torchao {torchao.__version__}", "modules": records}
    with Transaction(model) as tx:
        for t, new in built:
            if t.tensor is None:
                tx.replace(paths[id(t.module)], new)
            else:
                tx.call(
                    lambda t=t, new=new: new.attach(t.module, t.tensor),
                    lambda old, t=t, new=new: new.detach(t.module, t.tensor, old),
                    touched=[t.module],
                )
        if built:
            tx.record(change)
    bpw = 8 * after / n_weights if n_weights else 0.0
    return QuantizeReport(
        transform="quantize",
        library=f"torchao {torchao.__version__}",
        config=config.to_dict(),
        layers=rows,
        ffn_weights=n_weights,
        ffn_bytes_before=before,
        ffn_bytes_after=after,
        stored_bits_per_weight=bpw,
        packed_bits_per_weight=bpw,
        seconds=time.perf_counter() - start,
        notes=[
            "values are stored packed (bits per weight) with one scale per group (and, asymmetric, one "
            "packed zero point); dequantised on the fly"
        ],
    )


def replay_quantized(model: nn.Module, change: dict) -> None:
    """Rebuild the quantised matrices of an ``ffn_quantized`` change on a freshly built model (packed
    buffers are placeholders that the saved weights then fill).

    Example:
        >>> replay_quantized(fresh_model, model.config.ffnkit["changes"][-1])
    """
    for rec in change.get("modules", []):
        (PackedExperts if rec.get("tensor") else QuantizedLinear).replay(model, rec)


def group_size_fits(model: nn.Module, config: QuantizeConfig) -> bool:
    """Whether ``config.group_size`` divides the input width of every matrix ``quantize_`` would change.

    Example:
        >>> group_size_fits(model, QuantizeConfig(group_size=64))   # False where d_ff = 48
        False
    """
    if config.group_size is None:
        return True
    ffns = select_ffns(find_ffns(model), config.layers)
    targets = [t for f in ffns for t in _targets(f, list(config.matrices))]
    return all(t.n_in % config.group_size == 0 for t in targets)
