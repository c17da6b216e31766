"""Neuron statistics over a corpus, and the contexts where a neuron fires most (key-value memories).

Two things come out of one streaming pass over token batches (the calibration split by default):

- per layer and neuron: firing rate (share of tokens on which the neuron is active, as
  :mod:`ffnkit.core.criteria` defines it), mean and population variance of m_i (the ``post`` site, what
  W_out reads), accumulated by :mod:`ffnkit.core.reducers` so memory does not grow with the number of
  tokens;
- for chosen neurons: the top-k (value, sequence, position) triples by m_i — Geva et al. (2021)'s
  "trigger examples" of a key — kept by :class:`StreamingTopK` whose memory is bounded by k, then decoded
  into a window of text around each position with the token itself marked ``[[like this]]``.

Example:
    >>> model, tok = load_model()
    >>> batches = calibration_batches(load_corpus(), tok, n_samples=16, seq_len=128)
    >>> res = neuron_stats(model, batches, layers=[3], contexts={3: [42]}, k=5)
    >>> res.layers[3]["firing_rate"][:4], res.contexts(tok, batches)[0]["contexts"][0]["text"]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.capture import capture, site_hooks
from ffnkit.core.config import Result
from ffnkit.core.criteria import ACTIVE_THRESHOLD
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.progress import ProgressLike
from ffnkit.core.reducers import FiringRate, Variance
from ffnkit.core.runner import evaluating, forward, iter_batches

__all__ = ["NeuronStats", "StreamingTopK", "TokenContext", "decode_context", "dense_ffns", "neuron_stats"]

MARK_OPEN, MARK_CLOSE = "[[", "]]"


# --- shared by the inspect modules of this corpus group ------------------------------------------------
def dense_ffns(model: nn.Module, layers: int | Iterable[int] | None, what: str) -> list[FFN]:
    """The chosen FFNs that have neurons (MoE layers have none to read); a clear error if none is left.

    Example:
        >>> [f.index for f in dense_ffns(model, [0, 1], "neuron statistics")]
        [0, 1]
    """
    ffns = find_ffns(model)
    chosen = select_ffns(ffns, layers if layers is None or isinstance(layers, int) else list(layers))
    dense = [f for f in chosen if f.kind != "moe"]
    if not dense:
        raise InvalidArgumentError(
            f"{what} reads neuron activations (the 'post' site), and every chosen layer is a mixture of "
            "experts; choose dense layers (or use `ffnkit inspect contrast`, which ranks experts)"
        )
    return dense


# --- streaming top-k ------------------------------------------------------------------------------------
class StreamingTopK:
    """The k largest values per neuron seen so far, with where they occurred; memory O(n_neurons · k).

    ``update(values [B, T, n], seq_offset)`` takes one batch; ties keep the earliest occurrence.

    Example:
        >>> top = StreamingTopK(n=3, k=2)
        >>> top.update(torch.randn(4, 10, 3), seq_offset=0)
        >>> top.values.shape, top.sequence.shape        # [3, 2] each, sorted descending
    """

    def __init__(self, n: int, k: int, absolute: bool = False) -> None:
        if k < 1:
            raise InvalidArgumentError(f"top-k needs k >= 1, got {k}")
        self.n, self.k, self.absolute = n, k, absolute
        self.values = torch.empty(n, 0, dtype=torch.float32)  # [n, <=k], descending (by key)
        self.sequence = torch.empty(n, 0, dtype=torch.long)  # [n, <=k]
        self.position = torch.empty(n, 0, dtype=torch.long)  # [n, <=k]

    def update(self, values: Tensor, seq_offset: int) -> None:
        """Fold in activations ``values`` [B, T, n] of sequences seq_offset … seq_offset + B − 1."""
        B, T, n = values.shape
        if n != self.n:
            raise InvalidArgumentError(f"StreamingTopK holds {self.n} neurons, got {n}")
        flat = values.detach().float().reshape(B * T, n).T.cpu()  # [n, B*T]
        key = flat.abs() if self.absolute else flat
        kk = min(self.k, B * T)
        _, idx = torch.topk(key, kk, dim=1, sorted=True)  # [n, kk]
        cand_v = torch.gather(flat, 1, idx)
        cand_s, cand_p = idx // T + seq_offset, idx % T
        # earlier entries first, so a stable sort keeps the earliest occurrence among ties
        v = torch.cat([self.values, cand_v], 1)
        s = torch.cat([self.sequence, cand_s], 1)
        p = torch.cat([self.position, cand_p], 1)
        k2 = v.abs() if self.absolute else v
        order = torch.sort(k2, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values, self.sequence, self.position = (
            torch.gather(v, 1, order),
            torch.gather(s, 1, order),
            torch.gather(p, 1, order),
        )

    def state_numel(self) -> int:
        """Elements held; at most 3 · n · k whatever the number of tokens seen."""
        return self.values.numel() + self.sequence.numel() + self.position.numel()


@dataclass
class TokenContext(Result):
    """One token in its context: the token's text and id, and the window around it with the token marked."""

    token: str
    token_id: int
    text: str


def decode_context(tokenizer: Any, ids: Tensor, position: int, window: int) -> TokenContext:
    """Text of ``ids[position - window : position + window + 1]`` with the token at ``position`` marked.

    Example:
        >>> decode_context(tok, ids, position=5, window=2).text      # 'a b [[c]] d e'
    """
    lo, hi = max(0, position - window), min(ids.numel(), position + window + 1)

    def dec(t: Tensor) -> str:
        return tokenizer.decode(t.tolist()) if t.numel() else ""

    token = dec(ids[position : position + 1])
    text = dec(ids[lo:position]) + MARK_OPEN + token + MARK_CLOSE + dec(ids[position + 1 : hi])
    return TokenContext(token, int(ids[position]), text)


# --- the pass over the corpus ----------------------------------------------------------------------------
@dataclass
class NeuronStats(Result):
    """What :func:`neuron_stats` found. ``layers[i]`` = {firing_rate, mean, var} tensors [d_ff].

    ``to_dict()`` gives the per-layer summary (:meth:`summary`); :meth:`contexts` decodes the top contexts.
    """

    layers: dict[int, dict[str, Tensor]]
    top: dict[int, tuple[list[int], StreamingTopK]] = field(default_factory=dict)
    threshold: float = ACTIVE_THRESHOLD
    n_tokens: int = 0
    n_sequences: int = 0
    seq_len: int = 0

    def contexts(self, tokenizer: Any, batches: Tensor, window: int = 8) -> list[dict[str, Any]]:
        """Decoded top contexts, one row per (layer, neuron): {layer, neuron, contexts: [{value, text…}]}."""
        rows = []
        for layer, (neurons, top) in self.top.items():
            for j, neuron in enumerate(neurons):
                ctx = []
                for v, s, p in zip(top.values[j], top.sequence[j], top.position[j], strict=True):
                    row = {"value": float(v), "sequence": int(s), "position": int(p)}
                    row.update(decode_context(tokenizer, batches[int(s)], int(p), window).to_dict())
                    ctx.append(row)
                rows.append({"layer": layer, "neuron": neuron, "contexts": ctx})
        return rows

    def summary(self, top_n: int = 10) -> list[dict[str, Any]]:
        """One JSON row per layer: mean firing rate, dead/always-on shares, most active neurons."""
        rows = []
        for layer, s in self.layers.items():
            fr = s["firing_rate"]
            top = torch.topk(fr, min(top_n, fr.numel())).indices
            rows.append(
                {
                    "layer": layer,
                    "d_ff": fr.numel(),
                    "mean_firing_rate": float(fr.mean()),
                    "dead_share": float((fr == 0).double().mean()),
                    "always_on_share": float((fr == 1).double().mean()),
                    "mean_abs_mean": float(s["mean"].abs().mean()),
                    "mean_var": float(s["var"].mean()),
                    "most_firing": [{"neuron": int(i), "firing_rate": float(fr[i])} for i in top],
                }
            )
        return rows

    def to_dict(self, top_n: int = 10) -> dict[str, Any]:
        """JSON: the site, the threshold, the tokens seen and one :meth:`summary` row per layer."""
        return {
            "site": "post",
            "threshold": self.threshold,
            "tokens": self.n_tokens,
            "layers": self.summary(top_n),
        }


def neuron_stats(
    model: nn.Module,
    batches: Tensor,
    *,
    layers: int | Iterable[int] | None = None,
    threshold: float = ACTIVE_THRESHOLD,
    contexts: dict[int, list[int]] | None = None,
    k: int = 10,
    batch_size: int = 8,
    progress: ProgressLike = False,
) -> NeuronStats:
    """Firing rate, mean and variance of every neuron's m_i, plus the top-k contexts of chosen neurons.

    Args:
        batches: token ids [n_samples, seq_len] (e.g. ``calibration_batches``).
        layers: FFN indices to measure (None = every dense layer; MoE layers have no neurons and are skipped).
        threshold: of the active-neuron rule (:mod:`ffnkit.core.criteria`): a neuron fires on a token
            when |m_i| > threshold · mean_j |m_j|.
        contexts: {layer: [neuron, ...]} whose top-k activating positions to keep (by signed m_i).
        k: contexts kept per neuron.

    Example:
        >>> res = neuron_stats(model, batches, layers=[0, 1], contexts={1: [7]}, k=3)
        >>> res.layers[1]["var"].shape, res.top[1][1].values.shape   # [d_ff], [1, 3]
    """
    ffns = dense_ffns(model, layers, "neuron statistics")
    by_index = {f.index: f for f in ffns}
    contexts = {int(layer): [int(n) for n in ns] for layer, ns in (contexts or {}).items()}
    all_ffns = find_ffns(model)
    top: dict[int, tuple[list[int], StreamingTopK]] = {}
    for layer, neurons in contexts.items():
        ffn = select_ffns(all_ffns, layer)[0]
        if ffn.kind == "moe":
            raise InvalidArgumentError(f"layer {layer} is a mixture of experts: it has no neurons to rank")
        bad = [n for n in neurons if not 0 <= n < ffn.d_ff]
        if bad or not neurons:
            raise InvalidArgumentError(
                f"neurons {bad or neurons} are outside layer {layer}'s 0..{ffn.d_ff - 1}; pick valid indices"
            )
        by_index.setdefault(ffn.index, ffn)
        top[ffn.index] = (neurons, StreamingTopK(len(neurons), k))

    reducers = [Variance(), FiringRate(threshold)]
    stat_layers = [f.index for f in ffns]
    current: dict[str, Any] = {"offset": 0, "shape": tuple(batches.shape)}
    handles = []
    try:
        for index, (neurons, tk) in top.items():
            module, where, extract = site_hooks(by_index[index], "post")
            sel = torch.tensor(neurons)

            def hook(mod, args, out=None, *, _tk=tk, _sel=sel, _extract=extract):
                m = _extract(args, out)  # [B, T, d_ff], or [B*T, d_ff] where the model flattens (OPT)
                m = m.reshape(*current["shape"], m.shape[-1])  # [B, T, d_ff]
                _tk.update(m[..., _sel.to(m.device)], current["offset"])

            if where == "pre":
                handles.append(module.register_forward_pre_hook(lambda m, a, _h=hook: _h(m, a)))
            else:
                handles.append(module.register_forward_hook(hook))
        with evaluating(model), capture(model, sites="post", layers=stat_layers, reducers=reducers) as cap:
            for start, ids in iter_batches(batches, batch_size, progress, "neuron stats"):
                current["offset"], current["shape"] = start, tuple(ids.shape)
                forward(model, ids)
    finally:
        for h in handles:
            h.remove()
    out: dict[int, dict[str, Tensor]] = {}
    for index in stat_layers:
        st = cap.stats("post", index)
        out[index] = {"firing_rate": st["firing_rate"], "mean": st["var"].mean, "var": st["var"].var}
    n_seq, seq_len = batches.shape
    return NeuronStats(out, top, float(threshold), n_seq * seq_len, n_seq, seq_len)
