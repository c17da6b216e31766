"""Deja Vu's rule: a small low-rank predictor of the neurons that matter, trained on calibration activations.

Per FFN, score(x) = B (A x) + b (A [r, d], B [f, r], initialised from the rank-r SVD of W_gate) is trained
with binary cross-entropy to predict the oracle mask "neuron i is among the largest |m_i| of this token" at
the target share, on the calibration tokens. At run time the neurons with score > t are computed (every
weight of the others is skipped); t is the quantile of the calibration scores that zeroes the target share
plus the predictor's own reads (r·(d+f)+f values per token, counted against the bytes skipped).

Example:
    >>> plans = calibrate_predictor(cal, SparsityConfig("predictor", 0.4))
    >>> plans[0].predictor[0].shape
    torch.Size([64, 576])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.sparsity.calibrate import Calibration, LayerPlan, bytes_skipped, quantile
from ffnkit.sparsity.config import SparsityConfig

__all__ = ["calibrate_predictor", "predictor_overhead", "train_predictor"]


def predictor_overhead(d: int, f: int, rank: int, gated: bool) -> float:
    """The predictor's reads per token as a share of the FFN's weight bytes.

    Example:
        >>> round(predictor_overhead(576, 1536, 64, True), 3)
        0.052
    """
    return (rank * (d + f) + f) / ((3 if gated else 2) * d * f)


def train_predictor(
    x: Tensor, target: Tensor, w_gate: Tensor, rank: int, steps: int, *, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Fit score = B(A x) + b to the 0/1 ``target`` [N, f] from inputs x [N, d] with BCE (Adam).

    Example:
        >>> a, b, bias = train_predictor(torch.randn(64, 8), torch.rand(64, 16) > 0.5, torch.randn(16, 8), 4, 20)
        >>> a.shape, b.shape, bias.shape
        (torch.Size([4, 8]), torch.Size([16, 4]), torch.Size([16]))
    """
    gen = torch.Generator().manual_seed(seed)  # CPU draws: the same rows on every device
    x, y = x.float(), target.float().to(x.device)  # trains where the calibration inputs are (a GPU: fast)
    u, s, vh = torch.linalg.svd(w_gate.float().to(x.device), full_matrices=False)
    r = min(rank, s.numel())
    a = vh[:r].clone().requires_grad_(True)  # [r, d]
    b = (u[:, :r] * s[:r]).clone().requires_grad_(True)  # [f, r]
    bias = torch.zeros(w_gate.shape[0], device=x.device, requires_grad=True)
    pos = y.mean(0).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        bias -= ((x @ a.T) @ b.T).mean(0) - torch.log(pos / (1 - pos))  # start at the base rates
    opt = torch.optim.Adam([a, b, bias], lr=2e-3)
    batch = min(512, x.shape[0])
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, x.shape[0], (batch,), generator=gen).to(x.device)
            logits = (x[rows] @ a.T) @ b.T + bias  # [batch, f]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    if r < rank:  # pad to the configured rank (zeros add nothing)
        a = torch.cat([a.detach(), a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b.detach(), b.new_zeros(b.shape[0], rank - r)], 1)
    return a.detach(), b.detach(), bias.detach()


def calibrate_predictor(cal: Calibration, config: SparsityConfig) -> list[LayerPlan]:
    """Deja Vu: train each FFN's predictor for the target share, threshold its scores (see the module doc).

    Example:
        >>> calibrate_predictor(cal, SparsityConfig("predictor", 0.4))[0].site_sparsity["post"]
    """
    plans = []
    for f in cal.ffns:
        gated = f.kind == "gated"
        rank = min(config.predictor_rank, f.d_model, f.d_ff)
        over = predictor_overhead(f.d_model, f.d_ff, rank, gated)
        q = config.sparsity + over if config.sparsity > 0 else 0.0
        if q >= 0.99:
            raise InvalidArgumentError(
                f"rule 'predictor' reads {over:.0%} of the bytes for its own factors: it cannot skip "
                f"{config.sparsity:.0%}; choose a smaller --sparsity"
            )
        module = cal.module(f.index, "predictor", rank)
        if q == 0:
            plans.append(
                LayerPlan(
                    f.index, 0.0, float("-inf"), predictor=(module.pred_a, module.pred_b, module.pred_bias)
                )
            )
            continue
        x = cal.x(f.index)
        key = ("predictor", f.index, round(q, 6), rank, config.predictor_steps)
        if key not in cal.cache:
            post = cal.sites(module, x, ["post"], masks=False)["post"].abs()  # [N, f]
            oracle = post >= quantile(post, q)  # the neurons a perfect selector keeps
            w_gate = f.W_gate if gated else f.W_in
            cal.cache[key] = train_predictor(
                x, oracle, w_gate.detach(), rank, config.predictor_steps, seed=config.seed
            )
        a, b, bias = cal.cache[key]
        scores = (x.float().to(a.device) @ a.T) @ b.T + bias  # [N, f]
        t = quantile(scores, q)
        plans.append(
            LayerPlan(
                f.index,
                0.0,
                t,
                predictor=(a, b, bias),
                site_sparsity={"post": q},
                bytes_skipped=bytes_skipped("predictor", gated, 0.0, q, over),
            )
        )
    return plans
