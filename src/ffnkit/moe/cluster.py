"""Split one FFN's neurons into E equal experts (MoEfication, LLaMA-MoE) and pick a shared expert.

Splits (``SPLITS``):

- ``kmeans``: balanced k-means on the neurons' keys (L2-normalised rows of W_gate and W_in side by
  side). scikit-learn's ``KMeans`` finds the centroids; a balancing step then gives every expert exactly
  n/E neurons: the optimal assignment of neurons to n/E copies of each centroid (scipy's
  ``linear_sum_assignment`` on cosine distances).
- ``coact``: the same balanced k-means on each neuron's co-activation profile (its row of the
  correlation matrix of |m| over calibration tokens), so neurons that fire together share an expert.
- ``random``: a seeded random permutation (LLaMA-MoE's random split).

The shared expert (always on) takes the most-firing neurons: the largest mean |m| on calibration data.

Example:
    >>> split = split_neurons(ffn, 16, "kmeans", shared=96, firing=mean_abs_m)
    >>> split.groups.shape, split.shared.shape      # (torch.Size([16, 90]), torch.Size([96]))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN

__all__ = ["SPLITS", "Split", "balanced_kmeans", "coactivation_features", "key_features", "split_neurons"]

SPLITS = ("kmeans", "coact", "random")


@dataclass
class Split:
    """Neuron indices of each expert ``groups`` [E, f] (sorted per row) and of the shared expert [s]."""

    groups: Tensor
    shared: Tensor

    @property
    def num_experts(self) -> int:
        return int(self.groups.shape[0])

    @property
    def expert_size(self) -> int:
        return int(self.groups.shape[1])


def balanced_kmeans(features: Tensor, n_clusters: int, *, seed: int = 0) -> Tensor:
    """Cluster the rows of ``features`` [n, p] into ``n_clusters`` groups of exactly n / n_clusters rows.

    Rows are L2-normalised; scikit-learn's k-means gives the centroids, then each row goes to a
    centroid by the optimal balanced assignment (every centroid copied n / n_clusters times). Returns
    the row indices of each group, [n_clusters, n / n_clusters].

    Example:
        >>> balanced_kmeans(torch.randn(12, 5), 3).shape
        torch.Size([3, 4])
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    n = features.shape[0]
    if n % n_clusters:
        raise InvalidArgumentError(f"{n_clusters} clusters do not divide {n} rows")
    size = n // n_clusters
    x = torch.nn.functional.normalize(features.detach().double().cpu(), dim=1).numpy()  # [n, p]
    if n_clusters == 1:
        return torch.arange(n)[None]
    km = KMeans(n_clusters=n_clusters, n_init=1, max_iter=100, random_state=seed).fit(x)
    centroids = km.cluster_centers_ / np.maximum(
        np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True), 1e-12
    )
    cost = 1.0 - x @ centroids.T  # [n, E] cosine distance
    rows, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))  # [n] each: slot j -> cluster j // size
    label = torch.as_tensor(cols // size)[torch.as_tensor(rows).argsort()]  # [n]
    return torch.stack([torch.where(label == c)[0] for c in range(n_clusters)])  # [E, size]


def key_features(ffn: FFN) -> Tensor:
    """Each neuron's keys: normalised rows of W_gate and W_in side by side, [d_ff, d_model or 2·d_model].

    Example:
        >>> key_features(ffn).shape    # gated: torch.Size([1536, 1152])
    """
    norm = torch.nn.functional.normalize
    keys = [norm(ffn.W_in.detach().float(), dim=1)]
    if ffn.W_gate is not None:
        keys.insert(0, norm(ffn.W_gate.detach().float(), dim=1))
    return torch.cat(keys, dim=1)


def coactivation_features(m_abs: Tensor) -> Tensor:
    """Rows of the correlation-normalised co-activation matrix of |m| [N, n] -> [n, n].

    Example:
        >>> coactivation_features(torch.rand(100, 8)).shape
        torch.Size([8, 8])
    """
    a = m_abs.double()
    c = a.T @ a / a.shape[0]  # [n, n]
    d = c.diagonal().clamp_min(1e-12).sqrt()
    return (c / d[:, None] / d[None, :]).float()


def split_neurons(
    ffn: FFN,
    experts: int,
    method: str = "kmeans",
    *,
    shared: int = 0,
    firing: Tensor | None = None,
    m_abs: Tensor | None = None,
    seed: int = 0,
) -> Split:
    """Split ``ffn``'s neurons: ``shared`` most-firing ones into the shared expert, the rest into
    ``experts`` equal groups by ``method`` (``firing`` [d_ff]: mean |m|; ``m_abs`` [N, d_ff]: |m| of
    calibration tokens, for ``coact``).

    Example:
        >>> split_neurons(ffn, 16, "random").groups.shape
        torch.Size([16, 96])
    """
    if method not in SPLITS:
        raise InvalidArgumentError(f"unknown split {method!r}; use one of {', '.join(SPLITS)}")
    n = ffn.d_ff
    if shared and firing is None:
        raise InvalidArgumentError("a shared expert needs calibration data (the firing rate of each neuron)")
    order = torch.argsort(firing.float().cpu(), descending=True) if shared else torch.arange(n)
    shared_idx = order[:shared].sort().values
    rest = order[shared:].sort().values  # [n - s]
    if rest.numel() % experts:
        raise InvalidArgumentError(
            f"{experts} experts do not divide the {rest.numel()} routed neurons of {ffn.name} "
            f"(d_ff {n} − shared {shared}); choose a number of experts that divides it"
        )
    if method == "random":
        g = torch.Generator().manual_seed(seed + ffn.index)
        local = torch.randperm(rest.numel(), generator=g).reshape(experts, -1)
    elif method == "kmeans":
        local = balanced_kmeans(key_features(ffn)[rest], experts, seed=seed)
    else:
        if m_abs is None:
            raise InvalidArgumentError("the coact split needs calibration data (activations of each neuron)")
        local = balanced_kmeans(coactivation_features(m_abs[:, rest]), experts, seed=seed)
    groups = rest[local].sort(dim=1).values  # [E, f] neuron indices of the FFN
    return Split(groups, shared_idx)
