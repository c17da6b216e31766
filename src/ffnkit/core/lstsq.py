"""Least squares shrunk towards known weights: the one solver of ffnkit's W_out refits.

A refit replaces an FFN's down projection after part of its activations is dropped (sparsity masks, MoE
routing): the kept activations ``F`` [tokens, m] should reproduce the dense output ``Y`` [tokens, d].
With few calibration tokens per unknown a plain fit overfits, and shrinking towards zero (ridge) throws
away the dense weights that are already nearly right; so the fit is shrunk towards them:

    X = argmin ‖F X − Y‖² + λ ‖X − P‖²,   λ = ridge × mean diagonal of FᵀF

solved from the streamed sums ``gram`` = FᵀF and ``cross`` = FᵀY (:class:`RidgeTowards`), so memory does
not grow with the number of tokens. Trailing ``free`` unknowns (a bias column of ones) are not shrunk.

Example:
    >>> fit = RidgeTowards(m=4, d=3, free=0)
    >>> f = torch.randn(100, 4, dtype=torch.float64); w = torch.randn(4, 3, dtype=torch.float64)
    >>> fit.update(f, f @ w)
    >>> torch.allclose(fit.solve(prior=w, ridge=1.0), w)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RidgeTowards"]


class RidgeTowards:
    """Streamed normal equations of a least-squares fit shrunk towards a prior (see the module doc).

    ``m`` unknowns per output (the last ``free`` of them not shrunk), ``d`` outputs; float64 on ``device``.

    Example:
        >>> fit = RidgeTowards(m=1537, d=576, free=1, device="cuda")  # doctest: +SKIP
    """

    def __init__(self, m: int, d: int, *, free: int = 0, device: torch.device | str | None = None) -> None:
        self.free = int(free)
        self.gram = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.cross = torch.zeros(m, d, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, features: Tensor, target: Tensor) -> None:
        """Add tokens: ``features`` [n, m], ``target`` [n, d] (any float dtype)."""
        f, y = features.double(), target.double()
        self.gram += f.T @ f
        self.cross += f.T @ y
        self.tokens += int(f.shape[0])

    def solve(self, prior: Tensor, ridge: float) -> Tensor:
        """The fitted unknowns [m, d]; ``prior`` [m, d] (its ``free`` rows are ignored). Consumes the sums
        (the ridge goes onto the Gram diagonal in place: no second [m, m] matrix)."""
        m = self.gram.shape[0]
        shrunk = m - self.free
        scale = float(self.gram.diagonal()[:shrunk].mean().clamp_min(1e-12)) if shrunk else 0.0
        reg = torch.full((m,), ridge * scale, dtype=torch.float64, device=self.gram.device)
        reg[shrunk:] = 0.0
        self.gram.diagonal().add_(reg)
        return torch.linalg.solve(self.gram, self.cross + reg[:, None] * prior.to(self.gram))
