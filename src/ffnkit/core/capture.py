"""Capture what FFNs compute, at the same named sites on every family.

Sites (the same names in the API, the CLI and the JSON):

- ``in``   the FFN's input x [..., d_model] (after the block's pre-norm)
- ``pre``  W_in x + b_in [..., d_ff] (the "up" projection of gated FFNs)
- ``gate`` W_gate x + b_gate [..., d_ff], before the nonlinearity (gated FFNs only)
- ``post`` m, what W_out reads [..., d_ff]: act(pre), or act(gate) * pre for gated FFNs
- ``out``  the FFN's output [..., d_model], W_out m + b_out
- ``router`` router logits [..., n_experts] (MoE layers only)

Hooks sit on the projections themselves (the input of W_in, the outputs of W_in / W_gate, the input and
output of W_out; or a runtime module's ``hook_<site>`` HookPoint where it offers one), so ``in`` and
``out`` mean the same on every family, even where the model has no single FFN module (OPT, BERT). MoE layers offer ``in``, ``out`` and ``router`` (expert internals run inside one
fused module in transformers v5).

Raw mode keeps detached tensors (small jobs); reducer mode keeps only streaming statistics, so memory
does not grow with the number of tokens::

    with capture(model, sites=["post"], reducers=["mean", "var", "firing_rate"]) as cap:
        model(input_ids)
    cap.stats("post", layer=3)["var"]
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.reducers import make_reducer
from ffnkit.modules.base import hook_point

SITES = ("in", "pre", "gate", "post", "out", "router")
DENSE_SITES = ("in", "pre", "gate", "post", "out")
MOE_SITES = ("in", "out", "router")


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def site_hooks(ffn: FFN, site: str) -> tuple[nn.Module, str, callable]:
    """(module, "pre"|"fwd", extract) for one site: where to hook and how to read the tensor there.

    ``extract(args, output)`` returns the site's tensor. Shared with steering, so a site means the same
    thing whether it is read or edited. A runtime module that offers the site through a ``HookPoint``
    child ``hook_<site>`` (:mod:`ffnkit.modules.base`) is hooked there first, so a fused kernel that hides
    the projections does not blind capture or steering.
    """
    ffn.check_current()
    point = hook_point(ffn.module, site)
    if point is not None:
        return point, "fwd", lambda args, out: out
    if ffn.kind == "moe":
        if site not in MOE_SITES:
            raise InvalidArgumentError(
                f"site {site!r} is not available on MoE layer {ffn.name}; use one of {', '.join(MOE_SITES)}"
            )
        if site == "in":
            return ffn.module, "pre", lambda args, out: args[0]
        if site == "out":
            return ffn.module, "fwd", lambda args, out: _first(out)
        return ffn.router_module, "fwd", lambda args, out: _first(out)
    half = ffn.d_ff
    if site == "in":
        return ffn.in_proj, "pre", lambda args, out: args[0]
    if site == "pre":
        if ffn.fused_gate_up:
            return ffn.in_proj, "fwd", lambda args, out: out[..., half:]
        return ffn.in_proj, "fwd", lambda args, out: out
    if site == "gate":
        if ffn.kind != "gated":
            raise InvalidArgumentError(f"site 'gate' needs a gated FFN; {ffn.name} is a plain {ffn.kind}")
        if ffn.fused_gate_up:
            return ffn.gate_proj, "fwd", lambda args, out: out[..., :half]
        return ffn.gate_proj, "fwd", lambda args, out: out
    if site == "post":
        return ffn.out_proj, "pre", lambda args, out: args[0]
    if site == "out":
        return ffn.out_proj, "fwd", lambda args, out: out
    if site == "router":
        raise InvalidArgumentError(f"site 'router' needs a mixture-of-experts layer; {ffn.name} is dense")
    raise InvalidArgumentError(f"unknown site {site!r}; sites are {', '.join(SITES)}")


class Capture:
    """What a :func:`capture` block recorded: raw tensors and/or streaming statistics per (site, layer)."""

    def __init__(self, ffns: list[FFN], sites: Sequence[str], reducers: Sequence | None, raw: bool):
        self.ffns = ffns
        self.sites = tuple(sites)
        self.raw = raw
        self._reducer_specs = list(reducers or [])
        self._calls: dict[tuple[str, int], list[Tensor]] = defaultdict(list)
        self._reducers: dict[tuple[str, int], dict[str, object]] = {}

    def _record(self, site: str, index: int, x: Tensor) -> None:
        x = x.detach()
        if self.raw:
            self._calls[(site, index)].append(x.clone())
        if self._reducer_specs:
            reds = self._reducers.get((site, index))
            if reds is None:
                reds = {}
                for spec in self._reducer_specs:
                    # each (site, layer) gets its own copy of a reducer given as an instance
                    red = make_reducer(spec if isinstance(spec, str) else copy.deepcopy(spec))
                    reds[red.name] = red
                self._reducers[(site, index)] = reds
            for red in reds.values():
                red.update(x)

    def _key(self, site: str, layer: int) -> tuple[str, int]:
        index = select_ffns(self.ffns, layer)[0].index
        if site not in self.sites:
            raise InvalidArgumentError(f"site {site!r} was not captured; captured: {', '.join(self.sites)}")
        return site, index

    def calls(self, site: str, layer: int) -> list[Tensor]:
        """Raw tensors as the model produced them, one per forward call (e.g. [B, T, n])."""
        key = self._key(site, layer)
        if not self.raw:
            raise InvalidArgumentError("raw tensors were not kept; use capture(..., raw=True)")
        return self._calls.get(key, [])

    def __getitem__(self, key: tuple[str, int]) -> Tensor:
        """``cap["post", 3]`` → all captured tokens of that site, flattened: [N_tokens, n]."""
        site, layer = key
        calls = self.calls(site, layer)
        if not calls:
            raise InvalidArgumentError(
                f"nothing was captured at {site!r} of layer {layer}: run the model inside"
            )
        return torch.cat([c.reshape(-1, c.shape[-1]) for c in calls])

    def stats(self, site: str, layer: int) -> dict[str, object]:
        """Results of the streaming reducers at (site, layer), by reducer name."""
        key = self._key(site, layer)
        if key not in self._reducers:
            raise InvalidArgumentError(
                f"no statistics at {site!r} of layer {layer}: pass reducers=[...] and run the model inside"
            )
        return {name: red.result() for name, red in self._reducers[key].items()}

    def reducers(self, site: str, layer: int) -> dict[str, object]:
        """The reducer objects themselves (to merge shards, or read several results)."""
        return self._reducers[self._key(site, layer)]

    @property
    def layers(self) -> list[int]:
        return [f.index for f in self.ffns]


@contextmanager
def capture(
    model: nn.Module,
    sites: str | Iterable[str] = ("in", "out"),
    layers: int | Iterable[int] | None = None,
    *,
    reducers: Sequence | None = None,
    raw: bool | None = None,
    ffns: list[FFN] | None = None,
):
    """Record FFN sites while the model runs; hooks are removed on exit, even after an error.

    Args:
        sites: any of ``in pre gate post out`` (and ``router`` on MoE layers).
        layers: FFN indices (as in ``find_ffns``); None = all.
        reducers: names ("count", "mean", "var", "mean_abs", "mean_sq", "firing_rate", "hist", "cov",
            "max", "min") or reducer instances; each (site, layer) gets its own copy.
        raw: keep raw tensors (default: True when no reducers are given).

    Example:
        >>> with capture(model, sites=["in", "out"], layers=[0]) as cap:
        ...     model(ids)
        >>> x, y = cap["in", 0], cap["out", 0]
        >>> torch.allclose(find_ffns(model)[0](x), y, atol=1e-5)
    """
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    for site in sites:
        if site not in SITES:
            raise InvalidArgumentError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
    all_ffns = ffns if ffns is not None else find_ffns(model)
    chosen = select_ffns(all_ffns, layers if layers is None or isinstance(layers, int) else list(layers))
    if raw is None:
        raw = not reducers
    if reducers:
        for spec in reducers:
            make_reducer(spec)  # fail before any hook is placed
    cap = Capture(all_ffns, sites, reducers, raw)
    plan = []
    for ffn in chosen:
        for site in sites:
            if ffn.kind == "moe" and site not in MOE_SITES or ffn.kind == "mlp" and site == "gate":
                continue  # mixed models (e.g. Qwen2-MoE dense layers): capture what each layer has
            plan.append((ffn, site, *site_hooks(ffn, site)))
    for site in set(sites) - {p[1] for p in plan}:
        site_hooks(chosen[0], site)  # no chosen layer has this site: raise its clear error
    handles = []
    try:
        for ffn, site, module, where, extract in plan:

            def hook(mod, args, out=None, *, _site=site, _i=ffn.index, _extract=extract):
                cap._record(_site, _i, _extract(args, out))

            if where == "pre":
                handles.append(module.register_forward_pre_hook(lambda m, a, _h=hook: _h(m, a)))
            else:
                handles.append(module.register_forward_hook(hook))
        yield cap
    finally:
        for h in handles:
            h.remove()
