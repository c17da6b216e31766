"""The one place that changes FFN shapes, for every family layout.

The weight layouts (``nn.Linear``, GPT-2's transposed Conv1D, a fused gate-and-up projection, v5 3-D
expert tensors; low-rank and quantised matrices, which refuse) are adapters of
:mod:`ffnkit.core.layouts`; this module plans which rows and columns each FFN keeps and asks them.

Every edit is planned first (all new tensors computed), then committed through one
:class:`~ffnkit.core.transaction.Transaction`: if anything fails, the model, its config and the handles
are exactly as they were. New parameters take the dtype, device and ``requires_grad`` of what they
replace.

:func:`set_ffn_weights_` replaces a dense FFN's weights by new ones of any width (FFN fusion widens with it).

The handle stays valid: :func:`keep_neurons_` updates the given ``FFN`` in place (``d_ff`` and its weight
references), so ``ffn.W_in`` etc. read the new, smaller weights (other handles on the same FFN become
stale). Pass ``model=`` (or call :func:`record_structure`) to also record the per-layer widths in
``model.config.ffnkit``, which is what ``ffnkit.io.save``/``load`` replay.

Example:
    >>> ffn = find_ffns(model)[3]
    >>> keep_neurons_(ffn, torch.arange(1024), model=model)   # layer 3 now has 1024 neurons
    >>> model.config.ffnkit["structure"]["d_ff"][3]
    1024
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN, ExpertWeight, LinearBias
from ffnkit.core.layouts import EXPERTS, FusedGateUp, Swap, layout_of
from ffnkit.core.structure import record_change, record_structure, structure_of
from ffnkit.core.transaction import Transaction

__all__ = [
    "edit_ffns_",
    "keep_neurons_",
    "permute_neurons_",
    "plan_edits",
    "plan_ffn_weights",
    "record_change",
    "record_structure",
    "replay_structure",
    "resize_neurons_",
    "set_bias_out_",
    "set_ffn_weights_",
    "structure_of",
]


def _check_idx(ffn: FFN, idx: Tensor, expert_dim: bool = False) -> Tensor:
    idx = torch.as_tensor(idx)
    if idx.dtype in (torch.bool,) or idx.is_floating_point():
        raise InvalidArgumentError(f"neuron indices must be integers, got dtype {idx.dtype}")
    idx = idx.long().cpu()
    if idx.numel() == 0 or idx.shape[-1] == 0:
        raise InvalidArgumentError(f"{ffn.name}: keep at least one neuron (got an empty index)")
    if idx.min() < 0 or idx.max() >= ffn.d_ff:
        raise InvalidArgumentError(
            f"{ffn.name}: neuron indices must be in [0, {ffn.d_ff - 1}], got {idx.min()}..{idx.max()}"
        )
    if not expert_dim and idx.dim() != 1:
        raise InvalidArgumentError(f"{ffn.name}: neuron index must be 1-D, got shape {tuple(idx.shape)}")
    return idx


def _plan_fused_refs(ffn: FFN, k: int, has_bias: bool) -> list[Swap]:
    """Point the handle at the gate and up rows of a fused gate-and-up projection of width k."""
    gate, up = FusedGateUp.gate(k), FusedGateUp.up(k)
    return [
        Swap(ffn, "w_gate", replace(ffn.w_gate, rows=gate)),
        Swap(ffn, "w_in", replace(ffn.w_in, rows=up)),
        Swap(ffn, "bias_gate", LinearBias(ffn.in_proj, gate) if has_bias else None),
        Swap(ffn, "bias_in", LinearBias(ffn.in_proj, up) if has_bias else None),
    ]


def _plan_width(ffn: FFN, k: int) -> list[Swap]:
    """The handle's ``d_ff`` and the module's cosmetic ``intermediate_size`` (Llama MLP) become k."""
    swaps = [Swap(ffn, "d_ff", k)]
    if isinstance(getattr(ffn.module, "intermediate_size", None), int):
        swaps.insert(0, Swap(ffn.module, "intermediate_size", k))
    return swaps


def _rows(mod: nn.Module, rows: Tensor) -> list[Swap]:
    return layout_of(mod).plan_keep_rows(mod, rows)


def _plan_dense(ffn: FFN, idx: Tensor, w_out: Tensor | None = None) -> list[Swap]:
    k = int(idx.numel())
    swaps: list[Swap] = []
    if ffn.fused_gate_up:
        swaps += _rows(ffn.in_proj, FusedGateUp.keep_rows(idx, ffn.d_ff))  # [gate | up] keep their order
        swaps += _plan_fused_refs(ffn, k, getattr(ffn.in_proj, "bias", None) is not None)
    else:
        swaps += _rows(ffn.in_proj, idx)
        if ffn.gate_proj is not None:
            swaps += _rows(ffn.gate_proj, idx)
    swaps += layout_of(ffn.out_proj).plan_keep_cols(ffn.out_proj, idx, w_out)
    return swaps + _plan_width(ffn, k)


def _plan_moe(ffn: FFN, idx: Tensor) -> list[Swap]:
    """Keep neurons of every expert: idx [k] (same for all) or [E, k] (one row per expert)."""
    if idx.dim() == 1:
        idx = idx[None].expand(ffn.num_experts, -1)
    if idx.shape[0] != ffn.num_experts:
        raise InvalidArgumentError(
            f"{ffn.name}: expert index must be [k] or [{ffn.num_experts}, k], got {tuple(idx.shape)}"
        )
    k = int(idx.shape[1])
    first = ffn.experts[0]
    experts_mod, gu_t, down_t = first.module, first.w_gate.transpose, first.w_out.transpose
    swaps = EXPERTS.plan_keep(experts_mod, idx, gu_t, down_t)
    gate_up, down = first.w_gate.tensor, first.w_out.tensor
    for e, expert in enumerate(ffn.experts):
        swaps += [
            Swap(expert, "w_gate", ExpertWeight(experts_mod, gate_up, e, FusedGateUp.gate(k), gu_t)),
            Swap(expert, "w_in", ExpertWeight(experts_mod, gate_up, e, FusedGateUp.up(k), gu_t)),
            Swap(expert, "w_out", ExpertWeight(experts_mod, down, e, None, down_t)),
            Swap(expert, "d_ff", k),
        ]
        if expert.bias_gate is not None:  # ffnkit's blocks of non-gated FFNs: [E, 2f] input biases
            bias = expert.bias_gate.tensor
            swaps += [
                Swap(expert, "bias_gate", ExpertWeight(experts_mod, bias, e, FusedGateUp.gate(k))),
                Swap(expert, "bias_in", ExpertWeight(experts_mod, bias, e, FusedGateUp.up(k))),
            ]
    swaps.append(Swap(ffn, "d_ff", k))
    return swaps


def plan_ffn_weights(ffn: FFN, weights: Mapping[str, Tensor | None]) -> list[Swap]:
    """Swaps that give a dense FFN these canonical weights, any width (keys: the arguments of
    :func:`set_ffn_weights_`; ``fusion.fused_weights`` returns such a dict). Apply them with a
    :class:`~ffnkit.core.transaction.Transaction`.

    Example:
        >>> with Transaction(model) as tx:
        ...     tx.apply(plan_ffn_weights(ffn, {"W_in": w1, "W_out": w2, "W_gate": w3}))
    """
    ffn.check_current()
    W_in, W_out, W_gate = weights["W_in"], weights["W_out"], weights.get("W_gate")  # noqa: N806
    b_in, b_gate, b_out = weights.get("b_in"), weights.get("b_gate"), weights.get("b_out")
    if ffn.kind == "moe":
        raise InvalidArgumentError(f"{ffn.name}: set_ffn_weights_ takes dense FFNs, not experts")
    n, d = W_in.shape
    if W_out.shape != (ffn.d_model, n) or d != ffn.d_model:
        raise InvalidArgumentError(
            f"{ffn.name}: W_in must be [n, {ffn.d_model}] and W_out [{ffn.d_model}, n]; got "
            f"{tuple(W_in.shape)} and {tuple(W_out.shape)}"
        )
    if (W_gate is None) != (ffn.kind != "gated") or (W_gate is not None and W_gate.shape != W_in.shape):
        raise InvalidArgumentError(
            f"{ffn.name}: W_gate must be given exactly for gated FFNs, shaped like W_in"
        )
    swaps: list[Swap] = []

    def matrix(mod: nn.Module, w: Tensor, b: Tensor | None) -> None:  # w [out, in], b [out]
        try:
            swaps.extend(layout_of(mod).plan_set(mod, w, b))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{ffn.name}: {exc}") from None

    if ffn.fused_gate_up:  # one matrix: rows [gate | up]
        bias = None if b_in is None and b_gate is None else FusedGateUp.join(b_gate, b_in)
        matrix(ffn.in_proj, FusedGateUp.join(W_gate, W_in), bias)
        swaps += _plan_fused_refs(ffn, n, bias is not None)
    else:
        matrix(ffn.in_proj, W_in, b_in)
        if ffn.gate_proj is not None:
            matrix(ffn.gate_proj, W_gate, b_gate)
    matrix(ffn.out_proj, W_out, b_out)
    return swaps + _plan_width(ffn, n)


def _plan_keep(ffn: FFN, idx: Tensor, w_out: Tensor | None = None) -> list[Swap]:
    refusal = getattr(ffn.module, "resize_refusal", None)
    if refusal:  # a runtime module whose per-neuron state would go stale (e.g. calibrated thresholds)
        raise InvalidArgumentError(f"{ffn.name}: {refusal}")
    if ffn.kind == "moe":
        if w_out is not None:
            raise InvalidArgumentError(f"{ffn.name}: new W_out values are for dense FFNs only")
        return _plan_moe(ffn, _check_idx(ffn, idx, expert_dim=True))
    return _plan_dense(ffn, _check_idx(ffn, idx), w_out)


def _plan_bias_out(ffn: FFN, b: Tensor) -> list[Swap]:
    if ffn.kind == "moe":
        raise InvalidArgumentError(
            f"{ffn.name}: v5 expert tensors have no output bias; set it on a dense FFN (or ffn.shared)"
        )
    mod = ffn.out_proj
    b = torch.as_tensor(b)
    if b.shape != (ffn.d_model,):
        raise InvalidArgumentError(f"{ffn.name}: b_out must have shape [{ffn.d_model}], got {tuple(b.shape)}")
    return [*layout_of(mod).plan_bias(mod, b), Swap(ffn, "bias_out", LinearBias(mod))]


def plan_edits(
    keep: Mapping[FFN, Tensor] | Iterable[tuple[FFN, Tensor]] = (),
    bias_out: Mapping[FFN, Tensor] | Iterable[tuple[FFN, Tensor]] = (),
    *,
    w_out: Mapping[FFN, Tensor] | None = None,
) -> list[Swap]:
    """The swaps of :func:`edit_ffns_` (nothing applied): validate and compute everything first.

    Example:
        >>> swaps = plan_edits({ffn: torch.arange(100)})
        >>> with Transaction(model) as tx:
        ...     tx.apply(swaps)
    """
    keep_items = list(keep.items() if isinstance(keep, Mapping) else keep)
    bias_items = list(bias_out.items() if isinstance(bias_out, Mapping) else bias_out)
    for ffn, _ in [*keep_items, *bias_items]:
        ffn.check_current()  # a stale handle would edit modules that left the model
    # index tensors live on the CPU even inside a meta-device context (from_pretrained builds on meta)
    with torch.no_grad(), torch.device("cpu"):
        swaps: list[Swap] = []
        for ffn, idx in keep_items:
            swaps += _plan_keep(ffn, idx, (w_out or {}).get(ffn))
        # bias plans read nothing that the neuron edits change (b_out is per output)
        for ffn, b in bias_items:
            swaps += _plan_bias_out(ffn, b)
    return swaps


# ----- public edits -------------------------------------------------------------------------------
def edit_ffns_(
    model: nn.Module | None,
    keep: Mapping[FFN, Tensor] | Iterable[tuple[FFN, Tensor]] = (),
    bias_out: Mapping[FFN, Tensor] | Iterable[tuple[FFN, Tensor]] = (),
    *,
    w_out: Mapping[FFN, Tensor] | None = None,
    change: dict | None = None,
) -> None:
    """Keep neurons in several FFNs and/or set output biases, all at once or not at all.

    ``keep`` maps a handle to the neuron indices it keeps (in that order); a MoE handle takes [k] or
    [E, k] (each expert keeps k neurons). ``bias_out`` maps a handle to a new b_out [d_model] (added
    where the model has none). Biases are applied after the neuron edits. ``w_out`` maps a dense handle
    in ``keep`` to new values [d_model, k] for its kept W_out columns. With ``model`` the new widths
    are recorded in ``model.config.ffnkit`` (and ``change``, a JSON-ready dict, in its change list).

    Example:
        >>> ffns = find_ffns(model)
        >>> edit_ffns_(model, {ffns[0]: torch.arange(100), ffns[1]: torch.arange(200)})
    """
    swaps = plan_edits(keep, bias_out, w_out=w_out)
    with torch.no_grad(), Transaction(model) as tx:
        tx.apply(swaps)
        if model is not None:
            tx.record_structure()
            if change is not None:
                tx.record(change)


def keep_neurons_(ffn: FFN, idx: Tensor, *, model: nn.Module | None = None) -> FFN:
    """Keep only neurons ``idx`` of ``ffn`` (rows of W_in/W_gate/b_in/b_gate, columns of W_out), in order.

    The modules get new, smaller parameters (same dtype/device); ``in_features``/``out_features``
    (the layout's own size attributes) follow. The handle is updated in place and returned. MoE handles take
    [k] or [E, k] indices (every expert keeps k neurons; the shared expert is ``ffn.shared``).

    Example:
        >>> keep_neurons_(ffn, torch.tensor([0, 5, 7]), model=model).d_ff
        3
    """
    edit_ffns_(model, [(ffn, idx)])
    return ffn


def permute_neurons_(ffn: FFN, perm: Tensor, *, model: nn.Module | None = None) -> FFN:
    """Reorder the neurons of ``ffn`` (exactly function preserving). ``perm`` is a permutation of d_ff.

    Example:
        >>> permute_neurons_(ffn, torch.randperm(ffn.d_ff))
    """
    perm = torch.as_tensor(perm).long().cpu()
    rows = perm if perm.dim() == 2 else perm[None]
    ok = perm.shape[-1] == ffn.d_ff and all(
        torch.equal(torch.sort(r).values, torch.arange(ffn.d_ff, device="cpu")) for r in rows
    )
    if not ok:
        raise InvalidArgumentError(f"{ffn.name}: perm must be a permutation of 0..{ffn.d_ff - 1}")
    return keep_neurons_(ffn, perm, model=model)


def set_bias_out_(ffn: FFN, b: Tensor, *, model: nn.Module | None = None) -> FFN:
    """Set the FFN's output bias to ``b`` [d_model], adding one where the model has none.

    A bias-less ``nn.Linear`` gets a registered ``bias`` parameter (its forward then adds it); the
    added bias is recorded in ``model.config.ffnkit`` so that ``ffnkit.load`` recreates it.

    Example:
        >>> set_bias_out_(ffn, torch.zeros(ffn.d_model), model=model).b_out.shape
        torch.Size([576])
    """
    edit_ffns_(model, bias_out=[(ffn, b)])
    return ffn


def set_ffn_weights_(
    ffn: FFN,
    W_in: Tensor,  # noqa: N803  (canonical names)
    W_out: Tensor,  # noqa: N803
    W_gate: Tensor | None = None,  # noqa: N803
    b_in: Tensor | None = None,
    b_gate: Tensor | None = None,
    b_out: Tensor | None = None,
) -> FFN:
    """Replace a dense FFN's parameters by these canonical tensors (any width); atomic; handle updated.

    W_in, W_gate: [n, d]; W_out: [d, n]; biases [n] / [d] (None: the module keeps none, or has
    none). Layouts: every writable one (``nn.Linear``, Conv1D, a fused gate-and-up projection). The
    change is not recorded: call
    :func:`record_structure` afterwards (FFN fusion does).

    Example:
        >>> set_ffn_weights_(ffn, torch.cat([a.W_in, b.W_in]), torch.cat([a.W_out, b.W_out], 1),
        ...                  torch.cat([a.W_gate, b.W_gate])).d_ff
    """
    weights = {"W_in": W_in, "W_out": W_out, "W_gate": W_gate, "b_in": b_in, "b_gate": b_gate, "b_out": b_out}
    with torch.no_grad():
        swaps = plan_ffn_weights(ffn, weights)
        with Transaction() as tx:
            tx.apply(swaps)
    return ffn


def resize_neurons_(ffn: FFN, d_ff: int, *, shared_d_ff: int | None = None) -> FFN:
    """Give ``ffn`` width ``d_ff`` (shapes only: the values are placeholders to be overwritten).

    Used to rebuild a saved architecture before loading its state dict; it may also widen.

    Example:
        >>> resize_neurons_(ffn, 512).W_in.shape
        torch.Size([512, 576])
    """
    keep = []
    with torch.device("cpu"):  # placeholder indices; from_pretrained may run us under a meta device
        if d_ff != ffn.d_ff:
            keep.append((ffn, torch.arange(d_ff) % ffn.d_ff))
        if shared_d_ff is not None and ffn.shared is not None and shared_d_ff != ffn.shared.d_ff:
            keep.append((ffn.shared, torch.arange(shared_d_ff) % ffn.shared.d_ff))
    if keep:
        edit_ffns_(None, keep)
    return ffn


def replay_structure(model: nn.Module, change: Mapping[str, Any]) -> None:
    """Replay an ``ffn_structure`` change as shapes only: widths per FFN and added output biases.

    Example:
        >>> replay_structure(fresh_model, {"kind": "ffn_structure", "d_ff": [...], "bias_out": [...]})
    """
    from ffnkit.core.archs import find_ffns

    ffns = find_ffns(model)
    widths = change.get("d_ff") or []
    shared = change.get("shared_d_ff") or [None] * len(widths)
    biases = change.get("bias_out") or [False] * len(widths)
    if len(widths) != len(ffns):
        raise InvalidArgumentError(
            f"the saved structure has {len(widths)} FFNs but the rebuilt model has {len(ffns)}"
        )
    for ffn, w, s in zip(ffns, widths, shared, strict=True):
        resize_neurons_(ffn, int(w), shared_d_ff=s)
    adds = [
        (f, torch.zeros(f.d_model, device="cpu"))
        for f, b in zip(ffns, biases, strict=True)
        if b and f.b_out is None
    ]
    if adds:
        edit_ffns_(None, bias_out=adds)
