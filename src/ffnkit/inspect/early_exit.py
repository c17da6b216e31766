"""Early exit: where does the logit lens already give the final answer, and a calibrated rule to stop there.

For every token, the logit lens (``ffnkit.inspect.lens.Lens``: final norm + unembedding) is read after
each block l = 1 … L (the residual stream leaving block l, taken by a hook before the model's final norm).

- **Saturation layer** (Geva et al. 2022): the first l such that the lens top-1 equals the model's final
  top-1 at l and at every later layer. Its distribution over layers is reported, and the "oracle" saving
  mean(L − sat) / L (what a perfect rule would save at 100% agreement).
- **Exit rules**: exit at the first layer l ≥ m whose lens top-1 probability is ≥ τ (with ``stable``:
  and whose lens top-1 equals layer l − 1's); no such layer: run all L. The prediction is that layer's
  lens top-1. Three rules are calibrated on the calibration split only, each picking the parameters that
  save most layers while keeping top-1 agreement with the full model ≥ ``target``:
  ``confidence`` (τ on the grid 0, 0.01, …, 1; m = 1), ``confidence_min_layer`` (τ and m = 1 … L), and
  ``confidence_min_layer_stable`` (τ, m and stable ∈ {no, yes}). With no rule reaching the target the
  fallback is "never exit" (agreement 1, nothing saved). Agreement and the share of layers saved,
  mean(L − exit layer) / L, are then measured on the evaluation split.
  Anchor (Geva 2022, GPT-2 16 layers): 94.9% agreement with ~21% of layers saved.

Example:
    >>> res = early_exit(model, calibration_batches(corpus, tok, 8, 128), eval_batches, target=0.95)
    >>> rule = res.rules["confidence_min_layer"]
    >>> rule.evaluation.agreement, rule.evaluation.layers_saved
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.blocks import blocks
from ffnkit.core.config import Result
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.progress import ProgressLike
from ffnkit.core.runner import check_causal_lm, run
from ffnkit.inspect.lens import Lens

__all__ = [
    "CalibratedRule",
    "EarlyExitResult",
    "ExitRule",
    "LensTrajectory",
    "Saturation",
    "apply_exit_rule",
    "calibrate_threshold",
    "early_exit",
    "lens_trajectory",
    "saturation_report",
]

NEVER = 1.01  # a threshold no probability reaches: every token runs all layers
# the rules early_exit calibrates and reports (all searched on the calibration split only)
RULES: dict[str, dict[str, bool]] = {
    "confidence": {},
    "confidence_min_layer": {"search_min_layer": True},
    "confidence_min_layer_stable": {"search_min_layer": True, "search_stable": True},
}
RULE_TEXT = {
    "confidence": "exit at the first layer whose lens top-1 probability >= threshold",
    "confidence_min_layer": "exit at the first layer >= min_layer whose lens top-1 probability >= threshold",
    "confidence_min_layer_stable": (
        "as confidence_min_layer, optionally (stable) also requiring the same lens top-1 as the layer before"
    ),
}


@dataclass
class ExitRule(Result):
    """One exit rule's parameters and what it gives on a trajectory: top-1 agreement with the full model,
    the share of layers saved mean(L − exit layer) / L, the mean exit layer (1 … L), tokens measured."""

    threshold: float
    min_layer: int
    stable: bool
    agreement: float
    layers_saved: float
    mean_exit_layer: float
    tokens: int


@dataclass
class Saturation(Result):
    """Saturation layers: their distribution over layers ({layer, tokens, share}, "never" last), mean
    and median (tokens that saturate), and the oracle saving."""

    n_layers: int
    tokens: int
    mean_saturation_layer: float | None
    median_saturation_layer: float | None
    oracle_layers_saved: float
    distribution: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CalibratedRule(Result):
    """A rule calibrated on the calibration split: its parameters, and its numbers on both splits."""

    description: str
    threshold: float
    min_layer: int
    stable: bool
    calibration: ExitRule
    evaluation: ExitRule


@dataclass
class EarlyExitResult(Result):
    """What :func:`early_exit` found: the calibrated rules by name and the saturation layers."""

    target_agreement: float
    rules: dict[str, CalibratedRule]
    saturation: Saturation
    saturation_calibration: Saturation
    anchor: str


@dataclass
class LensTrajectory(Result):
    """Per token: lens top-1 id and its probability after each block, and the model's final top-1.

    ``top1`` and ``prob`` are [L, N]; ``final`` is [N] (N = tokens).
    """

    top1: Tensor
    prob: Tensor
    final: Tensor

    @property
    def n_layers(self) -> int:
        return self.top1.shape[0]

    def saturation(self) -> Tensor:
        """Saturation layer per token, 1 … L ([N] long); L + 1 where even layer L disagrees."""
        agree = self.top1 == self.final[None]  # [L, N]
        # suffix AND: agree at l and every later layer
        suffix = agree.flip(0).to(torch.int64).cumprod(0).flip(0).bool()  # [L, N]
        trailing = suffix.sum(0)  # [N]
        return self.n_layers - trailing + 1


def lens_trajectory(
    model: nn.Module, batches: Tensor, *, batch_size: int = 4, progress: ProgressLike = False
) -> LensTrajectory:
    """Run ``batches`` [n, T] and read the logit lens after every block, for every token.

    Example:
        >>> traj = lens_trajectory(model, batches)
        >>> traj.top1.shape        # [n_layers, n * T]
    """
    check_causal_lm(model, "early exit")
    lens = Lens.of(model)
    blks = blocks(model)
    tops: list[list[Tensor]] = [[] for _ in blks]
    probs: list[list[Tensor]] = [[] for _ in blks]
    finals: list[Tensor] = []

    def hook(i: int):
        def read(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out  # [b, T, d]
            logits = lens.logits(h)  # [b, T, V] float32
            top, idx = logits.max(dim=-1)  # [b, T]
            prob = torch.exp(top - torch.logsumexp(logits, dim=-1))  # softmax at the top-1, no [b, T, V] copy
            tops[i].append(idx.reshape(-1).cpu())
            probs[i].append(prob.reshape(-1).cpu())

        return read

    handles = [b.module.register_forward_hook(hook(i)) for i, b in enumerate(blks)]
    try:
        for _, _, out in run(model, batches, batch_size=batch_size, progress=progress, stage="logit lens"):
            finals.append(out.logits.argmax(-1).reshape(-1).cpu())  # logits [b, T, V]
    finally:
        for h in handles:
            h.remove()
    return LensTrajectory(
        top1=torch.stack([torch.cat(t) for t in tops]),  # [L, N]
        prob=torch.stack([torch.cat(p) for p in probs]),  # [L, N]
        final=torch.cat(finals),  # [N]
    )


def _exit_hits(traj: LensTrajectory, threshold: float, stable: bool) -> Tensor:
    """[L, N] bool: the layers where the rule would let a token exit (before any min_layer)."""
    hit = traj.prob >= threshold  # [L, N]
    if stable:  # the top-1 must equal the previous layer's (never true at layer 1)
        same = torch.zeros_like(hit)
        same[1:] = traj.top1[1:] == traj.top1[:-1]
        hit = hit & same
    hit[-1] = True  # the last layer always "exits": the full model
    return hit


def _exit_index(traj: LensTrajectory, threshold: float, min_layer: int, stable: bool) -> Tensor:
    """0-based exit layer per token [N]: the first l ≥ min_layer that passes the rule, else the last."""
    hit = _exit_hits(traj, threshold, stable)
    hit[: max(0, min(min_layer, traj.n_layers) - 1)] = False
    hit[-1] = True
    return hit.to(torch.int64).argmax(0)  # first True


def _score(traj: LensTrajectory, first: Tensor) -> tuple[float, float, float]:
    L = traj.n_layers
    pred = traj.top1.gather(0, first[None]).squeeze(0)  # [N]
    pred = torch.where(first == L - 1, traj.final, pred)  # running every layer gives the model's own answer
    exit_layer = (first + 1).double()  # 1 … L
    return (
        float((pred == traj.final).double().mean()),
        float(((L - exit_layer) / L).mean()),
        float(exit_layer.mean()),
    )


def apply_exit_rule(
    traj: LensTrajectory, threshold: float, *, min_layer: int = 1, stable: bool = False
) -> ExitRule:
    """Exit at the first layer l ≥ ``min_layer`` whose lens top-1 probability is ≥ ``threshold`` (and, with
    ``stable``, whose top-1 equals layer l − 1's); no such layer: run all L. Agreement and layers saved.

    Example:
        >>> apply_exit_rule(traj, 0.0).mean_exit_layer       # 1.0: every token exits after block 1
    """
    agreement, saved, mean_exit = _score(traj, _exit_index(traj, threshold, min_layer, stable))
    return ExitRule(
        threshold=float(threshold),
        min_layer=int(min_layer),
        stable=bool(stable),
        agreement=agreement,
        layers_saved=saved,
        mean_exit_layer=mean_exit,
        tokens=int(traj.final.numel()),
    )


def calibrate_threshold(
    traj: LensTrajectory,
    target: float = 0.95,
    grid: Tensor | None = None,
    *,
    search_min_layer: bool = False,
    search_stable: bool = False,
) -> ExitRule:
    """The rule that saves most layers with agreement ≥ ``target`` on this trajectory.

    Searches thresholds in ``grid`` (default 0, 0.01, …, 1), and optionally every ``min_layer`` 1 … L and
    ``stable`` in {False, True}; ties go to the higher agreement. Falls back to "never exit" (threshold
    1.01: agreement 1, nothing saved) when no rule reaches the target.

    Example:
        >>> calibrate_threshold(traj, target=0.95).threshold
    """
    if not 0.0 <= target <= 1.0:
        raise InvalidArgumentError(f"target agreement must be in [0, 1], got {target}")
    grid = torch.linspace(0, 1, 101) if grid is None else grid
    layers = range(1, traj.n_layers + 1) if search_min_layer else (1,)
    stables = (False, True) if search_stable else (False,)
    best: tuple[float, float] | None = None
    chosen = (NEVER, 1, False)
    L = traj.n_layers
    steps = torch.arange(L)[:, None]  # [L, 1]
    for stable in stables:
        for t in sorted(float(x) for x in grid):
            hit = _exit_hits(traj, t, stable)  # [L, N]
            # exit index for every min_layer m at once: the first hit at or after layer m (reverse cummin)
            idx = torch.where(hit, steps, torch.full_like(steps, L - 1))
            first = idx.flip(0).cummin(0).values.flip(0)  # [L, N]: row m - 1 = exit index for min_layer m
            pred = torch.where(first == L - 1, traj.final[None], traj.top1.gather(0, first))  # [L, N]
            agreement = (pred == traj.final[None]).double().mean(1)  # [L]
            saved = ((L - 1 - first).double() / L).mean(1)  # [L]
            for m in layers:
                a, sv = float(agreement[m - 1]), float(saved[m - 1])
                if a >= target and (best is None or (sv, a) > best):
                    best, chosen = (sv, a), (t, m, stable)
    t, m, stable = chosen
    return apply_exit_rule(traj, t, min_layer=m, stable=stable)


def _distribution(sat: Tensor, L: int) -> list[dict[str, Any]]:
    counts = torch.bincount(sat, minlength=L + 2)[1:]  # layers 1 … L + 1
    n = max(1, sat.numel())
    rows = [{"layer": i + 1, "tokens": int(c), "share": float(c) / n} for i, c in enumerate(counts[:L])]
    if counts[L]:
        rows.append({"layer": "never", "tokens": int(counts[L]), "share": float(counts[L]) / n})
    return rows


def saturation_report(traj: LensTrajectory) -> Saturation:
    """Saturation-layer distribution, its mean and median, and the oracle saving.

    Example:
        >>> saturation_report(lens_trajectory(model, batches)).oracle_layers_saved
    """
    L = traj.n_layers
    sat = traj.saturation()
    ok = sat[sat <= L].double()
    return Saturation(
        n_layers=L,
        tokens=int(sat.numel()),
        mean_saturation_layer=float(ok.mean()) if ok.numel() else None,
        median_saturation_layer=float(ok.median()) if ok.numel() else None,
        oracle_layers_saved=float(((L - ok) / L).sum() / max(1, sat.numel())),
        distribution=_distribution(sat, L),
    )


def early_exit(
    model: nn.Module,
    calibration: Tensor,
    evaluation: Tensor,
    *,
    target: float = 0.95,
    batch_size: int = 4,
    progress: ProgressLike = False,
) -> EarlyExitResult:
    """Saturation layers on the evaluation split, and the confidence exit rule calibrated on calibration.

    Args:
        calibration, evaluation: token ids [n, T] from the two splits (never the same text).
        target: top-1 agreement with the full model the rule must keep on calibration.

    Example:
        >>> res = early_exit(model, cal, ev, target=0.95)
        >>> {name: r.evaluation.layers_saved for name, r in res.rules.items()}
    """
    cal = lens_trajectory(model, calibration, batch_size=batch_size, progress=progress)
    ev = lens_trajectory(model, evaluation, batch_size=batch_size, progress=progress)
    rules = {}
    for name, kwargs in RULES.items():
        c = calibrate_threshold(cal, target, **kwargs)
        rules[name] = CalibratedRule(
            description=RULE_TEXT[name],
            threshold=c.threshold,
            min_layer=c.min_layer,
            stable=c.stable,
            calibration=c,
            evaluation=apply_exit_rule(ev, c.threshold, min_layer=c.min_layer, stable=c.stable),
        )
    return EarlyExitResult(
        target_agreement=target,
        rules=rules,
        saturation=saturation_report(ev),
        saturation_calibration=saturation_report(cal),
        anchor="Geva et al. 2022 (GPT-2, 16 layers): 94.9% top-1 agreement, ~21% of layers saved",
    )
