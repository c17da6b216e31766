"""``drelu_(model)``: TurboSparse's dReLU conversion, ReLU on both gate and up, for models that will be
fine-tuned (the conversion alone changes the function; train afterwards, e.g. with ``ffnkit.train``).

Recorded (kind ``ffn_drelu``) so ``ffnkit.save`` / ``ffnkit.load`` rebuild it.

Example:
    >>> result = drelu_(model)
    >>> result.layers
    [0, 1, ...]
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.config import Result
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.transaction import Transaction
from ffnkit.modules.drelu_ffn import DReLUFFN
from ffnkit.sparsity.calibrate import build_sparse

__all__ = ["DReLUResult", "drelu_", "replay_drelu"]


@dataclass
class DReLUResult(Result):
    """The FFN indices converted.

    Example:
        >>> drelu_(model).to_dict()["transform"]
        'drelu'
    """

    transform: str
    layers: list[int]


def drelu_(model: nn.Module, layers: list[int] | None = None) -> DReLUResult:
    """Swap every chosen gated FFN for a :class:`~ffnkit.modules.drelu_ffn.DReLUFFN`, in place, atomically.

    Example:
        >>> drelu_(model, layers=[0, 1])
    """
    ffns = select_ffns(find_ffns(model), layers)
    swaps = []
    for f in ffns:
        if f.kind != "gated":
            raise InvalidArgumentError(f"dReLU needs gated FFNs; {f.name} ({f.family}) is a plain {f.kind}")
        spec = build_sparse(f, "input").spec  # the same checks and child names as the sparse FFN
        swaps.append((f, DReLUFFN(f.module, spec, d_ff=f.d_ff)))
    with Transaction(model) as tx:
        for f, module in swaps:
            tx.replace(f.name, module)
        tx.record({"kind": DReLUFFN.change_kind, "modules": [m.to_record(f.name) for f, m in swaps]})
    return DReLUResult("drelu", [f.index for f in ffns])


def replay_drelu(model: nn.Module, change: dict) -> None:
    """Rebuild an ``ffn_drelu`` change in a freshly built model.

    Example:
        >>> replay_drelu(fresh_model, model.config.ffnkit["changes"][-1])
    """
    for rec in change.get("modules", []):
        DReLUFFN.replay(model, rec)
