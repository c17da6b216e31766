"""Spectral utilisation of each FFN: how many directions of its d_ff-wide activation space it really uses.

Per layer, the covariance C [d_ff, d_ff] of the post-activation m (the ``post`` site, what W_out reads)
is streamed over the corpus (``Covariance`` reducer, float64, population ddof=0), and its eigenvalues
λ_1 ≥ … ≥ λ_n ≥ 0 (negative round-off clamped to 0) give, with p_i = λ_i / Σλ and n = d_ff:

- ``hard_rank``      = (Σλ)² / Σλ²                      participation ratio = 1 / Σ p_i²  (Jha & Reagen 2025)
- ``soft_rank``      = exp(−Σ p_i log p_i)              Shannon (entropy) effective rank, 0·log 0 = 0
- ``top1pct_share``  = Σ_{i ≤ ⌈n/100⌉} λ_i / Σλ          spectral concentration: variance in the top 1%
- ``lambda_max_share`` = λ_1 / Σλ                        concentration in the single top direction
- ``utilisation``    = soft_rank / n                    spectral utilisation index (ours; in (0, 1])
- ``hard_utilisation`` = hard_rank / n
- ``hard_soft_ratio`` = hard_rank / soft_rank           ≤ 1: how peaked the spectrum is beyond its breadth

Ordering: 1/Σp² = exp(Rényi-2 entropy) ≤ exp(Shannon entropy), so 1 ≤ hard_rank ≤ soft_rank ≤ rank(C) ≤ n.

Example:
    >>> res = spectral_utilisation(model, calibration_batches(load_corpus(), tok, 16, 128))
    >>> res.layers[0]["soft_rank"], res.layers[0]["hard_rank"]
    >>> plot_spectral(res, "spectral.png")
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.capture import capture
from ffnkit.core.config import Result, as_dict
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.progress import ProgressLike
from ffnkit.core.reducers import Covariance
from ffnkit.core.runner import run
from ffnkit.inspect.stats import dense_ffns

__all__ = [
    "FORMULAS",
    "SpectralMetrics",
    "SpectralResult",
    "plot_spectral",
    "spectral_metrics",
    "spectral_utilisation",
]

FORMULAS = {
    "matrix": "population covariance (ddof=0) of the post-activation m [d_ff], per layer, float64",
    "p_i": "lambda_i / sum(lambda), eigenvalues clamped at 0",
    "hard_rank": "(sum lambda)^2 / sum lambda^2  (participation ratio)",
    "soft_rank": "exp(-sum p_i log p_i)  (Shannon effective rank)",
    "top1pct_share": "sum of the largest ceil(d_ff/100) eigenvalues / sum lambda",
    "lambda_max_share": "lambda_max / sum lambda",
    "utilisation": "soft_rank / d_ff",
    "hard_utilisation": "hard_rank / d_ff",
    "hard_soft_ratio": "hard_rank / soft_rank",
}


@dataclass
class SpectralMetrics(Result):
    """The spectral numbers of one covariance (formulas in the module docstring); ``d`` = its width."""

    d: int
    total_variance: float
    hard_rank: float
    soft_rank: float
    top1pct_share: float
    lambda_max_share: float
    utilisation: float
    hard_utilisation: float
    hard_soft_ratio: float


@dataclass
class SpectralResult(Result):
    """Per dense layer {layer, name, d_ff, tokens, and the :class:`SpectralMetrics` fields}; the formulas."""

    formulas: dict[str, str]
    site: str = "post"
    layers: list[dict[str, Any]] = field(default_factory=list)


def spectral_metrics(eigenvalues: Tensor) -> SpectralMetrics:
    """The spectral numbers of one covariance from its eigenvalues [n] (any order); formulas above.

    Example:
        >>> spectral_metrics(torch.tensor([1.0, 1.0, 0.0, 0.0])).soft_rank   # 2.0
    """
    lam = eigenvalues.detach().to(torch.float64).flatten().clamp_min(0.0)
    n = lam.numel()
    total = float(lam.sum())
    if n == 0 or total <= 0.0:
        raise InvalidArgumentError(
            "the covariance has no variance (all eigenvalues are 0): feed more, or more varied, tokens"
        )
    lam = torch.sort(lam, descending=True).values
    p = lam / total
    nz = p[p > 0]
    hard = total**2 / float((lam**2).sum())
    soft = math.exp(float(-(nz * nz.log()).sum()))
    top = max(1, math.ceil(n / 100))
    return SpectralMetrics(
        d=n,
        total_variance=total,
        hard_rank=hard,
        soft_rank=soft,
        top1pct_share=float(p[:top].sum()),
        lambda_max_share=float(p[0]),
        utilisation=soft / n,
        hard_utilisation=hard / n,
        hard_soft_ratio=hard / soft,
    )


def spectral_utilisation(
    model: nn.Module,
    batches: Tensor,
    *,
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    layers_per_pass: int | None = None,
    progress: ProgressLike = False,
) -> SpectralResult:
    """Spectral numbers of the post-activation covariance of each dense FFN layer (see module docstring).

    Args:
        batches: token ids [n_samples, seq_len] (e.g. ``calibration_batches``).
        layers: FFN indices (None = every dense layer; MoE layers have no neurons and are skipped).
        layers_per_pass: covariances held at once (each d_ff² float64); None = all layers in one pass.

    Example:
        >>> res = spectral_utilisation(model, batches, layers=[0, 5])
        >>> [(r["layer"], round(r["soft_rank"])) for r in res.layers]
    """
    ffns = dense_ffns(model, layers, "spectral utilisation")
    group = layers_per_pass or len(ffns)
    if group < 1:
        raise InvalidArgumentError(f"layers_per_pass must be >= 1, got {layers_per_pass}")
    rows = []
    for g in range(0, len(ffns), group):
        part = [f.index for f in ffns[g : g + group]]
        with capture(model, sites="post", layers=part, reducers=[Covariance()]) as cap:
            for _ in run(model, batches, batch_size=batch_size, progress=progress, stage="covariance"):
                pass
        for ffn in ffns[g : g + group]:
            cov = cap.stats("post", ffn.index)["cov"]
            eig = torch.linalg.eigvalsh(cov.cov)  # ascending, float64
            row = {"layer": ffn.index, "name": ffn.name, "d_ff": ffn.d_ff, "tokens": cov.count}
            row.update(spectral_metrics(eig).to_dict())
            rows.append(row)
    return SpectralResult(formulas=dict(FORMULAS), site="post", layers=rows)


def plot_spectral(result: SpectralResult | dict[str, Any], path: str | Path) -> Path:
    """A PNG of hard and soft rank (left) and utilisation / concentration (right) across layers.

    ``result``: a :func:`spectral_utilisation` result or its ``to_dict()``.

    Example:
        >>> plot_spectral(spectral_utilisation(model, batches), "spectral.png")
    """
    result = as_dict(result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    x = [r["layer"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [r["soft_rank"] for r in rows], "o-", label="soft rank exp(H(p))")
    a.plot(x, [r["hard_rank"] for r in rows], "s-", label="hard rank (Σλ)²/Σλ²")
    a.set_xlabel("layer")
    a.set_ylabel("effective rank")
    a.set_yscale("log")
    a.legend(fontsize="small")
    a.set_title("effective rank of the post-activation covariance")
    b.plot(x, [r["utilisation"] for r in rows], "o-", label="utilisation = soft rank / d_ff")
    b.plot(x, [r["top1pct_share"] for r in rows], "^-", label="variance share of top 1% directions")
    b.plot(x, [r["hard_soft_ratio"] for r in rows], "s--", label="hard / soft")
    b.set_xlabel("layer")
    b.set_ylim(0, 1.05)
    b.legend(fontsize="small", loc="best")
    b.set_title("utilisation and concentration")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
