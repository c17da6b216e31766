"""Activation statistics of every FFN over calibration text, in one streaming pass.

Definitions (they are printed in the report too), both from :mod:`ffnkit.core.criteria`'s one rule:

- *firing*: a neuron fires on a token when it is active: |m_i| > 0.1 · mean_j |m_j| over its layer on that
  token (m = ``post``, what W_out reads). Scale-free; for ReLU FFNs at threshold 0 it is "m_i > 0".
- *activation sparsity at ε*: the share of entries of m that are not active at threshold ε, i.e. with
  |m_i| ≤ ε · mean_j |m_j| on their token. It is read off a histogram of log10(|m_i| / mean_j |m_j|)
  (exact zeros land in the lowest bin), so one pass gives every ε.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from torch import Tensor, nn

from ffnkit.core.capture import capture
from ffnkit.core.criteria import relative_magnitude
from ffnkit.core.ffn import FFN
from ffnkit.core.progress import ProgressLike
from ffnkit.core.reducers import FiringRate, Histogram, HistogramResult, MeanAbs, Reducer
from ffnkit.core.runner import run

LOG_RANGE = (-8.0, 4.0)  # log10 of |m_i| / mean_j |m_j|; values outside clamp into the end bins
LOG_BINS = 96
SPARSITY_EPS = (0.01, 0.1, 0.5)
RATE_BINS = 20


class RelativeLogHistogram(Histogram):
    """Histogram of log10(|m_i| / mean_j |m_j|) over all entries (per token): the share of inactive
    entries at any threshold ε, from one pass."""

    name = "relative_log_hist"

    def update(self, x: Tensor) -> Reducer:
        rel = relative_magnitude(x.reshape(-1, x.shape[-1]))  # [N, n] float64
        return super().update(torch.log10(rel.clamp_min(1e-300)))


def cdf_at(result: HistogramResult, log_t: float) -> float:
    """Share of entries with value < ``log_t``, interpolated linearly inside the bin (values outside the
    range are clamped into the end bins by the histogram, so every entry counts).

    Example:
        >>> cdf_at(RelativeLogHistogram(bins=4, range=(-2, 2)).update(m).result(), math.log10(0.1))
    """
    counts = result.counts.double().flatten()
    edges = result.edges.double()
    total = counts.sum().item()
    below = 0.0
    for i in range(len(counts)):
        lo, hi = edges[i].item(), edges[i + 1].item()
        if log_t >= hi:
            below += counts[i].item()
        elif log_t > lo:
            below += counts[i].item() * (log_t - lo) / (hi - lo)
    return below / total if total else float("nan")


def activation_stats(
    model: nn.Module, ffns: list[FFN], batches: Tensor, *, progress: ProgressLike = True
) -> list[dict]:
    """Per dense FFN: firing rates (per neuron and summarised), |m| scale and activation sparsity.

    ``batches`` is a LongTensor [n, seq_len] of calibration token ids. MoE layers are skipped here
    (their experts run inside one fused module); their rows say so.

    Example:
        >>> activation_stats(model, find_ffns(model), batches)[0]["mean_firing_rate"]
    """
    dense = [f for f in ffns if f.kind != "moe"]
    if not dense:  # an all-MoE model: nothing to capture (the report's MoE section reads the routing)
        return [
            {"index": f.index, "layer": f.layer, "kind": "moe", "note": "experts run fused: skipped"}
            for f in ffns
        ]
    with ExitStack() as stack:
        cap = stack.enter_context(
            capture(
                model,
                sites=["post"],
                ffns=ffns,
                layers=[f.index for f in dense],
                reducers=[MeanAbs(), FiringRate(), RelativeLogHistogram(bins=LOG_BINS, range=LOG_RANGE)],
            )
        )
        for _ in run(model, batches, batch_size=1, progress=progress, stage="activation statistics"):
            pass
    rows = []
    for f in ffns:
        if f.kind == "moe":
            rows.append(
                {"index": f.index, "layer": f.layer, "kind": "moe", "note": "experts run fused: skipped"}
            )
            continue
        post = cap.stats("post", f.index)
        rate = post["firing_rate"].double()  # [d_ff]
        mean_abs = post["mean_abs"].double().mean().item()
        hist = post["relative_log_hist"]
        sparsity = {f"{eps:g}": cdf_at(hist, math.log10(eps)) for eps in SPARSITY_EPS}
        rate_hist = torch.histc(rate.float(), bins=RATE_BINS, min=0.0, max=1.0)
        rows.append(
            {
                "index": f.index,
                "layer": f.layer,
                "kind": f.kind,
                "firing_site": "post",
                "mean_firing_rate": rate.mean().item(),
                "dead_neurons": int((rate < 1e-3).sum()),
                "always_on_neurons": int((rate > 1 - 1e-3).sum()),
                "firing_rate_histogram": rate_hist.int().tolist(),
                "mean_abs_m": mean_abs,
                "activation_sparsity": sparsity,
            }
        )
    return rows
