"""Steer FFNs while the model runs: set, scale or zero chosen neurons, force MoE experts on or off.

Everything is reversible: ``steer`` is a context manager over forward hooks, removed on exit (even after
an error), so the model is untouched afterwards. Neuron edits act at a site of ``core.capture``
(``post`` = m_i, what W_out reads; or ``pre``), hooked through ``site_hooks``, so a site means the same
thing whether it is read or edited.

Positions are absolute token positions. Under ``generate`` with a KV cache each forward sees only the new
tokens; a pre-hook on the model reads how many tokens the cache already holds (``cache.get_seq_length()``)
and offsets the positions of the current forward by it. ``"last"`` = the newest token of each forward
(the last prompt token, then every generated token); ``"all"`` = every token; a list = those absolute
positions. Padding counts as tokens (left-padded batches shift positions).

MoE layers (SteerMoE, Fayyaz et al. 2025): the router's logits are edited, activated experts → max + 0.01,
deactivated → min − 0.01, then the usual softmax / top-k / renormalisation recomputes the routing weights.

Example:
    >>> with steer(model, [NeuronEdit(layer=12, neurons=[7, 42], op="set", value=3.0)]):
    ...     out = model.generate(ids, max_new_tokens=20)
    >>> with steer(model, [ExpertEdit(layer=0, on=[3], off=[1])]):
    ...     model(ids)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.capture import site_hooks
from ffnkit.core.config import JsonConfig, Result, check_finite
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError
from ffnkit.core.ffn import FFN
from ffnkit.core.progress import ProgressLike
from ffnkit.core.runner import device_of, evaluating, logits

Positions = str | Sequence[int]  # "all" | "last" | absolute positions
OPS = ("set", "scale", "zero", "add")


@dataclass
class NeuronEdit:
    """Set, scale, zero (or add to) neurons' activations at one FFN.

    ``expert="shared"`` edits the shared expert of an MoE layer (routed experts run fused; steer them
    with :class:`ExpertEdit`).
    """

    layer: int
    neurons: list[int]
    op: str = "set"  # set | scale | zero | add
    value: float = 0.0  # the value to set, the factor to scale by, or the amount to add
    positions: Positions = "all"
    site: str = "post"  # post (m_i) | pre
    expert: str | None = None

    def __post_init__(self) -> None:
        check_finite(self.value, "value")  # a NaN activation turns every later token into NaN

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExpertEdit:
    """Force experts of an MoE layer on (always routed) or off (never routed), SteerMoE's rule.

    ``weight``: also give each forced-on expert exactly this routing weight; the token's other chosen
    experts share, in proportion, what is left of the total routing weight the edited logits give (1
    where the router renormalises its top-k; none if nothing is left). None (default): the weights come
    from the usual softmax / top-k on the edited logits.

    Example:
        >>> ExpertEdit(layer=0, on=[3], off=[1])                 # SteerMoE
        >>> ExpertEdit(layer=0, on=[3], weight=0.5)               # expert 3 in every top-k with weight 0.5
    """

    layer: int
    on: list[int] = field(default_factory=list)
    off: list[int] = field(default_factory=list)
    positions: Positions = "all"
    weight: float | None = None

    def __post_init__(self) -> None:
        if self.weight is not None:
            check_finite(self.weight, "weight")
            if self.weight < 0:
                raise InvalidArgumentError(f"an expert's routing weight must be >= 0, got {self.weight}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----- positions ---------------------------------------------------------------------------------
class _Clock:
    """Absolute position of the first token of the current forward (KV-cache aware)."""

    def __init__(self) -> None:
        self.offset = 0
        self.shape: tuple[int, int] | None = None  # (batch, tokens) of the current forward

    def hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        self.shape = tuple(ids.shape[:2]) if torch.is_tensor(ids) and ids.dim() >= 2 else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache_position = kwargs.get("cache_position")
        if cache_position is not None and torch.is_tensor(cache_position) and cache_position.numel():
            self.offset = int(cache_position.reshape(-1)[0])
        elif cache is not None and hasattr(cache, "get_seq_length"):
            self.offset = int(cache.get_seq_length())
        else:
            self.offset = 0


def _check_positions(positions: Positions) -> Positions:
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise InvalidArgumentError(
                f"positions must be 'all', 'last' or a list of indices, got {positions!r}"
            )
        return positions
    pos = [int(p) for p in positions]
    if any(p < 0 for p in pos):
        raise InvalidArgumentError(f"positions are absolute token indices (>= 0), got {pos}")
    return pos


def _as_tokens(x: Tensor, clock: _Clock) -> Tensor:
    """A view [..., T, n] of a site tensor; some families flatten batch and tokens ([B*T, n]: OPT,
    MoE routers), which are split back with the (batch, tokens) shape the clock saw."""
    if x.dim() == 2 and clock.shape is not None and x.shape[0] == clock.shape[0] * clock.shape[1]:
        return x.view(*clock.shape, x.shape[-1])
    return x


def _local_positions(positions: Positions, n_tokens: int, offset: int) -> list[int] | slice:
    """Indices into the token axis of the current forward that the edit touches."""
    if positions == "all":
        return slice(None)
    if positions == "last":
        return [n_tokens - 1]
    return [p - offset for p in positions if offset <= p < offset + n_tokens]


# ----- neuron edits ------------------------------------------------------------------------------
def _apply(x: Tensor, idx: Tensor, where: list[int] | slice, op: str, value: float) -> None:
    """In place on x [..., T, n]: edit columns ``idx`` at token positions ``where``."""
    if isinstance(where, list):
        where_t = torch.as_tensor(where, dtype=torch.long, device=x.device)
        rows = x.index_select(-2, where_t)  # [..., p, n] (a copy)
        rows[..., idx] = _op(rows[..., idx], op, value)
        x.index_copy_(x.dim() - 2, where_t, rows)
        return
    sub = x[..., where, :]  # a view
    sub[..., idx] = _op(sub[..., idx], op, value)


def _op(x: Tensor, op: str, value: float) -> Tensor:
    if op == "set":
        return torch.full_like(x, value)
    if op == "scale":
        return x * value
    if op == "zero":
        return torch.zeros_like(x)
    return x + value  # add


def _neuron_hook(ffn: FFN, edit: NeuronEdit, clock: _Clock):
    module, where, extract = site_hooks(ffn, edit.site)
    idx_cpu = torch.as_tensor(edit.neurons, dtype=torch.long)

    def edit_tensor(full: Tensor, view_of) -> Tensor:
        full = full.clone()  # never write into the model's own buffers
        view = _as_tokens(view_of(full), clock)  # the site's slice of the (cloned) tensor, a view
        n_tokens = view.shape[-2] if view.dim() >= 2 else 1
        local = _local_positions(edit.positions, n_tokens, 0 if ffn.stack == "encoder" else clock.offset)
        if isinstance(local, list) and not local:
            return full
        _apply(view, idx_cpu.to(view.device), local, edit.op, edit.value)
        return full

    if where == "pre":  # the site is the module's input (post = W_out's input)

        def pre_hook(mod, args):
            return (edit_tensor(args[0], lambda t: extract((t,), None)), *args[1:])

        return module.register_forward_pre_hook(pre_hook)

    def fwd_hook(mod, args, out):
        return edit_tensor(out, lambda t: extract(args, t))

    return module.register_forward_hook(fwd_hook)


# ----- expert edits (SteerMoE) -------------------------------------------------------------------
def _expert_hook(ffn: FFN, edit: ExpertEdit, clock: _Clock):
    router = ffn.router
    on = torch.as_tensor(edit.on, dtype=torch.long)
    off = torch.as_tensor(edit.off, dtype=torch.long)

    def hook(mod, args, out):
        if not isinstance(out, tuple) or len(out) != 3:
            raise InvalidArgumentError(
                f"the router of {ffn.name} returns {type(out).__name__}, not (logits, weights, indices); "
                "expert steering supports transformers v5 top-k routers"
            )
        logits, weights, indices = out  # [N, E], [N, k], [N, k]
        new = _as_tokens(logits.clone(), clock)  # [B, T, E] (or [N, E] if the shape is unknown)
        if new.dim() == 2:
            new = new[None]
        n_tokens = new.shape[1]
        local = _local_positions(edit.positions, n_tokens, clock.offset)
        if isinstance(local, list) and not local:
            return out
        rows = new[:, local] if isinstance(local, slice) else new[:, torch.as_tensor(local)]
        hi = rows.amax(-1, keepdim=True) + 0.01
        lo = rows.amin(-1, keepdim=True) - 0.01
        if on.numel():
            rows[..., on] = hi.expand(*rows.shape[:-1], on.numel())
        if off.numel():
            rows[..., off] = lo.expand(*rows.shape[:-1], off.numel())
        if isinstance(local, slice):
            new[:, local] = rows
        else:
            new[:, torch.as_tensor(local)] = rows
        edited = torch.zeros(new.shape[:2], dtype=torch.bool, device=new.device)  # [B, T]
        edited[:, local if isinstance(local, slice) else torch.as_tensor(local)] = True
        new = new.view_as(logits)
        # the router's own rule on the edited logits (Router.select)
        top_w, top_i = router.select(new)
        if edit.weight is not None and on.numel():
            top_w = _force_weight(top_w, top_i, on.to(top_i.device), edit.weight, edited.reshape(-1))
        return new, top_w.to(weights.dtype), top_i.to(indices.dtype)

    return ffn.router_module.register_forward_hook(hook)


def _force_weight(top_w: Tensor, top_i: Tensor, on: Tensor, weight: float, edited: Tensor) -> Tensor:
    """Routing weights [N, k] where the forced experts get ``weight`` on the edited tokens [N]; the other
    chosen experts share the rest of the token's total in proportion."""
    forced = torch.isin(top_i, on) & edited[:, None]  # [N, k]
    total = top_w.sum(-1, keepdim=True)  # [N, 1]
    rest = (total - forced.sum(-1, keepdim=True) * weight).clamp_min(0)  # [N, 1]
    others = (top_w * ~forced).sum(-1, keepdim=True)  # [N, 1]
    scale = torch.where(others > 0, rest / others.clamp_min(torch.finfo(top_w.dtype).tiny), 0.0)
    out = torch.where(forced, torch.full_like(top_w, weight), top_w * scale)
    return torch.where(edited[:, None], out, top_w)


# ----- validation and the context manager --------------------------------------------------------
def _target_ffn(ffns: list[FFN], edit: NeuronEdit | ExpertEdit) -> FFN:
    ffn = select_ffns(ffns, edit.layer)[0]
    edit.positions = _check_positions(edit.positions)
    if isinstance(edit, ExpertEdit):
        if ffn.kind != "moe":
            raise InvalidArgumentError(f"{ffn.name} is a dense FFN: steer its neurons with NeuronEdit")
        for e in [*edit.on, *edit.off]:
            if not 0 <= e < ffn.num_experts:
                raise LayerIndexError(
                    f"expert {e} is out of range: {ffn.name} has {ffn.num_experts} experts "
                    f"(0–{ffn.num_experts - 1})"
                )
        if set(edit.on) & set(edit.off):
            raise InvalidArgumentError(f"experts {sorted(set(edit.on) & set(edit.off))} are both on and off")
        if edit.weight is not None and not edit.on:
            raise InvalidArgumentError("a routing weight applies to experts forced on: give on=[...] too")
        if len(edit.on) > ffn.router.top_k:
            raise InvalidArgumentError(
                f"{len(edit.on)} experts forced on, but {ffn.name} routes each token to top-{ffn.router.top_k}"
            )
        return ffn
    if edit.op not in OPS:
        raise InvalidArgumentError(f"unknown op {edit.op!r}; use one of {', '.join(OPS)}")
    if edit.site not in ("post", "pre"):
        raise InvalidArgumentError(f"neurons are steered at site 'post' or 'pre', got {edit.site!r}")
    if ffn.kind == "moe":
        if edit.expert != "shared" or ffn.shared is None:
            raise InvalidArgumentError(
                f"{ffn.name} is a mixture of experts: force experts with ExpertEdit "
                "(neurons of a shared expert: NeuronEdit(expert='shared'))"
            )
        ffn = ffn.shared
    if not edit.neurons:
        raise InvalidArgumentError("give at least one neuron to steer")
    bad = [i for i in edit.neurons if not 0 <= i < ffn.d_ff]
    if bad:
        raise LayerIndexError(
            f"neuron {bad[0]} is out of range: {ffn.name} has {ffn.d_ff} neurons (0–{ffn.d_ff - 1})"
        )
    return ffn


@contextmanager
def steer(model: nn.Module, edits: NeuronEdit | ExpertEdit | Sequence[NeuronEdit | ExpertEdit], *, ffns=None):
    """Apply neuron and expert edits while inside the block; the model is back to normal on exit.

    Works with plain forward calls and with ``model.generate`` (KV cache: positions stay absolute).

    Example:
        >>> edit = NeuronEdit(layer=20, neurons=[1337], op="set", value=3.0, positions="all")
        >>> with steer(model, edit):
        ...     print(tok.decode(model.generate(ids, max_new_tokens=10)[0]))
    """
    edits = [edits] if isinstance(edits, (NeuronEdit, ExpertEdit)) else list(edits)
    all_ffns = ffns if ffns is not None else find_ffns(model)
    targets = [_target_ffn(all_ffns, e) for e in edits]  # validate everything before any hook
    clock = _Clock()
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(clock.hook, with_kwargs=True))
        for ffn, edit in zip(targets, edits, strict=True):
            if isinstance(edit, ExpertEdit):
                handles.append(_expert_hook(ffn, edit, clock))
            else:
                handles.append(_neuron_hook(ffn, edit, clock))
        yield edits
    finally:
        for h in handles:
            h.remove()


# ----- generation with and without steering ------------------------------------------------------
@dataclass
class GenerationPair(Result):
    """Greedy continuations of one prompt without (``plain``) and with (``steered``) the edits."""

    prompt: str
    edits: list[NeuronEdit | ExpertEdit]
    max_new_tokens: int
    decoding: str
    plain: str
    steered: str


def generate_pair(
    model: nn.Module,
    tokenizer,
    prompt: str,
    edits: Sequence[NeuronEdit | ExpertEdit],
    max_new_tokens: int = 20,
) -> GenerationPair:
    """Greedy continuations of ``prompt`` without and with the edits (what ``ffnkit steer`` prints).

    Example:
        >>> generate_pair(model, tok, "My favourite day is", [NeuronEdit(20, [1337], "set", 3.0)]).steered
    """
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = device_of(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    n = enc["input_ids"].shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    texts = {}
    for name, active in (("plain", []), ("steered", list(edits))):
        with torch.no_grad(), steer(model, active):
            out = model.generate(**enc, **kwargs)
        texts[name] = tokenizer.decode(out[0, n:], skip_special_tokens=True)
    return GenerationPair(prompt, list(edits), max_new_tokens, "greedy", texts["plain"], texts["steered"])


# ----- concept promotion / suppression -----------------------------------------------------------
@dataclass
class ConceptConfig(JsonConfig):
    """Which concept, how many neurons, and what to do to them (CLI flags map 1:1)."""

    words: list[str]
    n_neurons: int = 10  # top-N neurons by the word search score (ffnkit.inspect.vocab.SEARCH_RULE)
    op: str = "set"  # set | scale
    value: float = 3.0  # Geva et al. 2022 set their chosen activations to 3
    suppress: bool = False  # push the concept down: the value is negated (set −v, or scale by −v)
    positions: Positions = "all"
    layers: list[int] | None = None  # search only these FFNs
    window: int = 128  # tokens per evaluation prompt for the word mass
    ppl_window: int = 512  # perplexity protocol window (ffnkit.evaluate)
    version: int = 1


@dataclass
class ConceptReport(Result):
    config: ConceptConfig
    neurons: list[dict]  # the search hits that were steered
    edits: list[NeuronEdit]
    word_token_ids: list[int]
    mass_plain: float  # mean over positions of Σ_{w in words} p(w | prefix)
    mass_steered: float
    ppl_plain: float
    ppl_steered: float
    n_positions: int

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "neurons": self.neurons,
            "edits": [e.to_dict() for e in self.edits],
            "word_token_ids": self.word_token_ids,
            "word_mass": {
                "plain": self.mass_plain,
                "steered": self.mass_steered,
                "ratio": self.mass_steered / self.mass_plain if self.mass_plain > 0 else None,
                "rule": "mean over every position of every window of the summed next-token probability of "
                "the words' tokens (first token of 'word' and ' word')",
                "n_positions": self.n_positions,
            },
            "perplexity": {
                "plain": self.ppl_plain,
                "steered": self.ppl_steered,
                "ratio": self.ppl_steered / self.ppl_plain,
            },
        }


def word_mass(
    model: nn.Module, tokens: Tensor, word_ids: Sequence[int], window: int = 128
) -> tuple[float, int]:
    """Mean next-token probability mass on ``word_ids`` over every position of non-overlapping windows.

    Example:
        >>> word_mass(model, tokens, word_token_ids(tok, "Monday"))       # (mass, positions)
    """
    device = device_of(model)
    ids = torch.as_tensor(word_ids, device=device)
    n_win = tokens.numel() // window
    if n_win < 1:
        raise InvalidArgumentError(f"need at least {window} tokens for one window, got {tokens.numel()}")
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, n_win, 4):
            batch = torch.stack(
                [tokens[w * window : (w + 1) * window] for w in range(start, min(start + 4, n_win))]
            ).to(device)  # [B, window]
            probs = torch.softmax(logits(model, batch).float(), dim=-1)  # [B, T, V]
            total += probs[..., ids].sum(-1).double().sum().item()
            count += batch.numel()
    return total / count, count


def steer_concept(
    model: nn.Module, tokenizer, tokens: Tensor, config: ConceptConfig, *, progress: ProgressLike = False
) -> ConceptReport:
    """Pick the neurons that project most onto a word list, set (or scale) them, and measure the shift of
    probability mass on the words and the perplexity cost, on the same evaluation tokens.

    Example:
        >>> tokens = evaluation_tokens(load_corpus("shakespeare"), tok, max_tokens=2048)
        >>> rep = steer_concept(model, tok, tokens, ConceptConfig(words=["Monday", "Friday"], value=3.0))
        >>> rep.mass_plain, rep.mass_steered, rep.ppl_plain, rep.ppl_steered
    """
    from ffnkit.evaluate import perplexity
    from ffnkit.inspect.vocab import search_neurons, word_token_ids

    if config.op not in ("set", "scale"):
        raise InvalidArgumentError(f"concept steering sets or scales activations; got op={config.op!r}")
    if config.n_neurons < 1:
        raise InvalidArgumentError(f"n_neurons must be >= 1, got {config.n_neurons}")
    ffns = find_ffns(model)
    hits = search_neurons(
        model, tokenizer, config.words, layers=config.layers, top_n=config.n_neurons, ffns=ffns
    )
    value = -config.value if config.suppress else config.value
    by_layer: dict[tuple[int, object], list[int]] = {}
    for h in hits.hits:
        by_layer.setdefault((h["layer"], h["expert"]), []).append(h["neuron"])
    edits = []
    for (layer, expert), neurons in sorted(by_layer.items(), key=lambda kv: kv[0][0]):
        if expert not in (None, "shared"):
            continue  # routed experts run fused; their neurons are not steerable one by one
        edits.append(NeuronEdit(layer, neurons, config.op, value, config.positions, "post", expert))
    if not edits:
        raise InvalidArgumentError("the word search found only routed-expert neurons; steer experts instead")
    word_ids = sorted({i for w in hits.words for i in word_token_ids(tokenizer, w)})
    tokens = torch.as_tensor(tokens).reshape(-1)
    ppl_window = min(config.ppl_window, tokens.numel())  # short token sets: one window
    mass_plain, n_pos = word_mass(model, tokens, word_ids, config.window)
    ppl_plain = perplexity(model, tokens, window=ppl_window, progress=progress).perplexity
    with steer(model, edits, ffns=ffns):
        mass_steered, _ = word_mass(model, tokens, word_ids, config.window)
        ppl_steered = perplexity(model, tokens, window=ppl_window, progress=progress).perplexity
    return ConceptReport(
        config=config,
        neurons=hits.hits,
        edits=edits,
        word_token_ids=word_ids,
        mass_plain=mass_plain,
        mass_steered=mass_steered,
        ppl_plain=ppl_plain,
        ppl_steered=ppl_steered,
        n_positions=n_pos,
    )
