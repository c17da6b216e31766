"""Neuron importance scores for structured FFN pruning (METHODS.md §3). Higher = more important.

Calibration statistics come from one pass over the calibration batches (:func:`collect_stats`):
m, the input of W_out (site ``post``), and x, the FFN input (site ``in``), kept as streaming reducers.
MoE layers run their experts inside one fused module, so their per-expert statistics are recomputed
from the routed tokens of each expert (site ``in`` + the router), exactly as the layer routes them.

Pruning units: a dense FFN, each expert of a MoE layer, and a MoE layer's shared expert; a unit's key
is ``(ffn.index, None)``, ``(ffn.index, e)`` or ``(ffn.index, "shared")``.

Scores: the :data:`~ffnkit.compress.score_functions.SCORES` registry (formulas there); one pass of
:func:`collect_stats` serves every score that ``needs="stats"``, :func:`taylor_scores` the ``"grads"`` one.

Example:
    >>> stats = collect_stats(model, calibration_batches(load_corpus(), tok))
    >>> s = neuron_scores("flap", find_ffns(model)[3], stats)   # [1536]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ffnkit.compress.score_functions import SCORES, ScoreInputs, UnitStats
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN, WeightRef
from ffnkit.core.reducers import Covariance, FiringRate, MeanSquare, Reducer, Variance
from ffnkit.core.runner import forward, run

__all__ = [
    "collect_stats",
    "lowest_protected",
    "neuron_scores",
    "taylor_scores",
    "units",
]

UnitKey = tuple[int, int | str | None]


class Covariance32(Covariance):
    """Covariance whose per-batch co-moment is computed in float32 (sgemm, ~2-4x faster on CPU) and
    merged in float64; batches are centred first, so float32 loses nothing that matters for a refit."""

    def update(self, x: Tensor) -> Reducer:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [N, n]
        if x.shape[0] == 0:
            return self
        mean = x.mean(0)  # [n]
        xc = x - mean  # [N, n]
        self._absorb(x.shape[0], x.shape[1], {"mean": mean.double(), "c": (xc.T @ xc).double()})
        return self


def units(ffn: FFN) -> Iterator[tuple[UnitKey, FFN]]:
    """The prunable units of an FFN: itself (dense), or each expert and the shared expert (MoE)."""
    if ffn.kind != "moe":
        yield (ffn.index, None), ffn
        return
    for e, expert in enumerate(ffn.experts):
        yield (ffn.index, e), expert
    if ffn.shared is not None:
        yield (ffn.index, "shared"), ffn.shared


def _reducers() -> dict[str, Reducer]:
    return {"var": Variance(), "mean_sq": MeanSquare(), "firing": FiringRate()}


def _result(m: dict[str, Reducer], x: Reducer) -> UnitStats:
    var = m["var"].result()
    cov = m["cov"].result().cov if "cov" in m else None
    return UnitStats(
        m_cov=cov,
        count=var.count,
        m_mean=var.mean,
        m_var=var.var,
        m_sq=m["mean_sq"].result(),
        firing=m["firing"].result(),
        x_sq=x.result(),
    )


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    calibration: Tensor,
    ffns: list[FFN] | None = None,
    *,
    batch_size: int = 4,
    covariance: bool = False,
    progress: bool = False,
) -> dict[UnitKey, UnitStats]:
    """One pass over ``calibration`` [n, T] token ids: per-unit statistics of m (``post``) and x (``in``).

    ``covariance=True`` also keeps Cov(m) [d_ff, d_ff] of dense FFNs (for the least-squares refit).

    Example:
        >>> stats = collect_stats(model, calibration_batches(load_corpus(), tok, 32, 256))
        >>> stats[(3, None)].m_var.shape
        torch.Size([1536])
    """
    from ffnkit.core.archs import find_ffns
    from ffnkit.core.capture import capture, site_hooks

    ffns = ffns if ffns is not None else find_ffns(model)
    dense = [f for f in ffns if f.kind != "moe"]
    moe = [f for f in ffns if f.kind == "moe"]
    # MoE: recompute each expert's m from the routed tokens (the fused experts module hides it)
    moe_red: dict[UnitKey, tuple[dict[str, Reducer], Reducer]] = {}
    handles = []

    def moe_hook(ffn: FFN):
        def hook(module, args, out=None):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])  # [N, d]
            _, _, top_i = ffn.router.route(flat)
            for key, unit in units(ffn):
                if key[1] == "shared":
                    xs = flat
                else:
                    xs = flat[(top_i == key[1]).any(-1)]
                if xs.shape[0] == 0:
                    continue
                reds, xr = moe_red.setdefault(key, (_reducers(), MeanSquare()))
                m = unit.activations(xs)["post"]  # [N_e, d_ff]
                for r in reds.values():
                    r.update(m)
                xr.update(xs)

        return hook

    for ffn in moe:
        module, _, _ = site_hooks(ffn, "in")
        handles.append(module.register_forward_pre_hook(moe_hook(ffn)))
    m_reducers: list[Reducer] = [Variance(), MeanSquare(), FiringRate()]
    if covariance:
        m_reducers.append(Covariance32())
    cap = xcap = None
    try:
        if dense:
            layers = [f.index for f in dense]
            with (
                capture(model, "post", layers, reducers=m_reducers, ffns=ffns) as cap,
                capture(model, "in", layers, reducers=[MeanSquare()], ffns=ffns) as xcap,
            ):
                for _ in run(
                    model, calibration, batch_size=batch_size, progress=progress, stage="statistics"
                ):
                    pass
        else:
            for _ in run(model, calibration, batch_size=batch_size, progress=progress, stage="statistics"):
                pass
    finally:
        for h in handles:
            h.remove()
    stats: dict[UnitKey, UnitStats] = {}
    for f in dense:
        m = cap.reducers("post", f.index)
        x = xcap.reducers("in", f.index)
        red = {"var": m["var"], "mean_sq": m["mean_sq"], "firing": m["firing_rate"]}
        if covariance:
            red["cov"] = m["cov"]
        stats[(f.index, None)] = _result(red, x["mean_sq"])
    for key, (reds, xr) in moe_red.items():
        stats[key] = _result(reds, xr)
    return stats


def _need(stats: dict[UnitKey, UnitStats] | None, key: UnitKey, method: str) -> UnitStats:
    if stats is None or key not in stats:
        raise InvalidArgumentError(
            f"method {method!r} needs calibration statistics for FFN {key[0]}: pass calibration data "
            "(or a tokenizer, to draw it from the default corpus)"
        )
    return stats[key]


def neuron_scores(
    method: str,
    unit: FFN,
    stats: dict[UnitKey, UnitStats] | None = None,
    key: UnitKey | None = None,
    grads: dict[UnitKey, Tensor] | None = None,
) -> Tensor:
    """Importance of each neuron of one unit (higher = keep), float64 [d_ff] on the CPU.

    Example:
        >>> neuron_scores("wanda-sp", ffn, stats)
    """
    score = SCORES.get(method)
    needs = SCORES.meta(method, "needs")
    key = key if key is not None else (unit.index, None)
    inputs = ScoreInputs(
        unit,
        w_in=unit.W_in.detach().double().cpu(),  # [n, d]
        w_out=unit.W_out.detach().double().cpu(),  # [d, n]
        w_gate=unit.W_gate.detach().double().cpu() if unit.kind == "gated" else None,
    )
    if needs == "grads":
        if grads is None or key not in grads:
            raise InvalidArgumentError(
                f"{method} scores need gradients: use taylor_scores(model, calibration)"
            )
        inputs.grads = grads[key]
    elif needs == "stats":
        inputs.stats = _need(stats, key, method)
    return score(inputs)


def lowest_protected(score: Tensor, share: float) -> Tensor:
    """Mask [n] of the ⌊share·n⌋ lowest-scored neurons, which pruning must keep (LoRAP's bottom 1%).

    LoRAP's reference (github lihuang258/LoRAP, ``utils/prune.py`` ``prune_mlp``) sorts its scores
    ascending and removes ``sorted_indices[int(n·0.01) : int((sparsity + 0.01)·n)]``: the lowest 1%
    stay, the next ``sparsity`` share goes.

    Example:
        >>> lowest_protected(torch.arange(300.0), 0.01).nonzero().flatten()
        tensor([0, 1, 2])
    """
    n = score.numel()
    p = int(n * share)  # floor, as the reference's int(...)
    mask = torch.zeros(n, dtype=torch.bool)
    if p > 0:
        mask[torch.sort(score.detach().cpu(), stable=True).indices[:p]] = True
    return mask


# ----- first-order Taylor -------------------------------------------------------------------------
def _ref_params(ref: WeightRef) -> nn.Parameter:
    return ref.parameter()  # the stored tensor (a factorised or quantised matrix raises)


def _view_like(ref: WeightRef, full: Tensor) -> Tensor:
    """The same slice/orientation of ``full`` (a tensor shaped like the parameter) that ``ref`` reads."""
    return ref.view_of(full)


def taylor_scores(
    model: nn.Module, calibration: Tensor, ffns: list[FFN] | None = None, *, batch_size: int = 2
) -> dict[UnitKey, Tensor]:
    """First-order Taylor importance per neuron: Σ |W ⊙ ∂L/∂W| over each neuron's weights.

    L is the LM loss (next-token cross-entropy) summed over the calibration samples; only FFN
    parameters take gradients. Needs a model that returns a loss (causal LM or seq2seq).

    Example:
        >>> grads = taylor_scores(model, calibration[:8])
        >>> neuron_scores("taylor", ffn, grads=grads)
    """
    from ffnkit.core.archs import find_ffns

    ffns = ffns if ffns is not None else find_ffns(model)
    all_units = [(k, u) for f in ffns for k, u in units(f)]
    refs = [
        r for _, u in all_units for r in (u.w_in, u.w_gate, u.w_out, u.bias_in, u.bias_gate) if r is not None
    ]
    params = {id(p): p for p in (_ref_params(r) for r in refs)}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in params)
            p.grad = None
        model.eval()  # no dropout: the gradient of the function being pruned
        for i in range(0, calibration.shape[0], batch_size):
            out = forward(model, calibration[i : i + batch_size], labels=True)
            if getattr(out, "loss", None) is None:
                raise InvalidArgumentError(
                    "taylor needs a model that returns an LM loss (causal LM or seq2seq); "
                    "use a data-driven score such as wanda-sp or flap for this model"
                )
            out.loss.backward()
        prod = {pid: (p.detach() * p.grad).abs().double() for pid, p in params.items()}
        scores: dict[UnitKey, Tensor] = {}
        for key, u in all_units:
            s = torch.zeros(u.d_ff, dtype=torch.float64, device=next(iter(prod.values())).device)
            for r in (u.w_in, u.w_gate, u.bias_in, u.bias_gate):
                if r is not None:
                    t = _view_like(r, prod[id(_ref_params(r))])  # [n, d] or [n]
                    s += t.sum(-1) if t.dim() == 2 else t
            s += _view_like(u.w_out, prod[id(_ref_params(u.w_out))]).sum(0)  # W_out [d, n]
            scores[key] = s.cpu()
        return scores
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
