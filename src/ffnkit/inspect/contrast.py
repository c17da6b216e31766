"""Contrast two prompt sets: the neurons (and experts) whose activation differs most between them.

For each set, one streaming pass records per neuron (``post`` site, m_i) the firing rate p = P(neuron
active) (:mod:`ffnkit.core.criteria`: |m_i| > threshold · mean_j |m_j| on the token) and the mean and
population variance of m_i; per expert of MoE layers, the share
of tokens routed to it (top-k recomputed from the ``router`` site's logits), a 0/1 indicator per token.
Scores per unit, for sets a and b with token counts n_a, n_b:

- ``delta`` = p_a − p_b                           SteerMoE's risk difference (2509.09660), ranked by |Δ|
- ``cohens_d`` = (μ_a − μ_b) / s_pooled,  s_pooled = sqrt((n_a σ²_a + n_b σ²_b) / (n_a + n_b))
  (population variances; s_pooled floored at 1e-6 so d stays finite). For experts, μ = p and σ² = p(1 − p).

Prompts are run one at a time (no padding enters the statistics).

Example:
    >>> res = contrast(model, tok, ["I love it."], ["I hate it."], top=10)
    >>> res.neurons[0]             # {'layer': 4, 'neuron': 17, 'delta': 0.5, 'cohens_d': 1.9, ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.capture import capture
from ffnkit.core.config import Result
from ffnkit.core.criteria import ACTIVE_RULE, ACTIVE_THRESHOLD
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.reducers import FiringRate, Mean, Variance
from ffnkit.core.runner import evaluating, forward

POOLED_FLOOR = 1e-6  # s_pooled is floored here, so d stays finite (0 when the means are equal)

__all__ = [
    "ContrastResult",
    "RoutedShare",
    "SetStats",
    "contrast",
    "contrast_stats",
    "read_prompts",
    "set_stats",
]


class RoutedShare(Mean):
    """Share of tokens routed to each expert: top-k of router logits [N, E] as a 0/1 indicator, averaged."""

    name = "routed_share"

    def __init__(self, top_k: int = 1) -> None:
        self.top_k = int(top_k)
        super().__init__()

    def _config(self) -> tuple:
        return (self.top_k,)

    def _f(self, x: Tensor) -> Tensor:
        chosen = torch.topk(x, self.top_k, dim=-1).indices  # [N, k]; softmax keeps the order of logits
        return torch.zeros_like(x).scatter_(1, chosen, 1.0)  # [N, E]


@dataclass
class SetStats(Result):
    """Statistics of one prompt set: per dense layer {firing_rate, mean, var} [d_ff]; per MoE layer
    {routed_share} [E]; the number of tokens seen, and the active-neuron threshold used."""

    neurons: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    experts: dict[int, Tensor] = field(default_factory=dict)
    n_tokens: int = 0
    n_prompts: int = 0
    threshold: float = ACTIVE_THRESHOLD


@dataclass
class ContrastResult(Result):
    """The neurons and experts that differ most between two prompt sets (rows: layer, neuron or expert,
    p_a, p_b, delta, cohens_d; neurons also mean_a, mean_b), and how they were scored."""

    rank_by: str
    scores: dict[str, str]
    tokens: dict[str, int]
    prompts: dict[str, int]
    neurons: list[dict[str, Any]]
    experts: list[dict[str, Any]]
    threshold: float


def read_prompts(source: str | Path | Sequence[str]) -> list[str]:
    """Prompts from a list, or from a text file with one prompt per line (blank lines skipped)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidArgumentError(
                f"prompt file {str(path)!r} not found; give a text file, one prompt a line"
            )
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(
                f"prompt file {str(path)!r} is not UTF-8 text (byte {exc.start}); give a text file"
            ) from None
        if any("\x00" in p for p in prompts):
            raise InvalidArgumentError(f"prompt file {str(path)!r} holds NUL bytes: it is binary, not text")
    else:
        prompts = [str(p).strip() for p in source]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InvalidArgumentError(f"no prompts in {source!r}: give at least one non-empty line")
    return prompts


def set_stats(
    model: nn.Module,
    prompts: Iterable[Tensor],
    *,
    threshold: float = ACTIVE_THRESHOLD,
    layers: int | Iterable[int] | None = None,
) -> SetStats:
    """Stream one prompt set (token id tensors [T] or [1, T]) through the model and collect its statistics.

    Example:
        >>> ids = [tok(p, return_tensors="pt").input_ids for p in prompts]
        >>> s = set_stats(model, ids); s.neurons[0]["firing_rate"].shape    # [d_ff]
    """
    ffns = find_ffns(model)
    chosen = select_ffns(ffns, layers if layers is None or isinstance(layers, int) else list(layers))
    dense = [f.index for f in chosen if f.kind != "moe"]
    moe = [f for f in chosen if f.kind == "moe"]
    stats = SetStats(threshold=float(threshold))
    with evaluating(model), ExitStack() as stack:
        cap = None
        if dense:
            reducers = [Variance(), FiringRate(threshold)]
            cap = stack.enter_context(capture(model, "post", dense, reducers=reducers, ffns=ffns))
        moe_caps = [
            stack.enter_context(
                capture(model, "router", [f.index], reducers=[RoutedShare(f.router.top_k)], ffns=ffns)
            )
            for f in moe
        ]
        for ids in prompts:
            ids = ids.reshape(1, -1)  # one prompt at a time: no padding in the statistics
            if ids.numel() == 0:
                continue
            forward(model, ids)
            stats.n_tokens += ids.numel()
            stats.n_prompts += 1
    if stats.n_tokens == 0:
        raise InvalidArgumentError("the prompt set gave no tokens: give non-empty prompts")
    for i in dense:
        st = cap.stats("post", i)
        stats.neurons[i] = {"firing_rate": st["firing_rate"], "mean": st["var"].mean, "var": st["var"].var}
    for f, mcap in zip(moe, moe_caps, strict=True):
        stats.experts[f.index] = mcap.stats("router", f.index)["routed_share"]
    return stats


def _cohens_d(mean_a: Tensor, var_a: Tensor, n_a: int, mean_b: Tensor, var_b: Tensor, n_b: int) -> Tensor:
    pooled = ((n_a * var_a + n_b * var_b) / (n_a + n_b)).sqrt()
    # constant activations (pooled 0) with different means: a large finite d instead of inf (JSON-safe)
    return (mean_a - mean_b) / pooled.clamp_min(POOLED_FLOOR)


def contrast_stats(a: SetStats, b: SetStats, *, top: int = 20, rank_by: str = "delta") -> ContrastResult:
    """Rank neurons and experts by |Δ| (``rank_by="delta"``) or |Cohen's d| (``"cohens_d"``).

    Example:
        >>> contrast_stats(set_stats(model, ids_a), set_stats(model, ids_b), top=5).neurons[0]
    """
    if a.threshold != b.threshold:
        raise InvalidArgumentError(
            f"the two sets were measured with different thresholds ({a.threshold}, {b.threshold}); "
            "measure both with the same one"
        )
    if rank_by not in ("delta", "cohens_d"):
        raise InvalidArgumentError(f"rank_by must be 'delta' or 'cohens_d', got {rank_by!r}")
    if top < 1:
        raise InvalidArgumentError(f"top must be >= 1, got {top}")
    rows: list[dict[str, Any]] = []
    for layer, sa in a.neurons.items():
        sb = b.neurons[layer]
        delta = sa["firing_rate"] - sb["firing_rate"]  # [d_ff]
        d = _cohens_d(sa["mean"], sa["var"], a.n_tokens, sb["mean"], sb["var"], b.n_tokens)
        key = (delta if rank_by == "delta" else d).abs()
        # tie-break |Δ| by |d| so neurons with equal firing-rate differences still rank meaningfully
        key = key + 1e-9 * (d.abs() if rank_by == "delta" else delta.abs())
        for i in torch.topk(key, min(top, key.numel())).indices.tolist():
            rows.append(
                {
                    "layer": layer,
                    "neuron": i,
                    "p_a": float(sa["firing_rate"][i]),
                    "p_b": float(sb["firing_rate"][i]),
                    "delta": float(delta[i]),
                    "mean_a": float(sa["mean"][i]),
                    "mean_b": float(sb["mean"][i]),
                    "cohens_d": float(d[i]),
                    "_key": float(key[i]),
                }
            )
    experts: list[dict[str, Any]] = []
    for layer, pa in a.experts.items():
        pb = b.experts[layer]
        delta = pa - pb
        d = _cohens_d(pa, pa * (1 - pa), a.n_tokens, pb, pb * (1 - pb), b.n_tokens)
        key = (delta if rank_by == "delta" else d).abs()
        for e in range(pa.numel()):
            experts.append(
                {
                    "layer": layer,
                    "expert": e,
                    "p_a": float(pa[e]),
                    "p_b": float(pb[e]),
                    "delta": float(delta[e]),
                    "cohens_d": float(d[e]),
                    "_key": float(key[e]),
                }
            )

    def best(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items = sorted(items, key=lambda r: -r["_key"])[:top]
        return [{k: v for k, v in r.items() if k != "_key"} for r in items]

    return ContrastResult(
        rank_by=rank_by,
        scores={
            "delta": f"p_a - p_b: firing rate ({ACTIVE_RULE}) or share of tokens routed to the expert",
            "cohens_d": "(mean_a - mean_b) / max(sqrt((n_a var_a + n_b var_b) / (n_a + n_b)), 1e-6), "
            "population variances",
        },
        tokens={"a": a.n_tokens, "b": b.n_tokens},
        prompts={"a": a.n_prompts, "b": b.n_prompts},
        neurons=best(rows),
        experts=best(experts),
        threshold=a.threshold,
    )


def contrast(
    model: nn.Module,
    tokenizer: Any,
    a: str | Path | Sequence[str],
    b: str | Path | Sequence[str],
    *,
    top: int = 20,
    threshold: float = ACTIVE_THRESHOLD,
    rank_by: str = "delta",
    layers: int | Iterable[int] | None = None,
) -> ContrastResult:
    """Neurons and experts whose activation differs most between prompt sets ``a`` and ``b``.

    ``a`` / ``b``: lists of prompts, or text files with one prompt per line.

    Example:
        >>> res = contrast(model, tok, "happy.txt", "sad.txt", top=10)
        >>> [(r["layer"], r["neuron"], round(r["delta"], 2)) for r in res.neurons]
    """

    def encode(prompts: list[str]) -> list[Tensor]:
        return [torch.tensor(tokenizer(p)["input_ids"], dtype=torch.long) for p in prompts]

    sa = set_stats(model, encode(read_prompts(a)), threshold=threshold, layers=layers)
    sb = set_stats(model, encode(read_prompts(b)), threshold=threshold, layers=layers)
    return contrast_stats(sa, sb, top=top, rank_by=rank_by)
