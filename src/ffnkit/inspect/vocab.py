"""Vocabulary projection of value vectors, and neuron search by word list (Geva et al. 2022).

Neuron i of an FFN writes m_i · v_i to the residual stream (v_i = column i of W_out). Its projection onto
the vocabulary, independent of any input, is

    r_i = E (g ⊙ v_i)      (default: through the final norm's gain g; centred first under LayerNorm)
    r_i = E v_i            (``use_gain=False``: Geva et al.'s rule)

Top-k of r_i = tokens the neuron promotes (when m_i > 0), bottom-k = tokens it suppresses.

Everything streams over neurons in chunks of ``chunk_size`` (and, with ``vocab_chunk``, over the
vocabulary), so the peak extra memory is ``chunk_size × min(vocab_chunk, V)`` floats, never
neurons × vocabulary. MoE layers are projected per expert: neuron ids are ``(expert e, neuron i)``; a
Qwen2-MoE shared expert is ``expert="shared"``.

Example:
    >>> proj = project_neurons(model, layers=[12], neurons=[7, 42], top_k=10, tokenizer=tok)
    >>> proj.to_dict()["neurons"][0]["promoted"][:3]
    >>> hits = search_neurons(model, tok, ["Monday", "Tuesday", "Friday"], top_n=5)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.config import Result
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError
from ffnkit.core.ffn import FFN
from ffnkit.core.progress import ProgressLike, Stage
from ffnkit.inspect.lens import Lens, decode_tokens

Expert = int | str | None  # None: dense layer; int: expert number; "shared": the shared expert


# ----- which value vectors ---------------------------------------------------------------------------
@dataclass
class Unit:
    """One block of value vectors: a dense FFN, one expert of an MoE layer, or its shared expert."""

    layer: int  # FFN index (as in find_ffns)
    name: str
    expert: Expert
    ffn: FFN  # the handle whose W_out holds the vectors

    @property
    def W_out(self) -> Tensor:  # [d_model, d_ff]
        return self.ffn.W_out


def units_of(ffns: Sequence[FFN], experts: Sequence[int] | None = None) -> list[Unit]:
    """Dense FFNs as they are; MoE layers expanded to their experts (and shared expert)."""
    units = []
    for ffn in ffns:
        if ffn.kind != "moe":
            units.append(Unit(ffn.index, ffn.name, None, ffn))
            continue
        chosen = range(ffn.num_experts) if experts is None else experts
        for e in chosen:
            if not 0 <= e < ffn.num_experts:
                raise LayerIndexError(
                    f"expert {e} is out of range: {ffn.name} has {ffn.num_experts} experts "
                    f"(0–{ffn.num_experts - 1})"
                )
            units.append(Unit(ffn.index, ffn.experts[e].name, e, ffn.experts[e]))
        if ffn.shared is not None and experts is None:
            units.append(Unit(ffn.index, ffn.shared.name, "shared", ffn.shared))
    return units


def _check_neurons(unit: Unit, neurons: Sequence[int] | None) -> Tensor:
    n = unit.W_out.shape[1]
    if neurons is None:
        return torch.arange(n)
    ids = torch.as_tensor(list(neurons), dtype=torch.long)
    bad = ids[(ids < 0) | (ids >= n)]
    if bad.numel():
        raise LayerIndexError(
            f"neuron {int(bad[0])} is out of range: {unit.name} has {n} neurons (0–{n - 1})"
        )
    return ids


def _chunks(ids: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, ids.numel(), size):
        yield ids[start : start + size]


# ----- projection --------------------------------------------------------------------------------
@dataclass
class UnitProjection:
    """Top/bottom-k tokens of the chosen neurons of one unit (tensors on CPU)."""

    layer: int
    name: str
    expert: Expert
    neurons: Tensor  # [n]
    top_ids: Tensor  # [n, k]
    top_logits: Tensor  # [n, k] float32
    bottom_ids: Tensor  # [n, k]
    bottom_logits: Tensor  # [n, k] float32


@dataclass
class Projection(Result):
    """What :func:`project_neurons` returns: per unit tensors, plus ``to_dict`` with decoded tokens."""

    basis: str
    top_k: int
    chunk_size: int
    vocab_chunk: int | None
    units: list[UnitProjection] = field(default_factory=list)
    tokenizer: object = None

    def rows(self) -> Iterator[dict]:
        """One JSON-ready dict per neuron: layer, expert, neuron, promoted and suppressed tokens."""
        for u in self.units:
            for j, neuron in enumerate(u.neurons.tolist()):
                yield {
                    "layer": u.layer,
                    "expert": u.expert,
                    "neuron": neuron,
                    "promoted": _tokens(self.tokenizer, u.top_ids[j], u.top_logits[j]),
                    "suppressed": _tokens(self.tokenizer, u.bottom_ids[j], u.bottom_logits[j]),
                }

    def to_dict(self) -> dict:
        return {
            "basis": self.basis,
            "top_k": self.top_k,
            "chunk_size": self.chunk_size,
            "vocab_chunk": self.vocab_chunk,
            "neurons": list(self.rows()),
        }


def _tokens(tokenizer, ids: Tensor, logits: Tensor) -> list[dict]:
    ids_l = ids.tolist()
    return [
        {"token": t, "id": i, "logit": round(float(v), 4)}
        for t, i, v in zip(decode_tokens(tokenizer, ids_l), ids_l, logits.tolist(), strict=True)
    ]


def topk_streaming(
    E: Tensor, V: Tensor, k: int, vocab_chunk: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k and bottom-k of ``V.T @ E.T`` ([n, vocab]) without holding more than n × vocab_chunk.

    E: [vocab, d] float32, V: [d, n] float32 → (top_vals, top_ids, bottom_vals, bottom_ids), each [n, k].
    """
    n_vocab = E.shape[0]
    step = n_vocab if vocab_chunk is None else max(int(vocab_chunk), k)
    top_v = top_i = bot_v = bot_i = None
    for start in range(0, n_vocab, step):
        logits = V.T @ E[start : start + step].T  # [n, step]
        kk = min(k, logits.shape[1])  # the last block may be shorter than k
        tv, ti = logits.topk(kk, dim=-1)
        bv, bi = logits.topk(kk, dim=-1, largest=False)
        del logits
        ti, bi = ti + start, bi + start
        if top_v is None:
            top_v, top_i, bot_v, bot_i = tv, ti, bv, bi
            continue
        # merge with what earlier vocabulary blocks kept
        tv, idx = torch.cat([top_v, tv], 1).topk(k, dim=-1)
        top_i, top_v = torch.cat([top_i, ti], 1).gather(1, idx), tv
        bv, idx = torch.cat([bot_v, bv], 1).topk(k, dim=-1, largest=False)
        bot_i, bot_v = torch.cat([bot_i, bi], 1).gather(1, idx), bv
    return top_v, top_i, bot_v, bot_i


def project_neurons(
    model: nn.Module,
    layers: int | Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    *,
    experts: Sequence[int] | None = None,
    top_k: int = 10,
    use_gain: bool = True,
    chunk_size: int = 512,
    vocab_chunk: int | None = None,
    tokenizer=None,
    ffns: list[FFN] | None = None,
    progress: ProgressLike = False,
) -> Projection:
    """Top-k promoted and suppressed tokens of value vectors, streamed in chunks of neurons.

    Args:
        layers: FFN indices (None = every FFN of the model).
        neurons: neuron indices inside each chosen layer/expert (None = all).
        experts: for MoE layers, which experts (None = all, plus the shared expert).
        use_gain: project g ⊙ v_i (the final norm's gain) instead of the raw v_i.
        chunk_size: neurons per matrix product; peak extra memory ≈ chunk_size × vocab × 4 bytes.
        vocab_chunk: also stream over the vocabulary in blocks of this many tokens.

    Example:
        >>> proj = project_neurons(model, layers=20, neurons=[5], top_k=10, tokenizer=tok)
        >>> [t["token"] for t in proj.to_dict()["neurons"][0]["promoted"]]
    """
    if top_k < 1:
        raise InvalidArgumentError(f"top_k must be >= 1, got {top_k}")
    if chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be >= 1, got {chunk_size}")
    lens = Lens.of(model)
    k = min(top_k, lens.vocab_size)
    all_ffns = ffns if ffns is not None else find_ffns(model)
    chosen = select_ffns(all_ffns, layers if layers is None or isinstance(layers, int) else list(layers))
    units = units_of(chosen, experts)
    E = lens.E.float()  # [V, d]; no copy for float32 models
    result = Projection(lens.basis(use_gain), k, chunk_size, vocab_chunk, tokenizer=tokenizer)
    total = sum(u.W_out.shape[1] if neurons is None else len(neurons) for u in units)
    with torch.no_grad(), Stage(progress, "projecting neurons", total, unit="neuron") as stage:
        for unit in units:
            ids = _check_neurons(unit, neurons)
            W = unit.W_out  # [d, n] view
            parts = []
            for chunk in _chunks(ids, chunk_size):
                V = lens.direction(W[:, chunk.to(W.device)], use_gain=use_gain)  # [d, c]
                parts.append(topk_streaming(E, V, k, vocab_chunk))
                stage.advance(chunk.numel())
            top_v, top_i, bot_v, bot_i = (torch.cat([p[j] for p in parts]).cpu() for j in range(4))
            result.units.append(
                UnitProjection(unit.layer, unit.name, unit.expert, ids, top_i, top_v, bot_i, bot_v)
            )
    return result


# ----- search --------------------------------------------------------------------------------------
def word_token_ids(tokenizer, word: str) -> list[int]:
    """The token variants of a word: the first token of ``word`` and of ``" " + word`` (deduplicated).

    The first token is the one the model has to predict first, so it is what a neuron must promote.
    """
    ids = []
    for text in (word, " " + word.lstrip()):
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if enc and enc[0] not in ids:
            ids.append(enc[0])
    if not ids:
        raise InvalidArgumentError(f"the word {word!r} has no tokens; give non-empty words")
    return ids


@dataclass
class SearchResult(Result):
    """Neurons ranked by how strongly their projection promotes a word list."""

    words: list[str]
    word_ids: list[list[int]]
    rule: str
    basis: str
    hits: list[dict]

    def to_dict(self) -> dict:
        return {
            "words": self.words,
            "word_token_ids": self.word_ids,
            "rule": self.rule,
            "basis": self.basis,
            "hits": self.hits,
        }


SEARCH_RULE = (
    "score_i = mean over words of (max over the word's token variants (first token of 'word' and of "
    "' word') of z_i[token]), where z_i = (r_i − mean_vocab r_i) / std_vocab r_i is neuron i's projection "
    "standardised over the whole vocabulary (so a large ‖v_i‖ alone does not win)"
)


def search_neurons(
    model: nn.Module,
    tokenizer,
    words: Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    top_n: int = 20,
    top_k: int = 10,
    use_gain: bool = True,
    chunk_size: int = 4096,
    ffns: list[FFN] | None = None,
) -> SearchResult:
    """Which neurons promote these words most (LM-Debugger's search, no search server).

    The score (``SEARCH_RULE``) uses z-scores of r_i over the vocabulary. Mean and variance of r_i over
    the vocabulary come in closed form from the mean ē and covariance Σ of E's rows (mean = ē·u,
    var = uᵀ Σ u with u = g ⊙ v_i), so only the word tokens' rows of E are multiplied: the search streams
    over neurons in chunks and never forms a neurons × vocabulary matrix.

    Example:
        >>> res = search_neurons(model, tok, ["one", "two", "three", "four"], top_n=5)
        >>> res.hits[0]["layer"], res.hits[0]["neuron"], res.hits[0]["promoted"][:5]
    """
    words = [w for w in words if w.strip()]
    if not words:
        raise InvalidArgumentError("give at least one word to search for (e.g. --tokens Monday,Tuesday)")
    if top_n < 1:
        raise InvalidArgumentError(f"top_n must be >= 1, got {top_n}")
    lens = Lens.of(model)
    all_ffns = ffns if ffns is not None else find_ffns(model)
    chosen = select_ffns(all_ffns, layers if layers is None or isinstance(layers, int) else list(layers))
    units = units_of(chosen)
    word_ids = [word_token_ids(tokenizer, w) for w in words]
    flat = sorted({i for ids in word_ids for i in ids})
    col = {t: j for j, t in enumerate(flat)}
    with torch.no_grad():
        E = lens.E.float()  # [V, d]
        mean_e = E.mean(dim=0)  # [d]
        centred = E - mean_e
        cov = centred.T @ centred / E.shape[0]  # [d, d]
        del centred
        E_words = E[flat]  # [W, d]
        scored: list[tuple[float, int, Expert, int]] = []
        rows = [[col[t] for t in ids] for ids in word_ids]
        for unit_i, unit in enumerate(units):
            W = unit.W_out
            n = W.shape[1]
            for start in range(0, n, chunk_size):
                U = lens.direction(W[:, start : start + chunk_size], use_gain=use_gain)  # [d, c]
                mu = mean_e @ U  # [c]
                sd = ((cov @ U) * U).sum(0).clamp_min(1e-20).sqrt()  # [c]
                z = (E_words @ U - mu) / sd  # [W, c]
                per_word = torch.stack([z[r].amax(0) for r in rows])  # [words, c]
                score = per_word.mean(0)  # [c]
                best = score.topk(min(top_n, score.numel()))
                scored += [
                    (float(s), unit_i, unit.expert, start + int(j))
                    for s, j in zip(best.values, best.indices, strict=True)
                ]
    scored.sort(key=lambda t: -t[0])
    hits = []
    for score, unit_i, expert, neuron in scored[:top_n]:
        unit = units[unit_i]
        V = lens.direction(unit.W_out[:, [neuron]], use_gain=use_gain)
        top_v, top_i, _, _ = topk_streaming(lens.E.float(), V, top_k)
        hits.append(
            {
                "layer": unit.layer,
                "expert": expert,
                "neuron": neuron,
                "score": round(score, 4),
                "promoted": _tokens(tokenizer, top_i[0].cpu(), top_v[0].cpu()),
            }
        )
    return SearchResult(list(words), word_ids, SEARCH_RULE, lens.basis(use_gain), hits)
