"""Activation statistics of every FFN over calibration text, in one streaming pass.

Definitions (they are printed in the report too):

- *firing*: a neuron fires on a token when the input of its nonlinearity is positive — the gate
  pre-activation for gated FFNs, the up pre-activation for plain ones. This is scale-free and, for ReLU,
  exactly "m_i > 0".
- *activation sparsity at ε*: the share of entries of m (``post``, what W_out reads) with
  |m| < ε · mean|m| of that layer. It is read off a histogram of log10|m|, so one pass suffices.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ffnkit.core.capture import capture
from ffnkit.core.ffn import FFN
from ffnkit.core.reducers import FiringRate, Histogram, MeanAbs

LOG_RANGE = (-8.0, 4.0)  # log10 |m| histogram range; values outside land in the end bins
LOG_BINS = 96
SPARSITY_EPS = (0.01, 0.1, 0.5)
RATE_BINS = 20


class LogAbsHistogram(Histogram):
    """Histogram of log10|x| over all entries: the CDF of |x| at any threshold, from one pass."""

    name = "log_abs_hist"

    def update(self, x: Tensor) -> None:
        return super().update(torch.log10(x.abs().float().clamp_min(1e-30)))


def _cdf_at(result, log_t: float) -> float:
    """Share of entries with log10|x| < log_t, interpolated linearly inside the bin."""
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
    model: nn.Module, ffns: list[FFN], batches: Tensor, *, progress: bool = True
) -> list[dict]:
    """Per dense FFN: firing rates (per neuron and summarised), |m| scale and activation sparsity.

    ``batches`` is a LongTensor [n, seq_len] of calibration token ids. MoE layers are skipped here
    (their experts run inside one fused module); their rows say so.
    """
    dense = [f for f in ffns if f.kind != "moe"]
    fire_site = {f.index: "gate" if f.kind == "gated" else "pre" for f in dense}
    device = next(model.parameters()).device
    caps = {}
    with torch.no_grad(), ExitStack() as stack:
        caps["post"] = stack.enter_context(
            capture(
                model,
                sites=["post"],
                ffns=ffns,
                layers=[f.index for f in dense],
                reducers=[MeanAbs(), LogAbsHistogram(bins=LOG_BINS, range=LOG_RANGE)],
            )
        )
        for site in sorted(set(fire_site.values())):
            layers = [i for i, s in fire_site.items() if s == site]
            caps[site] = stack.enter_context(
                capture(model, sites=[site], ffns=ffns, layers=layers, reducers=[FiringRate(threshold=0.0)])
            )
        for row in tqdm(batches, desc="activation statistics", disable=not progress):
            model(row[None].to(device))
    rows = []
    for f in ffns:
        if f.kind == "moe":
            rows.append(
                {"index": f.index, "layer": f.layer, "kind": "moe", "note": "experts run fused: skipped"}
            )
            continue
        rate = caps[fire_site[f.index]].stats(fire_site[f.index], f.index)["firing_rate"].double()  # [d_ff]
        post = caps["post"].stats("post", f.index)
        mean_abs = post["mean_abs"].double().mean().item()
        hist = post["log_abs_hist"]
        sparsity = {f"{eps:g}": _cdf_at(hist, math.log10(eps * mean_abs)) for eps in SPARSITY_EPS}
        rate_hist = torch.histc(rate.float(), bins=RATE_BINS, min=0.0, max=1.0)
        rows.append(
            {
                "index": f.index,
                "layer": f.layer,
                "kind": f.kind,
                "firing_site": fire_site[f.index],
                "mean_firing_rate": rate.mean().item(),
                "dead_neurons": int((rate < 1e-3).sum()),
                "always_on_neurons": int((rate > 1 - 1e-3).sum()),
                "firing_rate_histogram": rate_hist.int().tolist(),
                "mean_abs_m": mean_abs,
                "activation_sparsity": sparsity,
            }
        )
    return rows
