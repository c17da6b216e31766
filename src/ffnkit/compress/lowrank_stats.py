"""Calibration statistics for low-rank factorisation: E|x| (ASVD) and E[xxᵀ] (SVD-LLM) of what each
FFN matrix reads, in float64, streamed so that memory stays bounded.

x is the FFN input (site ``in``) for W_in and W_gate, the neuron activations (site ``post``) for W_out.

Example:
    >>> stats = collect_lowrank_stats(model, calibration_batches(load_corpus(), tok, 32, 256))
    >>> stats[(0, "post")]["gram"].shape
    torch.Size([1536, 1536])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns
from ffnkit.core.ffn import FFN

__all__ = ["collect_lowrank_stats"]


class _InputStats:
    """Streaming E|x| [n] and (optionally) E[xxᵀ] [n, n] in float64 of what one module reads."""

    def __init__(self, gram: bool) -> None:
        self.count = 0
        self.abs_sum: Tensor | None = None
        self.gram_sum: Tensor | None = None
        self.want_gram = gram

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [N, n]
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            if self.want_gram:
                self.gram_sum = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        if self.gram_sum is not None:
            self.gram_sum += (x.T @ x).double()  # per-batch product in float32, accumulated in float64
        self.count += x.shape[0]

    def result(self) -> dict[str, Tensor]:
        n = max(self.count, 1)
        out = {"mean_abs": self.abs_sum / n}
        if self.gram_sum is not None:
            out["gram"] = self.gram_sum / n
        return out


@torch.no_grad()
def collect_lowrank_stats(
    model: nn.Module,
    calibration: Tensor,
    ffns: list[FFN] | None = None,
    *,
    sites: tuple[str, ...] = ("in", "post"),
    gram: bool = True,
    batch_size: int = 4,
    memory_budget: int = 1 << 30,
    progress: bool = False,
) -> dict[tuple[int, str], dict[str, Tensor]]:
    """E|x| and E[xxᵀ] (float64) of each FFN's matrix inputs: ``{(ffn.index, site): {"mean_abs", "gram"}}``.

    Sites: ``in`` (read by W_in/W_gate) and ``post`` (read by W_out). Layers are grouped so that the
    float64 accumulators of one pass stay under ``memory_budget`` bytes (one calibration pass per group).

    Example:
        >>> stats = collect_lowrank_stats(model, calibration_batches(load_corpus(), tok, 32, 256))
        >>> stats[(0, "post")]["gram"].shape
        torch.Size([1536, 1536])
    """
    from ffnkit.core.capture import site_hooks
    from ffnkit.core.runner import run

    ffns = [f for f in (ffns if ffns is not None else find_ffns(model)) if f.kind != "moe"]
    width = {"in": lambda f: f.d_model, "post": lambda f: f.d_ff}
    jobs = [(f, s) for f in ffns for s in sites]
    groups: list[list[tuple[FFN, str]]] = [[]]
    used = 0
    for f, s in jobs:
        cost = 8 * width[s](f) ** 2 if gram else 8 * width[s](f)
        if groups[-1] and used + cost > memory_budget:
            groups.append([])
            used = 0
        groups[-1].append((f, s))
        used += cost
    out: dict[tuple[int, str], dict[str, Tensor]] = {}
    for g, group in enumerate(groups):
        accs = {(f.index, s): _InputStats(gram) for f, s in group}
        handles = []
        try:
            for f, s in group:
                module, kind, extract = site_hooks(f, s)
                acc = accs[(f.index, s)]
                if kind == "pre":
                    hook = lambda mod, args, acc=acc, ex=extract: acc.update(ex(args, None))  # noqa: E731
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    hook = lambda mod, args, o, acc=acc, ex=extract: acc.update(ex(args, o))  # noqa: E731
                    handles.append(module.register_forward_hook(hook))
            desc = "low-rank statistics" + (f" {g + 1}/{len(groups)}" if len(groups) > 1 else "")
            for _ in run(model, calibration, batch_size=batch_size, progress=progress, stage=desc):
                pass
        finally:
            for h in handles:
                h.remove()
        out.update({key: acc.result() for key, acc in accs.items()})
    return out
