"""Nested widths, post hoc (MatFormer 2310.07707's Mix'n'Match without training; Minitron, Flextron).

:func:`nest_` sorts every FFN's neurons by importance (a permutation of rows of W_in / W_gate / b_in
and columns of W_out: exactly function preserving), so neuron 0 is the most important; the order is
recorded in ``model.config.ffnkit["nest"]``. Then any prefix of each FFN is a sub-FFN, and
:func:`slice_widths_` keeps the first m_l neurons of layer l — one width for all layers, or a
different one per layer (Mix'n'Match) — through the pruning machinery (``keep_neurons_``), so the
result is a standalone model that ``ffnkit.save`` / ``load`` handle (and plain transformers, where
every layer keeps one width). :func:`mixnmatch_widths` picks per-layer widths for a parameter budget
from each layer's measured sensitivity (KL of the next-token distribution when only that layer is
cut to a prefix), reusing the sensitivity allocation of :mod:`ffnkit.compress.prune`.

MoE layers: every expert is sorted by its own scores; a width applies to every expert, and the
shared expert keeps the same share of its neurons.

Example:
    >>> nest_(model, NestConfig(score="wanda-sp"), tokenizer=tok)
    >>> slice_widths_(model, 0.75)                     # every FFN keeps its best 75%
    >>> slice_widths_(model, [1536] * 10 + [1024] * 20) # Mix'n'Match (on a freshly nested model)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN

_MOE_MULTIPLE = 8

__all__ = ["NestConfig", "NestReport", "mixnmatch_widths", "nest_", "slice_widths_"]


@dataclass
class NestConfig(JsonConfig):
    """How to order neurons: a score of :data:`ffnkit.compress.score_functions.SCORES` (not ``taylor``).

    Example:
        >>> NestConfig("flap").to_dict()["score"]
        'flap'
    """

    score: str = "wanda-sp"
    samples: int = 32
    seq_len: int = 256
    batch_size: int = 4
    corpus: str = "shakespeare"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        from ffnkit.compress.score_functions import SCORES

        allowed = SCORES.filter(lambda e: e.meta.get("needs") != "grads")  # taylor needs a backward pass
        if self.score not in allowed:
            raise InvalidArgumentError(
                f"unknown nesting score {self.score!r}; use one of {', '.join(allowed)}"
            )
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise InvalidArgumentError("samples and batch_size must be >= 1 and seq_len >= 2")


@dataclass
class NestReport:
    """What ``nest_`` / ``slice_widths_`` did (JSON-ready through ``to_dict``)."""

    transform: str
    config: dict[str, Any]
    layers: list[dict[str, Any]]  # per FFN: index, name, d_ff before/after (nest: kept-score shares)
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    ffn_ratio_removed: float
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- nest ---------------------------------------------------------------------------------------
def _order(score: Tensor) -> Tensor:
    """Most important first; ties keep the original order (a stable sort), so equal scores change nothing."""
    return torch.sort(-score.double(), stable=True).indices


@torch.no_grad()
def nest_(
    model: nn.Module,
    config: NestConfig | None = None,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    stats: dict | None = None,
    progress: bool = False,
) -> NestReport:
    """Sort every FFN's neurons by importance, most important first (function preserving); atomic.

    Example:
        >>> rep = nest_(model, NestConfig("wanda-sp"), tokenizer=tok)
        >>> model.config.ffnkit["nest"]["score"]
        'wanda-sp'
    """
    from ffnkit.compress.score_functions import SCORES
    from ffnkit.compress.scores import collect_stats, neuron_scores, units
    from ffnkit.core.archs import find_ffns
    from ffnkit.core.edit import edit_ffns_
    from ffnkit.core.transaction import Transaction
    from ffnkit.evaluate import count_parameters

    config = config or NestConfig()
    start = time.perf_counter()
    ffns = find_ffns(model)
    before = count_parameters(model, ffns)
    if SCORES.meta(config.score, "needs") is not None and stats is None:
        if calibration is None:
            if tokenizer is None:
                raise InvalidArgumentError(
                    f"score {config.score!r} needs calibration text: pass tokenizer= or calibration= token ids"
                )
            from ffnkit.data import calibration_batches, load_corpus

            calibration = calibration_batches(
                load_corpus(config.corpus), tokenizer, config.samples, config.seq_len, config.seed
            )
        ids = torch.as_tensor(calibration).long()
        stats = collect_stats(
            model, ids[None] if ids.dim() == 1 else ids, ffns, batch_size=config.batch_size, progress=progress
        )
    perms: dict[FFN, Tensor] = {}
    layers = []
    for f in ffns:
        row: dict[str, Any] = {"index": f.index, "name": f.name, "d_ff": f.d_ff}
        if f.kind == "moe":
            per = [_order(neuron_scores(config.score, u, stats, k)) for k, u in units(f) if k[1] != "shared"]
            perms[f] = torch.stack(per)  # [E, n]
            if f.shared is not None:
                s = neuron_scores(config.score, f.shared, stats, (f.index, "shared"))
                perms[f.shared] = _order(s)
        else:
            s = neuron_scores(config.score, f, stats, (f.index, None)).double()
            perms[f] = _order(s)
            total = float(s.clamp_min(0).sum()) or 1.0
            cum = torch.cumsum(s.clamp_min(0)[perms[f]], 0) / total  # share of the score in each prefix
            row["score_share_at"] = {
                str(p): float(cum[max(0, math.ceil(p / 100 * f.d_ff) - 1)]) for p in (25, 50, 75, 90)
            }
        layers.append(row)
    meta_nest = {
        "score": config.score,
        "order": "descending importance: neuron 0 is the most important; any prefix is a sub-FFN",
        "config": config.to_dict(),
        "d_ff": [f.d_ff for f in ffns],
    }
    with Transaction(model) as tx:  # the permutations and their record, all or none
        edit_ffns_(model, perms)  # joins the transaction
        tx.set_meta("nest", meta_nest)
    after = count_parameters(model, find_ffns(model))
    report = NestReport(
        transform="nest",
        config=config.to_dict(),
        layers=layers,
        parameters_before=before,
        parameters_after=after,
        ffn_ratio_removed=0.0,
        seconds=time.perf_counter() - start,
    )
    model.ffnkit_reports = [*list(getattr(model, "ffnkit_reports", []) or []), report.to_dict()]
    return report


# ----- slice --------------------------------------------------------------------------------------
def _resolve_widths(ffns: list[FFN], widths: int | float | list[int | float]) -> list[int]:
    """Per-FFN neuron counts from an int (neurons), a float in (0, 1] (share), or a list of either."""
    items = list(widths) if isinstance(widths, list | tuple) else [widths] * len(ffns)
    if len(items) != len(ffns):
        raise InvalidArgumentError(f"give one width per FFN: this model has {len(ffns)}, got {len(items)}")
    out = []
    for f, w in zip(ffns, items, strict=True):
        if isinstance(w, bool) or not isinstance(w, int | float):
            raise InvalidArgumentError(f"a width is an int (neurons) or a float in (0, 1]; got {w!r}")
        if isinstance(w, float):
            if not 0.0 < w <= 1.0:
                raise InvalidArgumentError(f"a width share must be in (0, 1], got {w}")
            m = max(1, round(w * f.d_ff))
        else:
            if not 1 <= w <= f.d_ff:
                raise InvalidArgumentError(f"{f.name}: width must be in 1..{f.d_ff} (its neurons), got {w}")
            m = int(w)
        if f.kind == "moe" and f.d_ff >= _MOE_MULTIPLE:
            # grouped expert matmuls need 16-byte strides: a multiple of 8 neurons (as prune_ does)
            m = min(f.d_ff, _MOE_MULTIPLE * math.ceil(m / _MOE_MULTIPLE))
        out.append(m)
    return out


def slice_widths_(model: nn.Module, widths: int | float | list[int | float]) -> NestReport:
    """Keep the first m_l neurons of every FFN (the most important ones after :func:`nest_`); atomic.

    ``widths``: one int (neurons) or float (share of the current width) for all FFNs, or a list with
    one per FFN (Mix'n'Match); MoE expert widths round up to a multiple of 8. The model must have been nested (``config.ffnkit["nest"]``).

    Example:
        >>> slice_widths_(model, 0.5).parameters_after["ffn"]
    """
    from ffnkit.core.archs import find_ffns
    from ffnkit.core.edit import edit_ffns_
    from ffnkit.evaluate import count_parameters

    meta = getattr(model.config, "ffnkit", None) or {}
    if "nest" not in meta:
        raise InvalidArgumentError(
            "slice_widths_ keeps neuron prefixes, which only mean something after nest_(model): run it first"
        )
    start = time.perf_counter()
    ffns = find_ffns(model)
    before = count_parameters(model, ffns)
    ms = _resolve_widths(ffns, widths)
    keep: dict[FFN, Tensor] = {}
    layers = []
    for f, m in zip(ffns, ms, strict=True):
        row = {"index": f.index, "name": f.name, "d_ff_before": f.d_ff, "d_ff_after": m}
        if m < f.d_ff:
            keep[f] = torch.arange(m)
        if f.shared is not None:
            ms_shared = max(1, round(m / f.d_ff * f.shared.d_ff))
            row.update(shared_d_ff_before=f.shared.d_ff, shared_d_ff_after=ms_shared)
            if ms_shared < f.shared.d_ff:
                keep[f.shared] = torch.arange(ms_shared)
        layers.append(row)
    edit_ffns_(model, keep, change=None)
    after = count_parameters(model, find_ffns(model))
    report = NestReport(
        transform="slice_widths",
        config={"widths": ms},
        layers=layers,
        parameters_before=before,
        parameters_after=after,
        ffn_ratio_removed=1 - after["ffn"] / before["ffn"] if before["ffn"] else 0.0,
        seconds=time.perf_counter() - start,
    )
    model.ffnkit_reports = [*list(getattr(model, "ffnkit_reports", []) or []), report.to_dict()]
    return report


@torch.no_grad()
def mixnmatch_widths(
    model: nn.Module,
    keep: float,
    calibration: Tensor,
    *,
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75),
    protect_min: float = 0.05,
    sensitivity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-layer widths for a nested model keeping ``keep`` of the FFN parameters, by sensitivity.

    Each layer's curve = KL(full ‖ only that layer cut to a prefix) at ``ratios`` of its neurons
    removed (prefix masks, on ``calibration`` [n, T]); the budget then goes greedily where the loss per
    parameter is lowest (``ffnkit.compress.prune``'s sensitivity allocation); no layer is cut deeper
    than the largest measured ratio (measured, not extrapolated). Dense FFNs only.
    ``sensitivity``: the ``"sensitivity"`` entry of an earlier result on this model (reused: no forwards).

    Example:
        >>> mm = mixnmatch_widths(model, 0.75, calibration_batches(corpus, tok, 4, 256))
        >>> slice_widths_(model, mm["widths"])
    """
    from ffnkit.compress.prune import allocate, neuron_cost, sensitivity_curves
    from ffnkit.core.archs import find_ffns

    if not 0.0 < keep <= 1.0:
        raise InvalidArgumentError(f"keep must be in (0, 1] (share of FFN parameters kept), got {keep}")
    if "nest" not in (getattr(model.config, "ffnkit", None) or {}):
        raise InvalidArgumentError("mixnmatch_widths reads neuron prefixes: run nest_(model) first")
    ffns = find_ffns(model)
    if any(f.kind == "moe" for f in ffns):
        raise InvalidArgumentError("Mix'n'Match by sensitivity measures dense FFNs only")
    # after nest_, neuron i's rank is i: a decreasing score keeps prefixes
    scores = {(f.index, None): -torch.arange(f.d_ff, dtype=torch.float64) for f in ffns}
    if sensitivity is not None:
        if len(sensitivity["kl"]) != len(ffns):
            raise InvalidArgumentError("the given sensitivity curves are for another model (layer count)")
        ratios = tuple(sensitivity["ratios"])
        curves = {
            (f.index, None): (list(ratios), list(kl)) for f, kl in zip(ffns, sensitivity["kl"], strict=True)
        }
    else:
        ids = torch.as_tensor(calibration).long()
        curves = sensitivity_curves(model, ffns, scores, None, False, ids, list(ratios))
    # no layer is cut deeper than the deepest measured cut: beyond it the curve would be a linear
    # extrapolation, which underestimates the (convex) damage and sends whole layers to the floor
    protect_min = max(protect_min, 1.0 - max(ratios))
    costs = {(f.index, None): neuron_cost(f) for f in ffns}
    target = (1.0 - keep) * sum(f.num_parameters() for f in ffns)
    kept = allocate(scores, costs, target, "sensitivity", protect_min, curves)
    return {
        "keep": keep,
        "widths": [int(kept[(f.index, None)]) for f in ffns],
        "sensitivity": {"ratios": list(ratios), "kl": [curves[(f.index, None)][1] for f in ffns]},
    }
