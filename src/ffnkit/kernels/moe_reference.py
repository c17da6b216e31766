"""The reference expert executor: every expert on every token in float32, combined by a dense [T, E] weight.

Nothing is sorted, gathered or skipped, so it shares no indexing logic with the fast paths it checks: the
router's (index, weight) pairs become a dense combination matrix C [T, E] (index E dropped, repeated
indices added), and y = sum_e C[:, e] * expert_e(x). Inputs are validated by :mod:`ffnkit.kernels.moe`.

Example:
    >>> import torch
    >>> from ffnkit.kernels.moe_reference import experts_forward
    >>> gu, dn = torch.randn(3, 4, 2), torch.randn(3, 2, 2)
    >>> experts_forward(torch.randn(5, 2), gu, dn, torch.randint(0, 4, (5, 2)), torch.rand(5, 2)).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ffnkit.kernels.reference import activation


def experts_forward(
    x: Tensor, gate_up: Tensor, down: Tensor, top_k_index: Tensor, top_k_weights: Tensor, act: str = "silu"
) -> Tensor:
    """y [T, D] = sum_e C[:, e] * down_e (act(gate_e x) * up_e x), C the dense routing weights, in float32.

    Example:
        >>> gu, dn = torch.randn(2, 4, 3), torch.randn(2, 3, 2)
        >>> idx = torch.tensor([[2]])  # no expert
        >>> experts_forward(torch.randn(1, 3), gu, dn, idx, torch.ones(1, 1)).abs().max().item()
        0.0
    """
    e, f2, _ = gate_up.shape
    f = f2 // 2
    xf = x.float()  # [T, D]
    combine = torch.zeros(x.shape[0], e + 1, dtype=torch.float32, device=x.device)  # [T, E+1]
    combine.scatter_add_(1, top_k_index.long(), top_k_weights.float())
    y = torch.zeros_like(xf)  # [T, D]
    for j in range(e):
        col = combine[:, j : j + 1]  # [T, 1]
        if not bool((col != 0).any()):
            continue
        gu = xf @ gate_up[j].float().T  # [T, 2F]
        h = activation(act, gu[:, :f]) * gu[:, f:]  # [T, F]
        y += col * (h @ down[j].float().T)  # [T, D]
    return y.to(x.dtype)


__all__ = ["experts_forward"]
