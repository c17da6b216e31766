"""Neuron importance scores for structured FFN pruning (METHODS.md §3), one registered function each.

Higher = more important. Each score is a function of :class:`ScoreInputs` (one pruning unit's weights in
float64 on the CPU, plus the calibration statistics or Taylor importances it ``needs``) returning a
float64 [n] tensor. Registering a score here makes it a pruning method everywhere: ``PruneConfig(method=)``,
``NestConfig(score=)`` and ``ffnkit compress --method``. This module imports no torch, so the CLI can
list the scores without loading it.

Scores (n = d_ff, per unit, float64 [n]):

- ``magnitude``  ‖W_in[i]‖·‖v_i‖, data-free; gated FFNs multiply in ‖W_gate[i]‖ too (the neuron's
  output scales with each of the three).
- ``wanda-sp``   mean_r |W_out[r, i]| · ‖m_i‖₂ (‖m_i‖₂ as √E[m_i²]: a per-unit constant factor apart).
- ``flap``       Var(m_i) · ‖v_i‖² — the fluctuation of what neuron i writes (its mean is compensable).
- ``lorap``      ‖(|W_in| · √E[x²])[i]‖ + ‖(|W_gate| · √E[x²])[i]‖ + ‖|v_i|‖ · √E[m_i²]. LoRAP also
  never removes the lowest-scored 1% of each layer's neurons (its ``keep_lowest`` in :data:`SCORES`,
  :func:`ffnkit.compress.scores.lowest_protected`): its reference code (github lihuang258/LoRAP, ``utils/prune.py``
  ``prune_mlp``, ``--mlp_least_save_ratio 0.01``) sorts the scores ascending and removes
  ``sorted[⌊0.01·n⌋ : ⌊(s + 0.01)·n⌋]``, skipping the bottom 1%.
- ``taylor``     Σ over neuron i's weights (row of W_in, W_gate, b_in, b_gate; column of W_out) of
  |W ⊙ ∂L/∂W|, gradients of the LM loss summed over a few calibration samples (LLM-Pruner's first order).
- ``frequency``  share of tokens where the neuron is active, relative to its layer on that token:
  |m_i(t)| ≥ 0.1 · mean_j |m_j(t)| (scale-free, so it works for SiLU/GELU as well as ReLU).

Adding a score is one function here (and one test line)::

    @SCORES.register("l1", help="mean |W_out[:, i]| (data-free)", needs=None)
    def l1_score(x: ScoreInputs) -> Tensor:
        return x.w_out.abs().mean(0)

Example:
    >>> SCORES.names()
    ['magnitude', 'wanda-sp', 'flap', 'lorap', 'taylor', 'frequency']
    >>> SCORES.get("flap")(ScoreInputs(ffn, w_in, w_out, w_gate, stats=unit_stats))   # [n]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ffnkit.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

    from ffnkit.core.ffn import FFN

__all__ = ["SCORES", "ScoreInputs", "UnitStats"]


@dataclass
class UnitStats:
    """Calibration statistics of one pruning unit (float64, CPU)."""

    count: int  # tokens seen
    m_mean: Tensor  # [n] E[m]
    m_var: Tensor  # [n] Var(m) (population)
    m_sq: Tensor  # [n] E[m²]
    firing: Tensor  # [n] relative firing rate
    x_sq: Tensor  # [d] E[x²] of the unit's input tokens
    m_cov: Tensor | None = None  # [n, n] Cov(m) (population), when collected (least-squares refit)


@dataclass
class ScoreInputs:
    """What a score function reads for one pruning unit: its weights in float64 on the CPU, and the
    calibration statistics (``needs="stats"``) or Taylor importances (``needs="grads"``) it asked for.

    Example:
        >>> SCORES.get("magnitude")(ScoreInputs(ffn, w_in, w_out, w_gate))   # [n]
    """

    unit: FFN
    w_in: Tensor  # [n, d]
    w_out: Tensor  # [d, n]
    w_gate: Tensor | None = None  # [n, d] (gated FFNs)
    stats: UnitStats | None = None
    grads: Tensor | None = None  # [n]


# name -> score function (ScoreInputs) -> [n] float64, higher = keep. Metadata: ``needs`` ("stats": a
# calibration pass, "grads": taylor_scores, None: data-free) and ``keep_lowest`` (share of each unit's
# lowest-scored neurons never removed). Every score is also a pruning method of ``ffnkit compress``.
SCORES: Registry[Callable[[ScoreInputs], Tensor]] = Registry("score")


@SCORES.register("magnitude", help="weight norms ‖W_in[i]‖·‖v_i‖ (·‖W_gate[i]‖), data-free", needs=None)
def magnitude_score(x: ScoreInputs) -> Tensor:
    """‖W_in[i]‖·‖v_i‖, times ‖W_gate[i]‖ on gated FFNs. Example: ``SCORES.get("magnitude")(inputs)``."""
    s = x.w_in.norm(dim=1) * x.w_out.norm(dim=0)  # [n]
    return s * x.w_gate.norm(dim=1) if x.w_gate is not None else s


@SCORES.register("wanda-sp", help="mean |W_out| · ‖m‖ (Wanda-sp)", needs="stats")
def wanda_sp_score(x: ScoreInputs) -> Tensor:
    """mean_r |W_out[r, i]| · √E[m_i²]. Example: ``SCORES.get("wanda-sp")(inputs)``."""
    return x.w_out.abs().mean(0) * x.stats.m_sq.sqrt()


@SCORES.register("flap", help="Var(m)·‖v‖², bias compensation (FLAP)", needs="stats")
def flap_score(x: ScoreInputs) -> Tensor:
    """Var(m_i)·‖v_i‖²: the fluctuation of what neuron i writes. Example: ``SCORES.get("flap")(inputs)``."""
    return x.stats.m_var * x.w_out.norm(dim=0) ** 2


@SCORES.register("lorap", help="LoRAP's activation-weighted norms", needs="stats", keep_lowest=0.01)
def lorap_score(x: ScoreInputs) -> Tensor:
    """‖(|W_in|·√E[x²])[i]‖ (+ the same for W_gate) + ‖v_i‖·√E[m_i²]. Example: ``SCORES.get("lorap")(inputs)``."""
    xs = x.stats.x_sq.sqrt()  # [d]
    s = (x.w_in.abs() * xs).norm(dim=1) + x.w_out.abs().norm(dim=0) * x.stats.m_sq.sqrt()
    return s + (x.w_gate.abs() * xs).norm(dim=1) if x.w_gate is not None else s


@SCORES.register("taylor", help="first-order Taylor |W ⊙ ∂L/∂W|", needs="grads")
def taylor_score(x: ScoreInputs) -> Tensor:
    """The Taylor importances :func:`taylor_scores` computed. Example: ``SCORES.get("taylor")(inputs)``."""
    return x.grads


@SCORES.register("frequency", help="activation frequency", needs="stats")
def frequency_score(x: ScoreInputs) -> Tensor:
    """Share of tokens where |m_i| ≥ 0.1 × the layer's mean |m|. Example: ``SCORES.get("frequency")(inputs)``."""
    return x.stats.firing.clone()
