"""Weight-only quantisation of FFN weights (MoQE-style) through torchao: ``quantize_(model, QuantizeConfig(4))``.

Only the FFN matrices change (W_in, W_gate, W_out of every selected dense FFN, the factors of low-rank
matrices, MoE shared experts); attention, embeddings and norms keep their precision. Weights become
torchao tensor subclasses (``IntxWeightOnlyConfig``: symmetric integers of ``bits`` bits with one scale
per group of ``group_size`` inputs, or per output row when ``group_size`` is None); the forward
dequantises them on the fly, so it runs on CPU and GPU.

Needs ``pip install ffnkit[quantize]`` (torchao). Known limits of torchao 0.18 on this path, reported
rather than hidden: on CPU sub-8-bit values are stored one per int8 (``stored_bits_per_weight`` in the
report says what is really stored; ``packed_bits_per_weight`` what a packed layout needs); v5 3-D expert
tensors and GPT-2's Conv1D are refused with a clear error; a quantised model cannot be saved with
``ffnkit.save`` (its tensors do not serialise to safetensors): save before quantising and quantise after
loading.

Example:
    >>> report = quantize_(model, QuantizeConfig(bits=4, group_size=64))
    >>> report.ffn_bytes_after / report.ffn_bytes_before
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import FFNKitError, InvalidArgumentError, SavedModelError
from ffnkit.core.ffn import FFN

__all__ = ["QuantizeConfig", "QuantizeReport", "quantize_", "tensor_bytes"]


@dataclass
class QuantizeConfig(JsonConfig):
    """How to quantise. JSON round trip: ``QuantizeConfig.from_dict(json.loads(c.to_json()))``.

    Example:
        >>> QuantizeConfig(bits=8, group_size=None).to_dict()["bits"]
        8
    """

    bits: int = 4  # 2..8
    group_size: int | None = 64  # inputs per scale; None = one scale per output row
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
    layers: list[dict[str, Any]]  # per FFN: index, name, quantised module names, weights, bytes
    ffn_weights: int  # number of quantised weight values
    ffn_bytes_before: int
    ffn_bytes_after: int
    stored_bits_per_weight: float  # what is really stored (values + scales + zero points), bits / weight
    packed_bits_per_weight: float  # bits + scale overhead: what a packed layout stores
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _torchao():
    try:
        import torchao  # noqa: F401
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup, quantize_
    except ImportError:
        raise FFNKitError(
            "weight quantisation needs torchao: pip install ffnkit[quantize] (or pip install torchao)"
        ) from None
    import torchao

    return torchao, IntxWeightOnlyConfig, PerAxis, PerGroup, quantize_


def tensor_bytes(t: Tensor) -> int:
    """Bytes a (possibly tensor-subclass) tensor really stores: the sum of its inner tensors.

    Example:
        >>> tensor_bytes(torch.zeros(10, 10))
        400
    """
    if _is_quantised(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _linears(ffn: FFN, matrices: list[str]) -> list[tuple[str, nn.Module]]:
    """(label, nn.Linear) to quantise in one FFN: its projections, or the factors of low-rank ones."""
    from ffnkit.compress.lowrank import LowRankLinear

    if ffn.kind == "moe":
        if ffn.shared is None:
            raise InvalidArgumentError(
                f"{ffn.name}: torchao cannot quantise v5 3-D expert tensors; select dense layers with "
                "layers=[...]"
            )
        return [(f"shared.{label}", mod) for label, mod in _linears(ffn.shared, matrices)]
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
        if isinstance(mod, LowRankLinear):
            out += [(f"{label}.A", mod.A), (f"{label}.B", mod.B)]
        elif isinstance(mod, Conv1D):
            raise InvalidArgumentError(
                f"{ffn.name}: GPT-2's Conv1D is not an nn.Linear; torchao quantises Linears only "
                "(factorise it with lowrank_ first, whose factors are Linears)"
            )
        elif isinstance(mod, nn.Linear):
            out.append((label, mod))
        else:
            raise InvalidArgumentError(
                f"{ffn.name}: matrix {label!r} is a {type(mod).__name__}, not a Linear"
            )
    for label, mod in out:
        if _is_quantised(mod.weight):
            raise InvalidArgumentError(f"{ffn.name}: matrix {label!r} is already quantised")
    return out


def _is_quantised(t: Tensor) -> bool:
    return hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter)


def _refuse_save(*args: Any, **kwargs: Any) -> None:
    raise SavedModelError(
        "this model's FFN weights are torchao-quantised and do not serialise to safetensors; save the "
        "model before quantize_ and quantise again after ffnkit.load"
    )


def quantize_(model: nn.Module, config: QuantizeConfig | None = None) -> QuantizeReport:
    """Quantise the FFN weights of ``model`` in place (weight-only, torchao); atomic.

    Example:
        >>> report = quantize_(model, QuantizeConfig(bits=8, group_size=None))
        >>> round(report.stored_bits_per_weight, 1)
        8.1
    """
    config = config or QuantizeConfig()
    torchao, IntxWeightOnlyConfig, PerAxis, PerGroup, ao_quantize_ = _torchao()
    start = time.perf_counter()
    ffns = select_ffns(find_ffns(model), config.layers)
    plan = [(f, _linears(f, list(config.matrices))) for f in ffns]  # validates before any change
    for f, mods in plan:
        for label, mod in mods:
            if config.group_size is not None and mod.in_features % config.group_size:
                raise InvalidArgumentError(
                    f"{f.name}: matrix {label!r} has {mod.in_features} inputs, not a multiple of "
                    f"group_size={config.group_size}; choose a divisor or group_size=None (per row)"
                )
    granularity = PerAxis(0) if config.group_size is None else PerGroup(config.group_size)
    ao_config = IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{config.bits}"), granularity=granularity
    )
    done: list[tuple[nn.Module, nn.Parameter]] = []
    rows, n_weights, before, after, overhead = [], 0, 0, 0, 0
    try:
        for f, mods in plan:
            row: dict[str, Any] = {"index": f.index, "name": f.name, "matrices": {}}
            for label, mod in mods:
                old = mod.weight
                b0 = tensor_bytes(old)
                done.append((mod, old))
                ao_quantize_(mod, ao_config, filter_fn=lambda m, fqn, mod=mod: m is mod)
                b1 = tensor_bytes(mod.weight)
                row["matrices"][label] = {"shape": list(old.shape), "bytes_before": b0, "bytes_after": b1}
                n_weights += old.numel()
                # one float32 scale and one int8 zero point per group (per row without groups)
                groups = old.shape[0] * (old.shape[1] // (config.group_size or old.shape[1]))
                overhead += 40 * groups
                before += b0
                after += b1
            rows.append(row)
    except BaseException:
        for mod, old in reversed(done):
            mod.weight = old
        raise
    if done:
        model.save_pretrained = _refuse_save  # safetensors cannot hold these tensors: say so when saving
    packed = config.bits + overhead / n_weights if n_weights else 0.0
    notes = []
    if config.bits < 8 and n_weights:
        notes.append(
            f"torchao {torchao.__version__} stores sub-8-bit values one per int8 on this path: "
            "packed_bits_per_weight is what a packed layout would store"
        )
    return QuantizeReport(
        transform="quantize",
        library=f"torchao {torchao.__version__}",
        config=config.to_dict(),
        layers=rows,
        ffn_weights=n_weights,
        ffn_bytes_before=before,
        ffn_bytes_after=after,
        stored_bits_per_weight=8 * after / n_weights if n_weights else 0.0,
        packed_bits_per_weight=packed,
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def cli_run(model: nn.Module, tokenizer: Any, opts: Any) -> QuantizeReport:
    """``ffnkit compress --method quantize``: the CLI's method function. ``opts.extra`` may hold ``bits``
    (default 4), ``group_size`` (default 64) and ``layers``; the ratio does not apply.

    Example:
        >>> register_method("quantize", cli_run, "weight-only quantisation of FFN weights (torchao)")
    """
    extra = dict(getattr(opts, "extra", None) or {})
    config = QuantizeConfig(
        bits=int(extra.get("bits", 4)), group_size=extra.get("group_size", 64), layers=extra.get("layers")
    )
    return quantize_(model, config)
