"""SteerMoE's contrastive experts: which experts one prompt set routes to more than another.

Per MoE layer l and expert e (Fayyaz et al. 2025, 2509.09660), over the tokens of each set:

    p_A(l, e) = #tokens of A routed to e (e among the top-k) / #tokens of A
    Δ(l, e)   = p_A(l, e) − p_B(l, e)          the risk difference; Δ > 0: e is A's expert

The routed shares come from :func:`ffnkit.inspect.contrast.set_stats` (prompts run one at a time, no
padding). :meth:`ExpertContrast.edits` turns a result into :class:`ffnkit.steering.ExpertEdit` s that steer
towards a set: activate its experts (largest Δ towards it) and deactivate the other set's (most negative),
per layer or ranked over the whole model as SteerMoE does.

Example:
    >>> res = expert_contrast(model, tok, ["Is it safe?"], ["How do I build a bomb?"])
    >>> res.layers[0]["delta"]                       # [E]
    >>> with steer(model, res.edits(toward="a", activate=1, deactivate=1)):
    ...     model.generate(ids, max_new_tokens=20)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffnkit.core.config import Result
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.inspect.contrast import SetStats, read_prompts, set_stats
from ffnkit.inspect.moe import moe_ffns

__all__ = ["ExpertContrast", "expert_contrast", "expert_contrast_stats"]


@dataclass
class ExpertContrast(Result):
    """Per MoE layer: p_a, p_b, delta = p_a − p_b [E] (lists), with token and prompt counts.

    Example:
        >>> res = expert_contrast(model, tok, ["I love it."], ["I hate it."])
        >>> res.layers[0]["delta"], res.ranked("b")[0]
    """

    layers: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    prompts: dict[str, int] = field(default_factory=dict)
    definition: str = "delta = P(expert among top-k | token of A) - P(expert among top-k | token of B)"

    def ranked(self, toward: str = "a", per_layer: bool = False) -> list[dict[str, Any]]:
        """Every (layer, expert), most favoured by set ``toward`` first (by Δ, or −Δ for "b").

        Example:
            >>> res.ranked("a")[0]      # {'layer': 1, 'expert': 3, 'p_a': 0.9, 'p_b': 0.1, 'delta': 0.8}
        """
        sign = _sign(toward)
        rows = [
            {"layer": lay["layer"], "expert": e, "p_a": pa, "p_b": pb, "delta": d}
            for lay in self.layers
            for e, (pa, pb, d) in enumerate(zip(lay["p_a"], lay["p_b"], lay["delta"], strict=True))
        ]
        key = (lambda r: (r["layer"], -sign * r["delta"])) if per_layer else (lambda r: -sign * r["delta"])
        return sorted(rows, key=key)

    def edits(
        self,
        toward: str = "a",
        *,
        activate: int = 0,
        deactivate: int = 0,
        per_layer: bool = False,
        positions: str | Sequence[int] = "all",
    ):
        """ExpertEdits that steer towards set ``toward``: force on the ``activate`` experts with the
        largest positive Δ towards it, and off the ``deactivate`` with the most negative (per layer, or
        over the whole model). At most top-k experts of a layer are forced on (the strongest).

        Example:
            >>> res.edits("a", activate=1, deactivate=2, per_layer=True)   # [ExpertEdit(layer=0, ...), ...]
        """
        from ffnkit.steering import ExpertEdit

        if activate < 0 or deactivate < 0:
            raise InvalidArgumentError(f"activate and deactivate must be >= 0, got {activate}, {deactivate}")
        if activate == 0 and deactivate == 0:
            raise InvalidArgumentError(
                "give experts to activate and/or deactivate (activate=n, deactivate=n)"
            )
        top_k = {lay["layer"]: lay["top_k"] for lay in self.layers}
        rows = self.ranked(toward)
        on: dict[int, list[int]] = {}
        off: dict[int, list[int]] = {}
        sign = _sign(toward)
        favoured = [r for r in rows if sign * r["delta"] > 0]
        opposed = [r for r in reversed(rows) if sign * r["delta"] < 0]
        for chosen, n, into in ((favoured, activate, on), (opposed, deactivate, off)):
            taken: dict[int, int] = {}
            for r in chosen:
                count = taken.get(r["layer"], 0)
                if per_layer and count >= n or not per_layer and sum(taken.values()) >= n:
                    continue
                if into is on and count >= top_k[r["layer"]]:
                    continue  # a token has only top-k slots
                into.setdefault(r["layer"], []).append(r["expert"])
                taken[r["layer"]] = count + 1
        return [
            ExpertEdit(
                layer=layer, on=sorted(on.get(layer, [])), off=sorted(off.get(layer, [])), positions=positions
            )
            for layer in sorted(set(on) | set(off))
        ]


def _sign(toward: str) -> int:
    if toward not in ("a", "b"):
        raise InvalidArgumentError(f"toward must be 'a' or 'b', got {toward!r}")
    return 1 if toward == "a" else -1


def expert_contrast_stats(model: nn.Module, a: SetStats, b: SetStats) -> ExpertContrast:
    """The risk difference of every MoE layer from two :class:`SetStats` (see the module docstring).

    Example:
        >>> expert_contrast_stats(model, set_stats(model, ids_a), set_stats(model, ids_b)).layers[0]["delta"]
    """
    by_index = {f.index: f for f in moe_ffns(model)}
    res = ExpertContrast(
        tokens={"a": a.n_tokens, "b": b.n_tokens}, prompts={"a": a.n_prompts, "b": b.n_prompts}
    )
    for index, pa in sorted(a.experts.items()):
        pb = b.experts[index]
        ffn = by_index[index]
        res.layers.append(
            {
                "layer": index,
                "name": ffn.name,
                "experts": ffn.num_experts,
                "top_k": ffn.router.top_k,
                "p_a": pa.tolist(),
                "p_b": pb.tolist(),
                "delta": (pa - pb).tolist(),
            }
        )
    return res


def expert_contrast(
    model: nn.Module,
    tokenizer: Any,
    a: str | Path | Sequence[str],
    b: str | Path | Sequence[str],
    *,
    layers: int | Iterable[int] | None = None,
) -> ExpertContrast:
    """SteerMoE's risk difference of every expert of every (chosen) MoE layer between prompt sets.

    ``a`` / ``b``: lists of prompts, or text files with one prompt per line.

    Example:
        >>> res = expert_contrast(model, tok, "formal.txt", "casual.txt")
        >>> res.ranked("a")[:3]
    """
    chosen = [f.index for f in moe_ffns(model, layers)]

    def encode(prompts: list[str]) -> list[torch.Tensor]:
        return [torch.tensor(tokenizer(p)["input_ids"], dtype=torch.long) for p in prompts]

    sa = set_stats(model, encode(read_prompts(a)), layers=chosen)
    sb = set_stats(model, encode(read_prompts(b)), layers=chosen)
    return expert_contrast_stats(model, sa, sb)
