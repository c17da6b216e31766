"""The factorisation maths behind ``ffnkit.compress.lowrank`` (the transform, its config and CLI live
there; the module that holds the factors, ``LowRankLinear``, is :mod:`ffnkit.modules.lowrank`).

- ``svd``: truncated SVD of W (the best rank-k approximation of the weights).
- ``asvd`` (ASVD, github hahnyuan/ASVD4LLM): S = diag(mean|x_j|)^α (α = 0.5), SVD of W·S, then
  V ← S⁻¹V; the columns the inputs use most are kept best.
- ``svd-llm`` (SVD-LLM, github AIoT-MLSys-Lab/SVD-LLM): S = chol(E[x xᵀ]) (regularised if not
  positive definite), truncated SVD of W·S = U Σ Vᵀ, factors B = U_k √Σ_k and A = √Σ_k V_kᵀ S⁻¹: the
  best rank-k approximation of the *outputs* W·X on the calibration data.

SVD and Cholesky run in float64; ``ffnkit.modules.lowrank.build_lowrank`` gives the factors the replaced
module's dtype.
Ranks: :func:`rank_for_ratio` (one matrix) and :func:`global_ranks` (one budget over many).

Example:
    >>> A, B, info = factorize(W, 64, "svd-llm", gram=(X.T @ X) / len(X))
    >>> (B @ A).shape == W.shape
    True
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError

__all__ = [
    "METHODS",
    "Decomposition",
    "decompose",
    "factorize",
    "global_ranks",
    "linalg_threads",
    "rank_for_ratio",
]

METHODS = ("svd", "asvd", "svd-llm")


# ----- the maths ----------------------------------------------------------------------------------
def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """The rank k whose factors A [k, n] and B [m, k] keep the share 1−ratio of the m·n parameters.

    Example:
        >>> rank_for_ratio(1536, 576, 0.3)   # ⌊0.7·1536·576/2112⌋
        293
    """
    return max(1, min(min(m, n), int((1.0 - ratio) * m * n / (m + n))))


def _cholesky(gram: Tensor) -> tuple[Tensor, bool]:
    """Lower Cholesky factor of a (float64) E[xxᵀ]; adds a growing ridge when it is not positive definite."""
    scale = float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for i, ridge in enumerate((0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)):
        chol, info = torch.linalg.cholesky_ex(gram + ridge * scale * eye)
        if int(info) == 0:
            return chol, i > 0
    raise InvalidArgumentError("E[xxᵀ] is not positive definite even with a ridge; use more calibration")


@dataclass
class Decomposition:
    """W = B·A for every rank k ≤ min(m, n): W·S = U Σ Vᵀ in the method's input space, ``right``
    maps V_kᵀ back (V_kᵀ S⁻¹). Truncate with :meth:`factors`."""

    u: Tensor  # [m, r] float64
    s: Tensor  # [r]
    vh: Tensor  # [r, n]
    right: Any  # Tensor [k, n] -> Tensor [k, n]
    regularised: bool = False

    def factors(self, rank: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """(A [k, n], B [m, k], info) at rank k: A = √Σ_k V_kᵀ S⁻¹, B = U_k √Σ_k."""
        k = int(min(rank, self.s.numel()))
        root = self.s[:k].sqrt()  # [k]
        a = self.right(root[:, None] * self.vh[:k])  # [k, n]
        b = self.u[:, :k] * root[None, :]  # [m, k]
        energy = self.s.square()
        kept = float(energy[:k].sum() / energy.sum().clamp_min(1e-300))
        return a, b, {"regularised": self.regularised, "energy_kept": kept}


def decompose(
    weight: Tensor,
    method: str = "svd",
    *,
    mean_abs: Tensor | None = None,
    gram: Tensor | None = None,
    alpha: float = 0.5,
) -> Decomposition:
    """The SVD of W [m, n] in the method's input space (float64), ready to truncate at any rank.

    Example:
        >>> d = decompose(W, "svd-llm", gram=(X.T @ X) / len(X))
        >>> A, B, info = d.factors(64)
    """
    w = weight.detach().to(torch.float64)
    regularised = False
    if method == "svd":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        right = lambda v: v  # noqa: E731
    elif method == "asvd":
        if mean_abs is None:
            raise InvalidArgumentError("asvd needs the inputs' mean |x| (mean_abs=)")
        scale = mean_abs.detach().to(torch.float64).abs()
        # dead inputs: a tiny positive scale keeps S invertible (their columns matter least anyway)
        scale = scale.clamp_min(float(scale.max().clamp_min(1e-12)) * 1e-6) ** alpha  # [n]
        u, s, vh = torch.linalg.svd(w * scale[None, :], full_matrices=False)
        right = lambda v: v / scale[None, :]  # noqa: E731  V_kᵀ S⁻¹
    elif method == "svd-llm":
        if gram is None:
            raise InvalidArgumentError("svd-llm needs the inputs' E[xxᵀ] (gram=)")
        chol, regularised = _cholesky(gram.detach().to(torch.float64))  # S, S Sᵀ = E[xxᵀ]
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        # V_kᵀ S⁻¹: solve Y S = V_kᵀ (S is lower triangular)
        right = lambda v: torch.linalg.solve_triangular(chol, v, upper=False, left=False)  # noqa: E731
    else:
        raise InvalidArgumentError(f"unknown low-rank method {method!r}; use one of {', '.join(METHODS)}")
    return Decomposition(u, s, vh, right, regularised)


def factorize(
    weight: Tensor,
    rank: int,
    method: str = "svd",
    *,
    mean_abs: Tensor | None = None,
    gram: Tensor | None = None,
    alpha: float = 0.5,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Factorise W [m, n] ≈ B [m, k] · A [k, n] (float64) with ``method``; returns (A, B, info).

    ``mean_abs`` [n] (E|x_j|) is needed by asvd, ``gram`` [n, n] (E[xxᵀ]) by svd-llm.

    Example:
        >>> A, B, info = factorize(W, 64, "svd-llm", gram=(X.T @ X) / len(X))
        >>> (B @ A).shape == W.shape
        True
    """
    return decompose(weight, method, mean_abs=mean_abs, gram=gram, alpha=alpha).factors(rank)


def global_ranks(spectra: list[Tensor], shapes: list[tuple[int, int]], ratio: float) -> list[int]:
    """Ranks that keep the share 1−ratio of the parameters of all matrices together, chosen greedily by
    relative energy per parameter: singular value i of matrix j is worth σ_i²/Σσ² (its share of that
    matrix's output energy) and costs m_j + n_j parameters. Each matrix keeps at least rank 1 and at most
    the rank where its factors stop being smaller than it.

    Example:
        >>> global_ranks([d.s for d in decs], [(1536, 576)] * len(decs), 0.3)
    """
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes)
    ranks = [1] * len(spectra)
    used = sum(m + n for m, n in shapes)
    cand_gain, cand_mat = [], []
    for j, (s, (m, n)) in enumerate(zip(spectra, shapes, strict=True)):
        e = s.double().square()
        rel = e / e.sum().clamp_min(1e-300)
        cap = max(1, min(s.numel(), (m * n) // (m + n)))
        cand_gain.append(rel[1:cap] / (m + n))
        cand_mat.append(torch.full((max(0, cap - 1),), j, dtype=torch.long))
    gains, mats = torch.cat(cand_gain), torch.cat(cand_mat)
    # within a matrix gains fall with i, so taking the best first keeps each matrix's ranks a prefix
    for j in mats[torch.argsort(gains, descending=True, stable=True)].tolist():
        m, n = shapes[j]
        if used + m + n > budget:
            continue
        ranks[j] += 1
        used += m + n
    return ranks


@contextmanager
def linalg_threads(n: int):
    """Run mid-size LAPACK calls (SVD, Cholesky) on ``n`` threads: on a busy machine, OpenMP threads
    waiting for a core can make a 1536×576 SVD 80× slower, while one thread loses little.

    Example:
        >>> with linalg_threads(1):
        ...     d = decompose(W, "svd")
    """
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)
