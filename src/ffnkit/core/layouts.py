"""Weight layouts: one adapter per way a model stores a matrix, found by ordered dispatch (as in peft).

Every place that reads or reshapes a weight asks :func:`layout_of` (the first adapter whose
``matches(module)`` holds; :func:`register_layout` puts a new one first) instead of testing module types:

============  =====================================  =========================  =========
adapter       module                                 canonical W [out, in]      writable
============  =====================================  =========================  =========
quantized     ``QuantizedLinear``                    dequantised (a copy)       no
lowrank       ``LowRankLinear``                      the product B·A (a copy)   no
conv1d        GPT-2's ``Conv1D`` (stores [in, out])  ``weight.T``               yes
linear        ``nn.Linear``                          ``weight``                 yes
experts       transformers v5 experts (3-D tensors)  one expert's slice         unless quantised
============  =====================================  =========================  =========

Phi-3's fused gate-and-up projection is not a module type but a row block of any of these matrices
(rows [gate | up]): :class:`FusedGateUp` says which rows are which.

An adapter reads the canonical weight and bias, its dims, whether reads are writable views, and *plans*
the shape edits (keep rows, keep columns, set the weight, set the bias) as :class:`Swap` steps that
:mod:`ffnkit.core.transaction` applies all-or-nothing. A read-only adapter refuses to plan, in one line.

Example:
    >>> lay = layout_of(model.transformer.h[0].mlp.c_fc)     # GPT-2
    >>> lay.name, lay.weight(model.transformer.h[0].mlp.c_fc).shape   # canonical [out, in]
    ('conv1d', torch.Size([3072, 768]))
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.utils.parametrize as P
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ffnkit.core.errors import InvalidArgumentError, ReadOnlyWeightError, UnsupportedArchitectureError
from ffnkit.core.views import read_only
from ffnkit.modules.base import dtype_source
from ffnkit.modules.lowrank import LowRankLinear
from ffnkit.modules.quantized import PackedExperts, QuantizedLinear

__all__ = [
    "EXPERTS",
    "LAYOUTS",
    "Conv1DLayout",
    "ExpertsLayout",
    "FusedGateUp",
    "Layout",
    "LinearLayout",
    "LowRankLayout",
    "QuantizedLayout",
    "Swap",
    "find_layout",
    "layout_of",
    "parameter_like",
    "register_layout",
]


class Swap(NamedTuple):
    """One planned step of an edit: set ``obj.attr = new`` (a parameter, an int, a module, a handle field).

    Example:
        >>> Swap(linear, "out_features", 64)
    """

    obj: Any
    attr: str
    new: Any


def parameter_like(like: Tensor, value: Tensor) -> nn.Parameter:
    """A new Parameter holding ``value`` with the dtype, device and ``requires_grad`` of ``like``.

    Example:
        >>> parameter_like(lin.weight, torch.zeros(4, 8)).dtype == lin.weight.dtype
        True
    """
    return nn.Parameter(
        value.detach().to(device=like.device, dtype=like.dtype).contiguous(), requires_grad=like.requires_grad
    )


# ----- the adapter protocol -----------------------------------------------------------------------
class Layout:
    """How one kind of module stores one matrix W [out, in] (and its bias [out]).

    ``writable``: reads are views of stored parameters (edits reach the model). ``dense``: the whole
    matrix is one stored parameter (what factorising, quantising and LoRA take). ``transposed``: the
    parameter is stored [in, out].
    """

    name: ClassVar[str] = "layout"
    writable: ClassVar[bool] = True
    dense: ClassVar[bool] = True
    transposed: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def weight(self, module: nn.Module) -> Tensor:
        """W [out, in]: a view of the parameter where ``writable``, else a read-only tensor."""
        raise NotImplementedError

    def bias(self, module: nn.Module) -> Tensor | None:
        """b [out] (a parameter) or None."""
        return getattr(module, "bias", None)

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """(out_features, in_features)."""
        return tuple(self.weight(module).shape)  # type: ignore[return-value]

    def describe(self, module: nn.Module) -> str:
        """A few words for error messages, e.g. "factorised (rank 64)"."""
        return f"a {type(module).__name__}"

    def parts(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The dense matrices it is stored as: ``[("", module)]``, or a low-rank module's factors."""
        return [("", module)]

    def parameter(self, module: nn.Module) -> nn.Parameter:
        """The stored parameter that :meth:`weight` views (for gradients); refused where not writable."""
        self._refuse(module)
        return module.weight

    def view_of(self, module: nn.Module, full: Tensor) -> Tensor:
        """What :meth:`weight` reads, taken from ``full``, a tensor shaped like :meth:`parameter`."""
        return full.T if self.transposed else full

    # plans (read-only layouts refuse them)
    def plan_keep_rows(self, module: nn.Module, rows: Tensor) -> list[Swap]:
        """Keep output rows ``rows`` [k] of W and the bias."""
        self._refuse(module)
        raise NotImplementedError

    def plan_keep_cols(self, module: nn.Module, cols: Tensor, value: Tensor | None = None) -> list[Swap]:
        """Keep input columns ``cols`` [k] (``value`` [out, k]: new values for them); the bias stays."""
        self._refuse(module)
        raise NotImplementedError

    def plan_set(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> list[Swap]:
        """Give the module W = ``weight`` [out', in'] (any shape) and ``bias`` [out'] (required if it has one)."""
        self._refuse(module)
        raise NotImplementedError

    def plan_bias(self, module: nn.Module, bias: Tensor) -> list[Swap]:
        """Set (or add) the bias [out]: a real parameter in every layout."""
        like = dtype_source(module)
        new = nn.Parameter(bias.detach().to(device=like.device, dtype=like.dtype).clone(), like.requires_grad)
        return [Swap(module, "bias", new)]

    def refusal(self, module: nn.Module) -> str:
        """Why a read-only layout refuses edits, and what to do instead."""
        return f"this matrix is {self.describe(module)}; it cannot be edited"

    def _refuse(self, module: nn.Module) -> None:
        if not self.writable:
            raise ReadOnlyWeightError(self.refusal(module))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearLayout(Layout):
    """``nn.Linear``: weight [out, in], ``out_features`` / ``in_features``."""

    name = "linear"
    out_attr, in_attr = "out_features", "in_features"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def weight(self, module: nn.Module) -> Tensor:  # [out, in]
        return module.weight.T if self.transposed else module.weight

    def dims(self, module: nn.Module) -> tuple[int, int]:
        w = module.weight
        return (int(w.shape[1]), int(w.shape[0])) if self.transposed else (int(w.shape[0]), int(w.shape[1]))

    def describe(self, module: nn.Module) -> str:
        out, n = self.dims(module)
        return f"a {type(module).__name__} [{out}, {n}]"

    def plan_keep_rows(self, module: nn.Module, rows: Tensor) -> list[Swap]:
        w = module.weight
        rows = rows.to(w.device)
        swaps = [Swap(module, "weight", parameter_like(w, w.index_select(1 if self.transposed else 0, rows)))]
        if getattr(module, "bias", None) is not None:
            swaps.append(Swap(module, "bias", parameter_like(module.bias, module.bias.index_select(0, rows))))
        return [*swaps, Swap(module, self.out_attr, int(rows.numel()))]

    def plan_keep_cols(self, module: nn.Module, cols: Tensor, value: Tensor | None = None) -> list[Swap]:
        w = module.weight
        cols = cols.to(w.device)
        if value is not None:
            expected = (self.dims(module)[0], cols.numel())
            if tuple(value.shape) != expected:
                raise InvalidArgumentError(
                    f"new W_out must have shape {list(expected)}, got {list(value.shape)}"
                )
            new = value.T if self.transposed else value
        else:
            new = w.index_select(0 if self.transposed else 1, cols)
        return [Swap(module, "weight", parameter_like(w, new)), Swap(module, self.in_attr, int(cols.numel()))]

    def plan_set(self, module: nn.Module, weight: Tensor, bias: Tensor | None) -> list[Swap]:
        w = module.weight
        swaps = [Swap(module, "weight", parameter_like(w, weight.T if self.transposed else weight))]
        if bias is not None or getattr(module, "bias", None) is not None:
            if bias is None:
                raise InvalidArgumentError("the module has a bias; give its new value")
            swaps.append(Swap(module, "bias", parameter_like(w, bias)))
        swaps.append(Swap(module, self.out_attr, int(weight.shape[0])))
        return [*swaps, Swap(module, self.in_attr, int(weight.shape[1]))]


class Conv1DLayout(LinearLayout):
    """GPT-2's ``Conv1D``: weight stored [in, out] (``nx`` inputs, ``nf`` outputs); W is ``weight.T``."""

    name = "conv1d"
    transposed = True
    out_attr, in_attr = "nf", "nx"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, Conv1D)


class LowRankLayout(Layout):
    """``LowRankLinear``: W = B·A, computed on read (read-only); the factors are its dense parts."""

    name = "lowrank"
    writable = False
    dense = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, LowRankLinear)

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight  # read-only product [out, in]

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features

    def describe(self, module: nn.Module) -> str:
        return f"factorised (rank {module.rank})"

    def parts(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [("A", module.A), ("B", module.B)]

    def refusal(self, module: nn.Module) -> str:
        return (
            f"this matrix is factorised (rank {module.rank}); its shape cannot be edited — prune before "
            "lowrank_, or edit the factors .A / .B"
        )


class QuantizedLayout(Layout):
    """``QuantizedLinear``: W dequantised from packed integers on read (read-only)."""

    name = "quantized"
    writable = False
    dense = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, QuantizedLinear)

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight  # read-only dequantised [out, in]

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features

    def describe(self, module: nn.Module) -> str:
        return f"quantised to {module.bits} bits"

    def parts(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return []

    def refusal(self, module: nn.Module) -> str:
        return (
            f"this matrix is quantised to {module.bits} bits; its weights and shape cannot be edited — "
            "prune or edit before quantize_"
        )


# ----- transformers v5 experts: 3-D tensors, one slice per expert ------------------------------------
class ExpertsLayout(Layout):
    """transformers v5 experts: ``gate_up_proj`` [E, 2f, d] (rows [gate | up]) and ``down_proj`` [E, d, f],
    or both transposed ([E, d, 2f], [E, f, d]) in some models. One expert's matrix is a slice; a tensor
    quantised by ``quantize_`` (a :class:`~ffnkit.modules.quantized.PackedExperts` parametrization)
    reads dequantised and read-only.
    """

    name = "experts"
    dense = False
    gate_up, down = "gate_up_proj", "down_proj"  # tensor names
    gate_up_bias = "gate_up_proj_bias"  # [E, 2f], ffnkit's MoE blocks of non-gated FFNs

    def matches(self, module: nn.Module) -> bool:
        tensors = [getattr(module, n, None) for n in (self.gate_up, self.down)]
        return all(isinstance(t, Tensor) and t.dim() == 3 for t in tensors)

    def orientation(self, module: nn.Module, d_model: int) -> tuple[bool, bool]:
        """(gate_up transposed, down transposed): whether each is stored [E, in, out]."""
        gate_up, down = getattr(module, self.gate_up), getattr(module, self.down)
        return gate_up.shape[1] == d_model, down.shape[1] != d_model

    def d_ff(self, module: nn.Module, gate_up_transposed: bool) -> int:
        gate_up = getattr(module, self.gate_up)
        return int(gate_up.shape[2] if gate_up_transposed else gate_up.shape[1]) // 2

    def num_experts(self, module: nn.Module) -> int:
        return int(getattr(module, self.gate_up).shape[0])

    def tensor_writable(self, module: nn.Module, tensor: str) -> bool:
        return not P.is_parametrized(module, tensor)

    def expert_weight(self, module: nn.Module, tensor: str, expert: int, transposed: bool) -> Tensor:
        """Expert ``expert``'s matrix [out, in] of ``tensor`` (a view, or read-only if quantised)."""
        w = getattr(module, tensor)[expert]
        w = w.T if transposed else w
        if self.tensor_writable(module, tensor):
            return w
        bits = self._packed(module, tensor).bits
        return read_only(w, f"dequantised from {bits}-bit integers")

    def expert_parameter(self, module: nn.Module, tensor: str) -> nn.Parameter:
        """The stored 3-D parameter (for gradients); refused where quantised."""
        if not self.tensor_writable(module, tensor):
            raise ReadOnlyWeightError(self.tensor_refusal(module, tensor))
        return module._parameters[tensor]

    def tensor_refusal(self, module: nn.Module, tensor: str) -> str:
        return (
            f"these expert weights are quantised to {self._packed(module, tensor).bits} bits; they cannot "
            "be edited — prune or edit before quantize_"
        )

    def _packed(self, module: nn.Module, tensor: str) -> PackedExperts:
        return module.parametrizations[tensor][0]

    def weight(self, module: nn.Module) -> Tensor:
        raise InvalidArgumentError("a v5 experts module holds one matrix per expert: read expert slices")

    def plan_keep(self, module: nn.Module, idx: Tensor, gu_t: bool, down_t: bool) -> list[Swap]:
        """Keep neurons ``idx`` [E, k] of every expert: rows of gate and up, columns of down."""
        for tensor in (self.gate_up, self.down):
            if not self.tensor_writable(module, tensor):
                raise ReadOnlyWeightError(self.tensor_refusal(module, tensor))
        gate_up, down = getattr(module, self.gate_up), getattr(module, self.down)
        k, f = idx.shape[1], self.d_ff(module, gu_t)
        rows = torch.cat([idx, idx + f], dim=1).to(gate_up.device)  # [E, 2k]: [gate | up]
        if gu_t:  # [E, d, 2f]
            new_gu = torch.gather(gate_up, 2, rows[:, None, :].expand(-1, gate_up.shape[1], -1))
        else:  # [E, 2f, d]
            new_gu = torch.gather(gate_up, 1, rows[:, :, None].expand(-1, -1, gate_up.shape[2]))
        cols = idx.to(down.device)
        if down_t:  # [E, f, d]
            new_down = torch.gather(down, 1, cols[:, :, None].expand(-1, -1, down.shape[2]))
        else:  # [E, d, f]
            new_down = torch.gather(down, 2, cols[:, None, :].expand(-1, down.shape[1], -1))
        swaps = [
            Swap(module, self.gate_up, parameter_like(gate_up, new_gu)),
            Swap(module, self.down, parameter_like(down, new_down)),
        ]
        bias = getattr(module, self.gate_up_bias, None)
        if isinstance(bias, Tensor):  # [E, 2f]
            swaps.append(Swap(module, self.gate_up_bias, parameter_like(bias, torch.gather(bias, 1, rows))))
        if isinstance(getattr(module, "intermediate_dim", None), int):
            swaps.append(Swap(module, "intermediate_dim", int(k)))
        return swaps


class FusedGateUp:
    """A fused gate-and-up projection (Phi-3; v5 experts' ``gate_up_proj``): one matrix of 2·d_ff rows,
    [gate | up]. Reads and plans go through the matrix's own layout; this says which rows are which.

    Example:
        >>> FusedGateUp.gate(1536), FusedGateUp.up(1536)
        (slice(0, 1536, None), slice(1536, 3072, None))
    """

    @staticmethod
    def gate(d_ff: int) -> slice:
        return slice(0, d_ff)

    @staticmethod
    def up(d_ff: int) -> slice:
        return slice(d_ff, 2 * d_ff)

    @staticmethod
    def keep_rows(idx: Tensor, d_ff: int) -> Tensor:
        """Rows of the fused matrix that keep neurons ``idx`` [k] of both halves, in order: [2k]."""
        return torch.cat([idx, idx + d_ff])

    @staticmethod
    def join(gate: Tensor, up: Tensor) -> Tensor:
        """The fused matrix (or bias) from its two halves: [gate; up]."""
        return torch.cat([gate, up])


EXPERTS = ExpertsLayout()
# first match wins: specific runtime modules before the plain types they resemble
LAYOUTS: list[Layout] = [QuantizedLayout(), LowRankLayout(), Conv1DLayout(), LinearLayout(), EXPERTS]


def register_layout(layout: Layout, *, first: bool = True) -> None:
    """Add a weight-layout adapter; ``first`` (the default) puts it before the built-in ones.

    Example:
        >>> register_layout(MySparseLinearLayout())     # then edits, scores, heal see the new module type
    """
    LAYOUTS.insert(0 if first else len(LAYOUTS), layout)


def find_layout(module: nn.Module | None) -> Layout | None:
    """The first adapter that matches ``module``, or None.

    Example:
        >>> find_layout(nn.Linear(2, 3)).name
        'linear'
    """
    if module is None:
        return None
    return next((lay for lay in LAYOUTS if lay.matches(module)), None)


def layout_of(module: nn.Module) -> Layout:
    """The adapter of ``module``; a module no adapter knows is a one-line error.

    Example:
        >>> layout_of(nn.Linear(2, 3)).weight(nn.Linear(2, 3)).shape
        torch.Size([3, 2])
    """
    layout = find_layout(module)
    if layout is None:
        raise UnsupportedArchitectureError(
            f"no weight layout adapter for a {type(module).__name__}; register one with "
            "ffnkit.core.layouts.register_layout"
        )
    return layout
