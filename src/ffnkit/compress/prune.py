"""Structured FFN neuron pruning that really shrinks the weights: ``prune_(model, PruneConfig(...))``.

``ratio`` is the share of FFN parameters removed (0 ≤ ratio < 1). Scores (``compress.scores``) rank the
neurons of each pruning unit (a dense FFN, an expert, a shared expert); the allocation decides how many
each unit loses:

- ``uniform``: every unit loses the same share of its neurons.
- ``global``: scores standardised per unit (z-scores), one global threshold (FLAP); each neuron counts
  with its parameter cost.
- ``sensitivity``: the loss increase (KL to the unpruned model on ``sensitivity_samples`` calibration
  windows) of pruning each layer *alone* (simulated by masking m) is measured at ratios r/2 … 2.5r;
  units then lose neurons greedily where the measured marginal cost (piecewise linear through the
  points) per parameter is lowest, hitting the same total, never past a unit's last measured ratio.
  Dense FFNs only.

``align`` (N > 1) rounds every kept width to a multiple of N after the allocation (largest remainder, so
the total stays within one step of the target; :func:`align_widths`): llama.cpp quantises a matrix in
blocks along its rows, and ``ffn_down``'s rows are d_ff long, so Q8_0/Q4_0 (blocks of 32) need d_ff a
multiple of 32 and its k-quants 256; other widths fall back to F16 there. Method ``best`` defaults to 32.

Every unit keeps at least ``max(1, protect_min × d_ff)`` neurons. LoRAP (``keep_lowest``, default 1%
for ``lorap``) also keeps the ⌊keep_lowest × d_ff⌋ lowest-scored neurons of each unit and removes the
lowest of the rest, as its reference code does (``scores.lowest_protected``). FLAP's bias compensation
(``bias_compensation``, default on for ``flap``) adds W_out[:, P] · E[m_P] of the pruned neurons P to
b_out, adding a bias where the model has none. MoE experts keep a common width (v5 stores them as one
3-D tensor), rounded to a multiple of 8 (the grouped matmul kernels need 16-byte strides); bias
compensation does not apply to experts (their tensors have no bias).

Example:
    >>> report = prune_(model, PruneConfig("flap", 0.3, allocation="global"), tokenizer=tok)
    >>> report.parameters_after["ffn"] / report.parameters_before["ffn"]
    0.70
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.compress.score_functions import SCORES, UnitStats
from ffnkit.compress.scores import (
    UnitKey,
    collect_stats,
    lowest_protected,
    neuron_scores,
    taylor_scores,
    units,
)
from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.edit import edit_ffns_
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.progress import ProgressLike, Stage
from ffnkit.core.runner import forward, to_log_probs

__all__ = [
    "ALLOCATIONS",
    "BEST",
    "METHODS",
    "PruneConfig",
    "PruneReport",
    "align_widths",
    "allocate",
    "neuron_cost",
    "prune_",
    "sensitivity_curves",
]

METHODS = SCORES
ALLOCATIONS = ("uniform", "global", "sensitivity")
# the published frontier's best at 20-50% (benchmarks/results/compress_frontier_sensitivity_h200.json):
# FLAP scores, measured per-layer sensitivity, least-squares refit of the kept W_out columns and b_out
BEST = {"method": "flap", "allocation": "sensitivity", "reconstruct": True}
_MOE_MULTIPLE = 8


@dataclass
class PruneConfig(JsonConfig):
    """How to prune. JSON round trip: ``PruneConfig.from_dict(json.loads(c.to_json()))``.

    Example:
        >>> PruneConfig("wanda-sp", 0.3).to_dict()["allocation"]
        'uniform'
    """

    method: str = "flap"
    ratio: float = 0.3  # share of FFN parameters removed, in [0, 1)
    allocation: str = "uniform"
    bias_compensation: bool | None = None  # None: True for flap, False otherwise
    reconstruct: bool = False  # least-squares refit of the kept W_out columns (+ b_out) from Cov(m)
    ridge: float = 0.01  # reconstruct: Σ_KK + ridge · mean(diag Σ_KK) · I
    samples: int = 32  # calibration windows
    seq_len: int = 256
    seed: int = 0
    protect_min: float = 0.05  # every unit keeps at least this share of its neurons (and ≥ 1)
    keep_lowest: float | None = None  # share of each unit's lowest-scored neurons kept (None: 0.01 lorap)
    corpus: str = "shakespeare"  # calibration corpus when none is given
    taylor_samples: int = 8  # calibration windows used for gradients
    sensitivity_samples: int = 2  # windows on which per-layer sensitivity (KL) is measured
    layers: list[int] | None = None  # FFN indices to prune (None = all)
    align: int = (
        1  # every kept width a multiple of this (or the unit's full width); 32: llama.cpp block quants
    )
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(
                f"unknown pruning method {self.method!r}; use one of {', '.join(METHODS)}"
            )
        if self.allocation not in ALLOCATIONS:
            raise InvalidArgumentError(
                f"unknown allocation {self.allocation!r}; use one of {', '.join(ALLOCATIONS)}"
            )
        if not isinstance(self.ratio, int | float) or not 0.0 <= float(self.ratio) < 1.0:
            raise InvalidArgumentError(
                f"ratio must be in [0, 1) (the share of FFN parameters removed), got {self.ratio}"
            )
        if not 0.0 <= self.protect_min < 1.0:
            raise InvalidArgumentError(f"protect_min must be in [0, 1), got {self.protect_min}")
        if self.keep_lowest is not None and not 0.0 <= self.keep_lowest < 1.0:
            raise InvalidArgumentError(f"keep_lowest must be in [0, 1), got {self.keep_lowest}")
        if not isinstance(self.align, int) or isinstance(self.align, bool) or self.align < 1:
            raise InvalidArgumentError(f"align must be a whole number >= 1 (e.g. 32), got {self.align!r}")
        if self.samples < 1 or self.seq_len < 2:
            raise InvalidArgumentError("samples must be >= 1 and seq_len >= 2")
        self.ratio = float(self.ratio)

    @property
    def compensate(self) -> bool:
        if self.reconstruct:
            return True  # the refit's intercept is the bias compensation
        return self.method == "flap" if self.bias_compensation is None else bool(self.bias_compensation)

    @property
    def lowest_share(self) -> float:
        """Share of each unit's lowest-scored neurons never removed (LoRAP: 1%, others: 0)."""
        default = SCORES.meta(self.method, "keep_lowest", 0.0)
        return default if self.keep_lowest is None else float(self.keep_lowest)


@dataclass
class PruneReport:
    """What ``prune_`` changed (JSON-ready through ``to_dict``)."""

    transform: str
    method: str
    config: dict[str, Any]
    layers: list[dict[str, Any]]  # per FFN: index, name, d_ff_before, d_ff_after (experts: per expert)
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    ffn_ratio_removed: float
    bias_compensated: list[int] = field(default_factory=list)
    sensitivity: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- costs and allocation -----------------------------------------------------------------------
def neuron_cost(unit: FFN) -> int:
    """Parameters one neuron of this unit owns: its rows/column and its own biases.

    Example:
        >>> neuron_cost(find_ffns(model)[0])    # gated SmolLM2: 3 × 576
        1728
    """
    mats = 3 if unit.kind == "gated" else 2
    return mats * unit.d_model + (unit.b_in is not None) + (unit.b_gate is not None)


def _min_keep(n: int, protect_min: float) -> int:
    return max(1, math.ceil(protect_min * n))


def allocate(
    scores: dict[UnitKey, Tensor],
    costs: dict[UnitKey, int],
    target: float,
    allocation: str,
    protect_min: float = 0.0,
    curves: dict[UnitKey, tuple[list[float], list[float]]] | None = None,
    protected: dict[UnitKey, Tensor] | None = None,
) -> dict[UnitKey, int]:
    """How many neurons each unit keeps so that the removed parameters reach ``target``.

    ``uniform``: the same share per unit; ``global``: lowest z-scored neurons first, weighted by cost;
    ``sensitivity``: greedy by the marginal cost of the measured curves (ratio → loss increase).
    ``protected``: per unit, a bool mask [n] of neurons that stay whatever their score (LoRAP's bottom 1%).

    Example:
        >>> allocate({(0, None): s0, (1, None): s1}, {(0, None): 1728, (1, None): 1728}, 1e6, "global")
    """
    sizes = {k: s.numel() for k, s in scores.items()}
    prot = {k: (protected or {}).get(k, torch.zeros(n, dtype=torch.bool)) for k, n in sizes.items()}  # [n]
    mins = {k: max(_min_keep(n, protect_min), int(prot[k].sum())) for k, n in sizes.items()}
    prunable = sum(costs[k] * n for k, n in sizes.items())
    share = min(1.0, target / prunable) if prunable else 0.0
    if allocation == "uniform":
        return {k: max(mins[k], n - round(share * n)) for k, n in sizes.items()}
    if allocation == "global":
        pool = []
        for k, s in scores.items():
            s = s.double()
            z = (s - s.mean()) / (s.std() + 1e-12) if s.numel() > 1 else torch.zeros_like(s)
            z = torch.sort(z[~prot[k]]).values[: sizes[k] - mins[k]]  # the top and the protected stay
            pool += [(float(v), k) for v in z]
        pool.sort(key=lambda t: t[0])
        keep, removed = dict(sizes), 0.0
        for _, k in pool:
            if removed >= target:
                break
            keep[k] -= 1
            removed += costs[k]
        return keep
    if allocation == "sensitivity":
        if curves is None:
            raise InvalidArgumentError("sensitivity allocation needs measured curves")
        # never past the last measured ratio: a linear extrapolation underestimates the (convex) loss
        # and sent layers down to protect_min (5%) on SmolLM2 (compress_frontier_sensitivity_h200.json)
        mins = {k: max(m, sizes[k] - math.floor(max(curves[k][0]) * sizes[k])) for k, m in mins.items()}
        return _greedy(curves, sizes, costs, mins, target)
    raise InvalidArgumentError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")


def align_widths(
    kept: dict[UnitKey, int], sizes: dict[UnitKey, int], multiple: int, mins: dict[UnitKey, int] | None = None
) -> dict[UnitKey, int]:
    """Round each unit's kept width to a multiple of ``multiple`` (or its full width), total preserved.

    Largest-remainder rounding: every width goes down to a multiple, then the units with the largest
    remainders go up one step until the kept total is as close as it gets to the requested total, so the
    removed share moves by less than one step overall rather than by half a step per unit. A unit never
    goes below ``mins`` rounded up to a multiple, nor above its size; a unit narrower than ``multiple``
    keeps its full width (llama.cpp's block quants need rows that are whole blocks: 32 for Q8_0/Q4_0,
    256 for its k-quants).

    Example:
        >>> align_widths({(0, None): 1274, (1, None): 1070}, {(0, None): 1536, (1, None): 1536}, 32)
        {(0, None): 1280, (1, None): 1056}
    """
    if multiple <= 1:
        return dict(kept)
    mins = mins or {}
    low: dict[UnitKey, int] = {}
    high: dict[UnitKey, int] = {}
    for k, want in kept.items():
        n = sizes[k]
        floor_min = math.ceil(mins.get(k, 1) / multiple) * multiple
        lo = max(floor_min, (want // multiple) * multiple)
        low[k] = min(n, lo)
        high[k] = min(n, low[k] + multiple) if low[k] < n else n
    out = dict(low)
    deficit = sum(kept.values()) - sum(out.values())
    order = sorted(kept, key=lambda k: (-(kept[k] - low[k]), str(k)))  # largest remainder first
    for k in order:
        step = high[k] - out[k]
        if step > 0 and deficit >= step / 2:
            out[k] = high[k]
            deficit -= step
    return out


def _interp(curve: tuple[list[float], list[float]], r: float) -> float:
    """Piecewise-linear loss increase at ratio r through (0, 0) and the measured points."""
    xs, ys = [0.0, *curve[0]], [0.0, *curve[1]]
    for i in range(1, len(xs)):
        if r <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (r - x0) / max(x1 - x0, 1e-12)
    return ys[-1]


def _greedy(curves, sizes, costs, mins, target, steps: int = 128) -> dict[UnitKey, int]:
    """Remove neurons in small steps where the measured loss increase per parameter is lowest."""
    import heapq

    keep = dict(sizes)

    def delta(k: UnitKey) -> tuple[float, int]:
        n = sizes[k]
        step = min(max(1, n // steps), keep[k] - mins[k])
        r0, r1 = 1 - keep[k] / n, 1 - (keep[k] - step) / n
        return (_interp(curves[k], r1) - _interp(curves[k], r0)) / (step * costs[k]), step

    heap = []
    for k in sizes:
        if keep[k] > mins[k]:
            d, s = delta(k)
            heapq.heappush(heap, (d, str(k), k, s))
    removed = 0.0
    while heap and removed < target:
        _, _, k, step = heapq.heappop(heap)
        step = min(step, math.ceil((target - removed) / costs[k]))
        keep[k] -= step
        removed += step * costs[k]
        if keep[k] > mins[k]:
            d, s = delta(k)
            heapq.heappush(heap, (d, str(k), k, s))
    return keep


# ----- calibration --------------------------------------------------------------------------------
def _calibration(config: PruneConfig, calibration: Tensor | None, tokenizer: Any) -> Tensor:
    from ffnkit.data import calibration_ids

    return calibration_ids(config, calibration, tokenizer, what=f"method {config.method!r}")


def _keep_index(score: Tensor, k: int, protected: Tensor | None = None) -> Tensor:
    """Indices of the k best neurons, in their original order (so k = n changes nothing).

    ``protected`` (bool [n]): neurons kept first whatever their score (LoRAP's lowest 1%).
    """
    if k >= score.numel():
        return torch.arange(score.numel())
    if protected is not None and bool(protected.any()):
        score = torch.where(protected, torch.inf, score.double())  # [n]
    return torch.sort(torch.topk(score, k).indices).values


# ----- sensitivity --------------------------------------------------------------------------------
def _log_probs(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token log-probabilities [B, T, V]; encoders without an LM head give their last hidden state."""
    out = forward(model, ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        return out.last_hidden_state.float()  # compared by relative squared error below
    return to_log_probs(logits)


def _divergence(ref: Tensor, new: Tensor) -> float:
    """Mean KL(ref ‖ new) for log-probabilities; relative squared error for hidden states."""
    if ref.shape[-1] > 0 and torch.all(ref <= 0):
        return float((ref.exp() * (ref - new)).sum(-1).mean())
    return float(((ref - new) ** 2).sum() / (ref**2).sum().clamp_min(1e-12))


@torch.no_grad()
def sensitivity_curves(
    model: nn.Module,
    ffns: list[FFN],
    scores: dict[UnitKey, Tensor],
    stats: dict[UnitKey, UnitStats] | None,
    compensate: bool,
    ids: Tensor,
    ratios: list[float],
    protected: dict[UnitKey, Tensor] | None = None,
    progress: ProgressLike = False,
) -> dict[UnitKey, tuple[list[float], list[float]]]:
    """KL(unpruned ‖ one layer pruned at ratio r) per layer and ratio, simulated with a mask on m.

    Neurons are kept by ``scores`` (highest first; ``protected`` ones always); ``compensate`` adds the
    removed neurons' mean contribution to the bias (needs ``stats``). Returns {unit: (ratios, KL per ratio)}.

    Example:
        >>> curves = sensitivity_curves(model, ffns, scores, None, False, ids, [0.25, 0.5])
    """
    from ffnkit.core.capture import site_hooks

    device = next(model.parameters()).device
    ids = ids.to(device)
    ref = _log_probs(model, ids)  # [B, T, V]
    curves: dict[UnitKey, tuple[list[float], list[float]]] = {}
    # one forward per layer and ratio: the longest silent stage of `best` without a bar
    stage = Stage(progress, "sensitivity (KL per layer and ratio)", len(ffns) * len(ratios), "forward")
    for ffn in ffns:
        key = (ffn.index, None)
        n = ffn.d_ff
        ys = []
        for r in ratios:
            k = max(1, n - round(r * n))
            kept = _keep_index(scores[key], k, (protected or {}).get(key))
            mask = torch.zeros(n, dtype=ffn.W_out.dtype, device=device)
            mask[kept.to(device)] = 1
            comp = None
            if compensate and stats is not None:
                mean = stats[key].m_mean.to(device=device, dtype=ffn.W_out.dtype)
                comp = ffn.W_out.detach() @ ((1 - mask) * mean)  # [d]
            module, _, _ = site_hooks(ffn, "post")
            h1 = module.register_forward_pre_hook(lambda m, a, _mask=mask: (a[0] * _mask, *a[1:]))
            h2 = module.register_forward_hook(lambda m, a, o, _c=comp: o if _c is None else o + _c)
            try:
                logp = _log_probs(model, ids)
            finally:
                h1.remove()
                h2.remove()
            ys.append(_divergence(ref, logp))
            stage.advance()
        curves[key] = (list(ratios), ys)
    stage.close()
    return curves


# ----- the transform ------------------------------------------------------------------------------
def prune_(
    model: nn.Module,
    config: PruneConfig,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    stats: dict[UnitKey, UnitStats] | None = None,
    grads: dict[UnitKey, Tensor] | None = None,
    curves: dict[UnitKey, tuple[list[float], list[float]]] | None = None,
    progress: bool = False,
) -> PruneReport:
    """Remove the least important FFN neurons for real (smaller weights, updated config); atomic.

    ``calibration``: token ids [n, T] (default: ``config.samples`` windows of the calibration corpus,
    through ``tokenizer``). ``stats``: statistics from ``collect_stats`` on this (unpruned) model, to
    reuse across several runs; ``grads``: Taylor scores from ``taylor_scores`` on this model, likewise;
    ``curves``: the sensitivity curves of an earlier run at the same ratio (``sensitivity_curves``, or
    ``{(int(k), None): (report.sensitivity["ratios"], v) for k, v in report.sensitivity["kl"].items()}``).

    Example:
        >>> report = prune_(model, PruneConfig("wanda-sp", 0.3), tokenizer=tok)
        >>> [l["d_ff_after"] for l in report.layers][:3]
        [1075, 1075, 1075]
    """
    from ffnkit.evaluate import count_parameters

    start = time.perf_counter()
    all_ffns = find_ffns(model)
    ffns = select_ffns(all_ffns, config.layers)
    before = count_parameters(model, all_ffns)
    widths_before = {f.index: _widths(f) for f in ffns}
    if config.allocation == "sensitivity" and any(f.kind == "moe" for f in ffns):
        raise InvalidArgumentError(
            "sensitivity allocation measures dense FFNs only; use allocation 'uniform' or 'global' for MoE"
        )
    if config.compensate and config.bias_compensation and all(f.kind == "moe" for f in ffns):
        raise InvalidArgumentError(
            "bias compensation needs dense FFNs; v5 expert tensors have no output bias"
        )
    unit_list = [(k, u) for f in ffns for k, u in units(f)]
    keep: dict[FFN, Tensor] = {}
    biases: dict[FFN, Tensor] = {}
    w_out: dict[FFN, Tensor] = {}
    sens = None
    if config.ratio > 0:
        needs = SCORES.meta(config.method, "needs")
        needs_data = needs is not None or config.compensate or config.allocation == "sensitivity"
        taylor = needs == "grads" and grads is None
        sensitivity = config.allocation == "sensitivity" and curves is None
        ids = None
        if (needs_data and stats is None) or taylor or sensitivity:
            ids = _calibration(config, calibration, tokenizer)
        if needs_data and stats is None:
            stats = collect_stats(model, ids, all_ffns, covariance=config.reconstruct, progress=progress)
        if taylor:
            grads = taylor_scores(model, ids[: config.taylor_samples], all_ffns)
        scores = {k: neuron_scores(config.method, u, stats, k, grads).cpu() for k, u in unit_list}
        costs = {k: neuron_cost(u) for k, u in unit_list}
        share = config.lowest_share
        protected = {k: lowest_protected(s, share) for k, s in scores.items()} if share > 0 else None
        target = config.ratio * sum(f.num_parameters() for f in ffns)
        if config.compensate:  # a b_out added for the compensation is paid for with more neurons
            target += sum(f.d_model for f in ffns if f.kind != "moe" and f.b_out is None)
        if config.allocation == "sensitivity" and curves is not None:
            sens = {
                "ratios": next(iter(curves.values()))[0],
                "kl": {str(k[0]): c[1] for k, c in curves.items()},
            }
        elif config.allocation == "sensitivity":
            r = config.ratio
            # up to 2.5 r: a layer is never pruned past its last measured point (see allocate)
            grid = sorted({min(0.95, x) for x in (0.5 * r, r, 1.5 * r, 2 * r, 2.5 * r)})
            curves = sensitivity_curves(
                model,
                ffns,
                scores,
                stats,
                config.compensate,
                ids[: config.sensitivity_samples],
                grid,
                protected,
                progress=progress,
            )
            sens = {"ratios": grid, "kl": {str(k[0]): c[1] for k, c in curves.items()}}
        kept = allocate(scores, costs, target, config.allocation, config.protect_min, curves, protected)
        if config.align > 1:
            sizes = {k: s.numel() for k, s in scores.items()}
            kept = align_widths(
                kept, sizes, config.align, {k: _min_keep(n, config.protect_min) for k, n in sizes.items()}
            )
        keep, biases, w_out = _plan(ffns, scores, kept, stats, config, protected)
    edit_ffns_(model, keep, biases, w_out=w_out)
    after = count_parameters(model, find_ffns(model))
    layers = [
        {
            "index": f.index,
            "name": f.name,
            **{f"{k}_before": v for k, v in widths_before[f.index].items()},
            **{f"{k}_after": v for k, v in _widths(f).items()},
        }
        for f in ffns
    ]
    report = PruneReport(
        transform="prune",
        method=config.method,
        config=config.to_dict(),
        layers=layers,
        parameters_before=before,
        parameters_after=after,
        ffn_ratio_removed=1 - after["ffn"] / before["ffn"] if before["ffn"] else 0.0,
        bias_compensated=sorted(f.index for f in biases),
        sensitivity=sens,
        seconds=time.perf_counter() - start,
    )
    reports = list(getattr(model, "ffnkit_reports", []) or [])
    model.ffnkit_reports = [*reports, report.to_dict()]
    return report


def _widths(f: FFN) -> dict[str, int]:
    w = {"d_ff": f.d_ff}
    if f.shared is not None:
        w["shared_d_ff"] = f.shared.d_ff
    return w


def _refit(w: Tensor, st: UnitStats, kept: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Least-squares refit: W_K' = W_K + W_P A, c = W_P (μ_P − A μ_K), A = Σ_PK (Σ_KK + λI)⁻¹.

    The pruned neurons' contribution W_P m_P is replaced by its best linear prediction from the kept
    m_K (plus a constant); with A = 0 this is exactly FLAP's bias compensation.
    """
    n = w.shape[1]
    pruned = torch.ones(n, dtype=torch.bool)
    pruned[kept] = False
    mu, cov = st.m_mean, st.m_cov  # [n], [n, n] float64
    c_kk = cov[kept][:, kept]
    c_pk = cov[pruned][:, kept]
    reg = ridge * c_kk.diagonal().mean().clamp_min(1e-12)
    a = torch.linalg.solve(c_kk + reg * torch.eye(len(kept), dtype=cov.dtype), c_pk.T).T  # [P, K]
    w_p = w[:, pruned]  # [d, P]
    return w[:, kept] + w_p @ a, w_p @ (mu[pruned] - a @ mu[kept])


def _plan(
    ffns: list[FFN],
    scores: dict[UnitKey, Tensor],
    kept: dict[UnitKey, int],
    stats: dict[UnitKey, UnitStats] | None,
    config: PruneConfig,
    protected: dict[UnitKey, Tensor] | None = None,
) -> tuple[dict[FFN, Tensor], dict[FFN, Tensor], dict[FFN, Tensor]]:
    """Neuron indices per handle (experts: one common width), compensated b_out, refit W_out."""
    prot = protected or {}
    keep: dict[FFN, Tensor] = {}
    biases: dict[FFN, Tensor] = {}
    w_new: dict[FFN, Tensor] = {}
    for f in ffns:
        if f.kind == "moe":
            ekeys = [(f.index, e) for e in range(f.num_experts)]
            k = round(sum(kept[e] for e in ekeys) / len(ekeys))  # one width for the 3-D tensor
            step = math.lcm(_MOE_MULTIPLE, config.align)
            if f.d_ff >= step:  # grouped-matmul kernels need 16-byte strides (and --align's blocks)
                k = min(f.d_ff, max(step, step * round(k / step)))
            if k < f.d_ff:
                keep[f] = torch.stack([_keep_index(scores[e], k, prot.get(e)) for e in ekeys])  # [E, k]
            if f.shared is not None and kept[(f.index, "shared")] < f.shared.d_ff:
                sk = (f.index, "shared")
                keep[f.shared] = _keep_index(scores[sk], kept[sk], prot.get(sk))
            continue
        key = (f.index, None)
        if kept[key] >= f.d_ff:
            continue
        idx = _keep_index(scores[key], kept[key], prot.get(key))
        keep[f] = idx
        if not config.compensate or stats is None:
            continue
        st = stats[key]
        w = f.W_out.detach().double().cpu()  # [d, d_ff]
        b = (
            f.b_out.detach().double().cpu()
            if f.b_out is not None
            else torch.zeros(f.d_model, dtype=torch.float64)
        )
        if config.reconstruct:
            if st.m_cov is None:
                raise InvalidArgumentError("reconstruct needs Cov(m): collect_stats(..., covariance=True)")
            w_k, c = _refit(w, st, idx, config.ridge)
            w_new[f] = w_k
        else:
            pruned = torch.ones(f.d_ff, dtype=torch.bool)
            pruned[idx] = False
            c = w[:, pruned] @ st.m_mean[pruned]  # [d] = W_out[:, P] · E[m_P]
        biases[f] = b + c
    return keep, biases, w_new
