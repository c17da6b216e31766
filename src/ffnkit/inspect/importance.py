"""Which sublayers matter: FinerCut's greedy sublayer removal and ShortGPT's block influence.

**FinerCut** (Zhang et al. 2024, 2405.18218). Every attention sublayer and every FFN sublayer is a
candidate. Removing one = zeroing its output (a forward hook returns zeros of the same shape, so the
residual stream passes the block unchanged by that sublayer). Greedy: at each step remove the candidate
whose removal, together with those already removed, changes the model's output least, measured as the
mean over tokens of the Jensen–Shannon divergence (natural log, nats; at most ln 2) between the original
and the pruned next-token distributions on calibration text:

    JS(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M),  M = ½ (P + Q),   averaged over every position of every sample.

The full order costs O(C²) forwards for C candidates (C = 2L), so use a small calibration batch and
``steps`` to stop early.

Where the zeros go: FFN sublayers are zeroed at the ``out`` site (the output of W_out, as
``ffnkit.core.capture.site_hooks`` defines it; whole MoE block output for MoE layers), which equals
zeroing W_out and b_out; attention sublayers at the output of ``resolve_spec(model).attn`` inside
each block.

**ShortGPT block influence** (Men et al. 2024): BI_l = 1 − mean_t cos(x_in, x_out) over every token, with
x_in / x_out the hidden state entering / leaving block l (read by hooks on the block, so the last block's
output is taken before the model's final norm). Low BI = the block barely turns the residual stream.

The candidates (:class:`~ffnkit.core.blocks.Sublayer`) and blocks come from :mod:`ffnkit.core.blocks`.

Example:
    >>> res = finercut(model, calibration_batches(load_corpus(), tok, 4, 128), steps=10)
    >>> res.order[0]                     # {'step': 1, 'name': 'layers.27.attn', 'js': 0.0012, ...}
    >>> block_influence(model, batches).layers[0]["bi"]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffnkit.core.blocks import Sublayer, blocks, sublayers, zero_output
from ffnkit.core.config import Result, as_dict
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.progress import ProgressLike, Stage
from ffnkit.core.runner import check_causal_lm, evaluating, iter_batches, log_probs, run

__all__ = [
    "BlockInfluence",
    "FinerCutResult",
    "block_influence",
    "finercut",
    "js_divergence",
    "plot_importance",
    "remove_sublayers",
]


@dataclass
class FinerCutResult(Result):
    """FinerCut's greedy removal order: one row per step {step, layer, kind, name, module, js}."""

    method: str
    metric: str
    removal: str
    n_candidates: int
    steps: int
    js_nothing_removed: float
    calibration: dict[str, int]
    order: list[dict[str, Any]] = field(default_factory=list)
    attn_removed: int = 0
    ffn_removed: int = 0


@dataclass
class BlockInfluence(Result):
    """ShortGPT's block influence: one row per block {layer, name, bi}; ``ranking`` = layers, lowest BI first."""

    method: str
    metric: str
    calibration: dict[str, int]
    layers: list[dict[str, Any]] = field(default_factory=list)
    ranking: list[int] = field(default_factory=list)


@contextmanager
def remove_sublayers(model: nn.Module, removed: Iterable[Sublayer]) -> Iterator[None]:
    """Run the model with these sublayers' outputs zeroed; the hooks are removed on exit (reversible).

    Example:
        >>> cands = sublayers(model)
        >>> with remove_sublayers(model, [cands[3]]):
        ...     pruned = model(ids).logits
    """
    handles = []
    try:
        for s in removed:
            handles.append(s.module.register_forward_hook(zero_output))
        yield
    finally:
        for h in handles:
            h.remove()


def js_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen–Shannon divergence (nats) per position between two log-distributions [..., V] → [...].

    Example:
        >>> js_divergence(torch.log_softmax(a, -1), torch.log_softmax(a, -1)).max()   # 0
    """
    logp, logq = logp.float(), logq.float()
    logm = torch.logaddexp(logp, logq) - torch.log(torch.tensor(2.0, device=logp.device))
    p, q = logp.exp(), logq.exp()
    kl_pm = (p * (logp - logm)).sum(-1)
    kl_qm = (q * (logq - logm)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def finercut(
    model: nn.Module,
    batches: Tensor,
    *,
    steps: int | None = None,
    batch_size: int = 4,
    progress: ProgressLike = False,
) -> FinerCutResult:
    """FinerCut's greedy removal order with the JS divergence after each step (see module docstring).

    Args:
        batches: calibration token ids [n_samples, seq_len] (a few samples × 128–256 tokens).
        steps: stop after this many removals (None = all 2L candidates, O(L²) forwards).

    Example:
        >>> res = finercut(model, batches, steps=5)
        >>> [(r["name"], round(r["js"], 4)) for r in res.order]
    """
    check_causal_lm(model, "FinerCut")
    cands = sublayers(model)
    n_steps = len(cands) if steps is None else int(steps)
    if not 0 <= n_steps <= len(cands):
        raise InvalidArgumentError(f"steps must be in 0..{len(cands)} (the number of sublayers), got {steps}")
    chunks = [ids for _, ids in iter_batches(batches, batch_size)]
    with evaluating(model):
        reference = [log_probs(model, ids) for ids in chunks]  # [b, T, V] each

        def score(removed: list[Sublayer]) -> float:
            total, count = 0.0, 0
            with remove_sublayers(model, removed):
                for ids, ref in zip(chunks, reference, strict=True):
                    js = js_divergence(ref, log_probs(model, ids))  # [b, T]
                    total += float(js.double().sum())
                    count += js.numel()
            return total / count

        removed: list[Sublayer] = []
        order = []
        baseline = score([])  # removing nothing: 0 up to round-off
        total = sum(len(cands) - i for i in range(n_steps))
        with Stage(progress, "finercut", total=total, unit="trial") as stage:
            for step in range(n_steps):
                left = [c for c in cands if c not in removed]
                trials = []
                for c in left:
                    trials.append(score([*removed, c]))
                    stage.advance()
                best = min(range(len(left)), key=lambda i: trials[i])  # first minimum: deterministic
                removed.append(left[best])
                order.append({"step": step + 1, **left[best].to_dict(), "js": trials[best]})
    return FinerCutResult(
        method="finercut",
        metric="mean over tokens of JS(original, pruned) next-token distributions, nats",
        removal="sublayer output zeroed by a forward hook",
        n_candidates=len(cands),
        steps=n_steps,
        js_nothing_removed=baseline,
        calibration={"samples": int(batches.shape[0]), "seq_len": int(batches.shape[1])},
        order=order,
        attn_removed=sum(r["kind"] == "attn" for r in order),
        ffn_removed=sum(r["kind"] == "ffn" for r in order),
    )


def block_influence(
    model: nn.Module, batches: Tensor, *, batch_size: int = 8, progress: ProgressLike = False
) -> BlockInfluence:
    """ShortGPT's BI_l = 1 − mean_t cos(x_in, x_out) for every block, lowest first in ``ranking``.

    Example:
        >>> res = block_influence(model, batches)
        >>> res.ranking[:3]           # the three blocks that change the residual stream least
    """
    blks = blocks(model)
    sums = torch.zeros(len(blks), dtype=torch.float64)
    counts = torch.zeros(len(blks), dtype=torch.float64)
    inputs: dict[int, Tensor] = {}
    handles = []

    def pre(i: int):
        def hook(mod, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post(i: int):
        def hook(mod, args, out):
            x_out = out[0] if isinstance(out, tuple) else out  # [b, T, d]
            cos = F.cosine_similarity(inputs.pop(i).float(), x_out.float(), dim=-1)  # [b, T]
            sums[i] += float(cos.double().sum())
            counts[i] += cos.numel()

        return hook

    try:
        for i, b in enumerate(blks):
            handles.append(b.module.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(b.module.register_forward_hook(post(i)))
        for _ in run(model, batches, batch_size=batch_size, progress=progress, stage="block influence"):
            pass
    finally:
        for h in handles:
            h.remove()
    bi = 1.0 - sums / counts.clamp_min(1)
    rows = [{"layer": b.layer, "name": b.name, "bi": float(bi[i])} for i, b in enumerate(blks)]
    return BlockInfluence(
        method="shortgpt",
        metric="BI = 1 - mean over tokens of cos(block input, block output)",
        calibration={"samples": int(batches.shape[0]), "seq_len": int(batches.shape[1])},
        layers=rows,
        ranking=[r["layer"] for r in sorted(rows, key=lambda r: r["bi"])],
    )


def plot_importance(result: FinerCutResult | BlockInfluence | dict[str, Any], path: str | Path) -> Path:
    """PNG: JS divergence vs sublayers removed (FinerCut) or BI per layer (ShortGPT).

    ``result``: a result of :func:`finercut` / :func:`block_influence`, or its ``to_dict()`` (read back
    from JSON).

    Example:
        >>> plot_importance(finercut(model, batches, steps=10), "finercut.png")
    """
    result = as_dict(result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    if result["method"] == "finercut":
        order = result["order"]
        xs = [0] + [r["step"] for r in order]
        ys = [result["js_nothing_removed"]] + [r["js"] for r in order]
        ax.plot(xs, ys, "-", color="0.6")
        for kind, marker in (("attn", "o"), ("ffn", "s")):
            pts = [(r["step"], r["js"]) for r in order if r["kind"] == kind]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, linestyle="", label=f"{kind} removed")
        ax.set_xlabel("sublayers removed (greedy order)")
        ax.set_ylabel("JS divergence to the full model (nats)")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.legend()
        ax.set_title("FinerCut: output change vs sublayers removed")
    else:
        rows = result["layers"]
        ax.bar([r["layer"] for r in rows], [r["bi"] for r in rows])
        ax.set_xlabel("layer")
        ax.set_ylabel("BI = 1 − mean cos(x_in, x_out)")
        ax.set_title("ShortGPT block influence")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
