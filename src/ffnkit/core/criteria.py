"""What "an active (firing) neuron" means in ffnkit — defined once, here.

**Neuron i of an FFN is active on a token when |m_i| > threshold · mean_j |m_j|**, where m is the FFN's
``post`` site (what W_out reads: act(W_in x) for plain FFNs, act(W_gate x) ⊙ (W_in x) for gated ones)
on that token, and the mean runs over the layer's d_ff neurons on the same token. The default threshold
is :data:`ACTIVE_THRESHOLD` = 0.1.

Why this rule: it is scale-free (the same threshold means the same thing in every layer and every
model), it works for SiLU / GELU / gated FFNs, where m_i is almost never exactly 0, and for ReLU FFNs
threshold 0 gives the classical "m_i > 0". Everything that counts active neurons uses it: the
``firing_rate`` reducer (``ffnkit.core.reducers.FiringRate``), neuron statistics and contrasts
(``ffnkit.inspect``), the report's firing rates and activation sparsity, and the ``frequency`` pruning
score.

Example:
    >>> m = torch.tensor([[4.0, -2.0, 0.1, 0.0]])          # [tokens, d_ff]; mean |m| = 1.525
    >>> active(m)                                          # |m| > 0.1525
    tensor([[ True,  True, False, False]])
    >>> active(m, threshold=2.0)                           # |m| > 3.05
    tensor([[ True, False, False, False]])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads ACTIVE_THRESHOLD at start-up
    from torch import Tensor

__all__ = ["ACTIVE_RULE", "ACTIVE_THRESHOLD", "active", "relative_magnitude"]

ACTIVE_THRESHOLD = 0.1
ACTIVE_RULE = (
    "neuron i is active on a token when |m_i| > threshold * mean_j |m_j| "
    "(m: the post site, mean over the layer's neurons on that token)"
)


def relative_magnitude(m: Tensor) -> Tensor:
    """|m_i| / mean_j |m_j| per token in float64: m [..., d_ff] → [..., d_ff] (0 where a token's m is all 0).

    A neuron is active exactly where this exceeds the threshold.

    Example:
        >>> relative_magnitude(torch.tensor([[2.0, -2.0, 0.0, 0.0]]))
        tensor([[2., 2., 0., 0.]], dtype=torch.float64)
    """
    import torch

    a = m.detach().double().abs()  # [..., d_ff]
    scale = a.mean(-1, keepdim=True)  # [..., 1]
    return torch.where(scale > 0, a / scale.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def active(m: Tensor, threshold: float = ACTIVE_THRESHOLD) -> Tensor:
    """Bool [..., d_ff]: which neurons are active on each token under the rule of this module (float64).

    Example:
        >>> active(torch.tensor([[1.0, 0.0]]), threshold=0.0)
        tensor([[ True, False]])
    """
    a = m.detach().double().abs()  # [..., d_ff]
    return a > float(threshold) * a.mean(-1, keepdim=True)
