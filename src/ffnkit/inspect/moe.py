"""Read mixture-of-experts layers: expert load, co-selection, router entropy, imbalance, vocabulary.

One streaming pass over a corpus (token batches [n, T]) or a prompt set (token id tensors, one prompt at a
time, so no padding enters the statistics). At each MoE layer a hook on the router reads what the model
actually routed (transformers v5 routers return ``(logits, top-k weights, top-k indices)``; steering
edits made with :func:`ffnkit.steering.steer` are therefore seen), and one :class:`RoutingReducer` per
layer keeps sums whose size does not grow with the number of tokens. With N tokens, E experts, top-k:

- ``load[e]``          = P(e is among the token's top-k) = #tokens routed to e / N      (sums to k)
- ``token_share[e]``   = load[e] / k                                                     (sums to 1)
- ``weight_share[e]``  = Σ_t w_te / Σ_t Σ_e w_te (routing weight the expert received)    (sums to 1)
- ``mean_prob[e]``     = mean router probability softmax(logits)_e ("importance")        (sums to 1)
- ``coselection[i, j]``= P(i and j both chosen for a token); symmetric, diagonal = load
- ``entropy``          = H(softmax(logits)) in nats per token: mean, std, and a histogram of H / ln E
- ``imbalance``        = max(load) / mean(load), and the coefficient of variation std(load) / mean(load)
  (population std); 1 and 0 for perfectly balanced routing.
- ``shared_gate``      = mean sigmoid gate of the shared expert (Qwen2-MoE), where the layer has one.

:func:`expert_vocab` projects experts onto the vocabulary (:mod:`ffnkit.inspect.vocab`'s rule): each
expert's mean value vector mean_i v_i, and optionally its ``neurons`` value vectors of largest norm.

Example:
    >>> stats = moe_stats(model, calibration_batches(load_corpus("shakespeare"), tok, n_samples=8))
    >>> stats.layers[0].load.sum()          # == top_k
    >>> stats.to_dict()["layers"][0]["imbalance"]
    >>> expert_vocab(model, tok, layers=[0], top_k=5).experts[0]["promoted"]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.config import Result
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.progress import ProgressLike, track
from ffnkit.core.reducers import Mean, Reducer
from ffnkit.core.runner import evaluating, forward

ENTROPY_BINS = 20  # histogram of H / ln E over [0, 1]

__all__ = [
    "ExpertVocab",
    "LayerRouting",
    "MoEStats",
    "RoutingReducer",
    "expert_vocab",
    "moe_ffns",
    "moe_stats",
    "routing_matrix",
]


def moe_ffns(
    model: nn.Module, layers: int | Iterable[int] | None = None, *, name: str = "this model"
) -> list[FFN]:
    """The chosen FFNs that are mixtures of experts; a one-line error if there are none.

    Example:
        >>> [f.index for f in moe_ffns(model)]        # e.g. [0, 1]
    """
    ffns = find_ffns(model)
    chosen = select_ffns(ffns, layers if layers is None or isinstance(layers, int) else list(layers))
    moe = [f for f in chosen if f.kind == "moe"]
    if not moe:
        if not any(f.kind == "moe" for f in ffns):
            raise InvalidArgumentError(
                f"{name} is not a mixture of experts (every FFN is dense); give an MoE model "
                "(mixtral, qwen2_moe, qwen3_moe, olmoe) or convert one with `ffnkit moe convert`"
            )
        raise InvalidArgumentError(
            f"none of the chosen layers is a mixture of experts; MoE layers: "
            f"{[f.index for f in ffns if f.kind == 'moe']}"
        )
    return moe


def routing_matrix(out: Any, num_experts: int, top_k: int, norm_topk: bool) -> Tensor:
    """A router's output as one tensor [N, 3E]: logits | routing weight per expert | chosen (0/1).

    ``out`` is what the router returned: ``(logits [N, E], weights [N, k], indices [N, k])`` in the
    transformers v5 layout (an index equal to E means "no expert"), or bare logits, routed then with the
    usual softmax / top-k (/ renormalise) rule.

    Example:
        >>> m = routing_matrix(gate(x), 4, 2, True); m[:, 8:].sum(-1)   # == 2 per token
    """
    if isinstance(out, tuple) and len(out) == 3:
        logits, weights, indices = out  # [N, E], [N, k], [N, k]
    else:
        logits = out[0] if isinstance(out, tuple) else out
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        if norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
    logits = logits.reshape(-1, num_experts).float()  # [N, E]
    n = logits.shape[0]
    idx = indices.reshape(n, -1).long()  # [N, k]
    w = weights.reshape(n, -1).float()  # [N, k]
    dense_w = torch.zeros(n, num_experts + 1, device=logits.device)  # column E collects "no expert"
    dense_w.scatter_add_(1, idx, w)
    chosen = torch.zeros(n, num_experts + 1, device=logits.device)
    chosen.scatter_(1, idx, 1.0)
    return torch.cat([logits, dense_w[:, :num_experts], chosen[:, :num_experts]], dim=1)  # [N, 3E]


class RoutingReducer(Reducer):
    """Streaming routing statistics of one MoE layer from :func:`routing_matrix` rows [N, 3E].

    State (all sums, so ``merge`` adds them): chosen counts [E], routing weight [E], router probability
    [E], co-selection counts [E, E], Σ H, Σ H², and a histogram of H / ln E (``bins`` bins over [0, 1]).

    Example:
        >>> r = RoutingReducer(4); r.update(routing_matrix(gate(x), 4, 2, True)); r.result()["load"]
    """

    name = "routing"

    def __init__(self, num_experts: int, bins: int = ENTROPY_BINS) -> None:
        if num_experts < 1 or bins < 1:
            raise InvalidArgumentError(
                f"RoutingReducer needs num_experts >= 1 and bins >= 1, got {num_experts}, {bins}"
            )
        self.num_experts, self.bins = int(num_experts), int(bins)
        super().__init__()

    def _config(self) -> tuple:
        return (self.num_experts, self.bins)

    def _summarise(self, x: Tensor) -> dict[str, Tensor]:  # x [N, 3E] float64
        e = self.num_experts
        if x.shape[1] != 3 * e:
            raise InvalidArgumentError(
                f"RoutingReducer({e}) takes rows [N, {3 * e}], got {x.shape[1]} columns"
            )
        logits, w, chosen = x[:, :e], x[:, e : 2 * e], x[:, 2 * e :]
        probs = torch.softmax(logits, dim=-1)  # [N, E]
        h = -torch.special.xlogy(probs, probs).sum(-1)  # [N] nats
        norm = h / math.log(e) if e > 1 else torch.zeros_like(h)
        bucket = (norm * self.bins).floor().clamp(0, self.bins - 1).long()  # [N]
        return {
            "chosen": chosen.sum(0),  # [E]
            "weight": w.sum(0),  # [E]
            "prob": probs.sum(0),  # [E]
            "cosel": chosen.T @ chosen,  # [E, E]
            "h": h.sum().reshape(1),
            "h2": (h * h).sum().reshape(1),
            "hist": torch.bincount(bucket, minlength=self.bins).to(torch.float64),  # [bins]
        }

    def result(self) -> dict[str, Tensor | float]:
        self._need_data()
        s = {k: v.cpu() for k, v in self._state.items()}
        n = self.count
        mean_h = float(s["h"][0]) / n
        var_h = max(float(s["h2"][0]) / n - mean_h**2, 0.0)
        return {
            "load": s["chosen"] / n,
            "weight_share": s["weight"] / s["weight"].sum().clamp_min(1e-300),
            "mean_prob": s["prob"] / n,
            "coselection": s["cosel"] / n,
            "entropy_mean": mean_h,
            "entropy_std": math.sqrt(var_h),
            "entropy_hist": s["hist"].long(),
        }


@dataclass
class LayerRouting(Result):
    """Routing statistics of one MoE layer (tensors [E] / [E, E] on the CPU, float64).

    Example:
        >>> row = moe_stats(model, batches).layer(0)
        >>> row.load.sum(), row.token_share.sum(), row.imbalance["cv"]     # top_k, 1.0, ...
    """

    layer: int  # FFN index (as in find_ffns)
    name: str
    experts: int
    top_k: int
    tokens: int
    load: Tensor  # [E] P(expert chosen), sums to top_k
    weight_share: Tensor  # [E] sums to 1
    mean_prob: Tensor  # [E] sums to 1
    coselection: Tensor  # [E, E] P(i and j chosen), diagonal = load
    entropy_mean: float  # nats
    entropy_std: float
    entropy_hist: Tensor  # [bins] token counts of H / ln E
    shared_gate: float | None = None  # mean sigmoid gate of the shared expert

    @property
    def token_share(self) -> Tensor:  # [E] sums to 1
        return self.load / self.top_k

    @property
    def imbalance(self) -> dict[str, float]:
        """max/mean of the load and its coefficient of variation (population std / mean)."""
        mean = float(self.load.mean())
        return {
            "max_over_mean": float(self.load.max()) / mean if mean > 0 else float("nan"),
            "cv": float(self.load.std(unbiased=False)) / mean if mean > 0 else float("nan"),
        }

    def to_dict(self) -> dict[str, Any]:
        max_h = math.log(self.experts) if self.experts > 1 else 0.0
        return {
            "layer": self.layer,
            "name": self.name,
            "experts": self.experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "load": self.load.tolist(),
            "token_share": self.token_share.tolist(),
            "weight_share": self.weight_share.tolist(),
            "mean_prob": self.mean_prob.tolist(),
            "coselection": self.coselection.tolist(),
            "entropy": {
                "mean_nats": self.entropy_mean,
                "std_nats": self.entropy_std,
                "max_nats": max_h,
                "mean_normalised": self.entropy_mean / max_h if max_h else 0.0,
                "histogram_normalised": self.entropy_hist.tolist(),
            },
            "imbalance": self.imbalance,
            "shared_gate": self.shared_gate,
        }


@dataclass
class MoEStats(Result):
    """What :func:`moe_stats` returns: one :class:`LayerRouting` per MoE layer, and the token count.

    Example:
        >>> doc = moe_stats(model, batches).to_dict(); doc["layers"][0]["entropy"]["mean_nats"]
    """

    layers: list[LayerRouting] = field(default_factory=list)
    n_tokens: int = 0
    definitions: dict[str, str] = field(default_factory=dict)

    def layer(self, index: int) -> LayerRouting:
        """The statistics of FFN ``index``."""
        for row in self.layers:
            if row.layer == index:
                return row
        raise InvalidArgumentError(
            f"layer {index} was not measured; measured: {[r.layer for r in self.layers]}"
        )


DEFINITIONS = {
    "load": "P(expert among the token's top-k) = tokens routed to it / tokens; sums to top_k",
    "token_share": "load / top_k; sums to 1",
    "weight_share": "routing weight the expert received / all routing weight; sums to 1",
    "mean_prob": "mean router probability softmax(logits); sums to 1",
    "coselection": "P(experts i and j both chosen for a token); symmetric, diagonal = load",
    "entropy": "H(softmax(router logits)) per token in nats; histogram of H / ln(E) in equal bins over [0, 1]",
    "imbalance": "max(load) / mean(load) and coefficient of variation std(load) / mean(load), population std",
    "shared_gate": "mean sigmoid gate of the shared expert (null where the layer has none)",
}


def _token_batches(
    batches: Tensor | Iterable[Tensor], batch_size: int, progress: ProgressLike
) -> Iterable[Tensor]:
    """[n, T] tensors in rows of ``batch_size``, or a list of prompts one at a time (no padding)."""
    if torch.is_tensor(batches):
        if batches.dim() != 2:
            raise InvalidArgumentError(
                f"token batches must be [n_samples, seq_len], got {tuple(batches.shape)}"
            )
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
        starts = range(0, batches.shape[0], batch_size)
        return (batches[s : s + batch_size] for s in track(starts, progress, "moe stats", unit="batch"))
    return (
        torch.as_tensor(ids).reshape(1, -1)
        for ids in track(list(batches), progress, "moe stats", unit="prompt")
    )


def moe_stats(
    model: nn.Module,
    batches: Tensor | Iterable[Tensor],
    *,
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    bins: int = ENTROPY_BINS,
    progress: ProgressLike = False,
) -> MoEStats:
    """Expert load, co-selection, router entropy and imbalance of every chosen MoE layer, streamed.

    Args:
        batches: token ids [n_samples, seq_len] (e.g. ``calibration_batches``), or prompts as token id
            tensors [T] / [1, T], run one at a time.
        layers: FFN indices (None = every MoE layer); dense layers among them are an error only if no
            MoE layer is left.

    Example:
        >>> res = moe_stats(model, batches)
        >>> res.layers[0].coselection.diagonal()     # == res.layers[0].load
    """
    chosen = moe_ffns(model, layers)
    reducers = {f.index: RoutingReducer(f.num_experts, bins) for f in chosen}
    gates = {f.index: Mean() for f in chosen if f.shared_gate is not None}
    handles = []

    def router_hook(ffn: FFN):
        def hook(mod, args, out):
            m = routing_matrix(out, ffn.num_experts, ffn.router.top_k, ffn.router.norm_topk)
            reducers[ffn.index].update(m.detach())

        return hook

    def gate_hook(index: int):
        def hook(mod, args, out):
            gates[index].update(torch.sigmoid(out.detach().float()).reshape(-1, 1))

        return hook

    n_tokens = 0
    try:
        for ffn in chosen:
            handles.append(ffn.router_module.register_forward_hook(router_hook(ffn)))
            if ffn.index in gates:
                handles.append(ffn.shared_gate.register_forward_hook(gate_hook(ffn.index)))
        with evaluating(model), torch.no_grad():
            for ids in _token_batches(batches, batch_size, progress):
                if ids.numel() == 0:
                    continue
                forward(model, ids)
                n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if n_tokens == 0:
        raise InvalidArgumentError("no tokens were given: pass non-empty token batches or prompts")
    out = MoEStats(n_tokens=n_tokens, definitions=dict(DEFINITIONS))
    for ffn in chosen:
        r = reducers[ffn.index].result()
        gate = gates.get(ffn.index)
        out.layers.append(
            LayerRouting(
                layer=ffn.index,
                name=ffn.name,
                experts=ffn.num_experts,
                top_k=ffn.router.top_k,
                tokens=reducers[ffn.index].count,
                shared_gate=float(gate.result()[0]) if gate is not None and gate.count else None,
                **r,
            )
        )
    return out


# ----- vocabulary projection of experts --------------------------------------------------------------
@dataclass
class ExpertVocab(Result):
    """Promoted / suppressed tokens of each expert's mean value vector (and of its largest neurons).

    Example:
        >>> expert_vocab(model, tok, layers=[0]).experts[0]["promoted"][0]   # {'token': ..., 'id': ..., 'logit': ...}
    """

    basis: str
    top_k: int
    experts: list[dict[str, Any]] = field(default_factory=list)


def expert_vocab(
    model: nn.Module,
    tokenizer: Any,
    *,
    layers: int | Iterable[int] | None = None,
    experts: Sequence[int] | None = None,
    top_k: int = 10,
    neurons: int = 0,
    use_gain: bool = True,
    vocab_chunk: int | None = None,
) -> ExpertVocab:
    """Vocabulary projection of experts: top-k tokens of E(g ⊙ mean_i v_i) per expert (shared expert as
    ``expert="shared"``), plus, with ``neurons=n``, of the n value vectors of largest norm of each expert.

    Example:
        >>> rows = expert_vocab(model, tok, layers=[0], top_k=5, neurons=2).experts
        >>> rows[0]["expert"], [t["token"] for t in rows[0]["promoted"]]
    """
    from ffnkit.inspect.lens import Lens
    from ffnkit.inspect.vocab import topk_streaming, units_of

    if top_k < 1:
        raise InvalidArgumentError(f"top_k must be >= 1, got {top_k}")
    if neurons < 0:
        raise InvalidArgumentError(f"neurons must be >= 0, got {neurons}")
    lens = Lens.of(model)
    k = min(top_k, lens.vocab_size)
    E = lens.E.float()  # [V, d]
    result = ExpertVocab(lens.basis(use_gain), k)
    with torch.no_grad():
        for unit in units_of(moe_ffns(model, layers), experts):
            W = unit.W_out  # [d, d_ff]
            V = lens.direction(W.float().mean(dim=1, keepdim=True), use_gain=use_gain)  # [d, 1]
            tv, ti, bv, bi = topk_streaming(E, V, k, vocab_chunk)
            row: dict[str, Any] = {
                "layer": unit.layer,
                "expert": unit.expert,
                "name": unit.name,
                "promoted": token_rows(tokenizer, ti[0], tv[0]),
                "suppressed": token_rows(tokenizer, bi[0], bv[0]),
            }
            if neurons:
                norms = W.float().norm(dim=0)  # [d_ff]
                ids = torch.topk(norms, min(neurons, norms.numel())).indices  # [n]
                Vn = lens.direction(W[:, ids.to(W.device)], use_gain=use_gain)  # [d, n]
                ntv, nti, nbv, nbi = topk_streaming(E, Vn, k, vocab_chunk)
                row["neurons"] = [
                    {
                        "neuron": int(i),
                        "norm": float(norms[i]),
                        "promoted": token_rows(tokenizer, nti[j], ntv[j]),
                        "suppressed": token_rows(tokenizer, nbi[j], nbv[j]),
                    }
                    for j, i in enumerate(ids.tolist())
                ]
            result.experts.append(row)
    return result


def token_rows(tokenizer: Any, ids: Tensor, values: Tensor) -> list[dict[str, Any]]:
    """[{token, id, logit}] for token ids [k] and their logits [k] (tokens decoded one by one).

    Example:
        >>> token_rows(tok, torch.tensor([5, 7]), torch.tensor([2.0, 1.5]))[0]["id"]
        5
    """
    from ffnkit.inspect.lens import decode_tokens

    ids_l = ids.tolist()
    return [
        {"token": t, "id": i, "logit": round(float(v), 4)}
        for t, i, v in zip(decode_tokens(tokenizer, ids_l), ids_l, values.tolist(), strict=True)
    ]
