"""Least-squares refit of a converted MoE block's down projections, with its routing in the loop.

After ``moefy_`` a token runs only the experts its router chose, and what the others would have added is
lost. The refit solves, over calibration tokens, for the down projections (every expert's and the shared
expert's) and the output bias that best reproduce the dense FFN's output from the activations the block
really computes:

    min over W, b of  Σ_t ‖y_t − W (m_t ⊙ keep_t) − b‖²  +  λ ‖W − W_dense‖²

with m_t the dense FFN's activations, keep_t its shared neurons and the neurons of the experts the router
chose for token t, and λ = ``ridge`` × the mean diagonal of the Gram matrix (shrinking towards the dense
weights, not towards zero). It is the least-squares W_out refit of static pruning
(:func:`ffnkit.compress.prune._refit`) with a mask that changes from token to token; its bias term
subsumes FLAP-style bias compensation. With every expert chosen it returns the dense weights.

Example:
    >>> refit_down_(ffn, block, plan.split, x_calibration, ridge=0.3)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from ffnkit.core.ffn import FFN
from ffnkit.core.lstsq import RidgeTowards
from ffnkit.modules.moe import MoEBlock
from ffnkit.moe.cluster import Split


@torch.no_grad()
def refit_down_(ffn: FFN, block: MoEBlock, split: Split, x: Tensor, ridge: float, chunk: int = 2048) -> None:
    """Replace ``block``'s down projections and output bias by the routing-aware least-squares fit on
    calibration FFN inputs ``x`` [n, d] (see the module doc). ``block`` must be ``ffn`` converted with
    ``split`` (unit-weight routing, no gated shared expert, as ``moefy_`` builds it).

    Example:
        >>> refit_down_(ffn, block, split, torch.randn(4096, ffn.d_model), ridge=0.3)  # doctest: +SKIP
    """
    dev = ffn.W_out.device
    w_dense = ffn.W_out.detach().double()  # [d, n]
    d, n = w_dense.shape
    b_dense = ffn.b_out.detach().double() if ffn.b_out is not None else w_dense.new_zeros(d)
    groups, shared = split.groups.to(dev), split.shared.to(dev)
    num_experts, size = groups.shape
    fit = RidgeTowards(n + 1, d, free=1, device=dev)  # the last unknown: the output bias
    for part in x.split(chunk):
        part = part.to(device=dev, dtype=ffn.W_in.dtype)
        sites = ffn.activations(part)  # one dense pass: its output and activations
        y, m = sites["out"], sites["post"]  # [c, d], [c, n]
        _, _, idx = block.gate(part)  # [c, k]; MoE++ slots (index >= E) run no FFN expert
        chosen = torch.zeros(part.shape[0], num_experts + 1, dtype=torch.bool, device=dev)
        chosen = chosen.scatter_(1, idx.clamp(max=num_experts), True)[:, :num_experts]  # [c, E]
        keep = torch.zeros(part.shape[0], n, dtype=torch.bool, device=dev)
        keep[:, groups.reshape(-1)] = chosen.repeat_interleave(size, dim=1)
        keep[:, shared] = True
        fit.update(torch.cat([m * keep, m.new_ones(part.shape[0], 1)], dim=1), y)  # [c, n + 1]
    prior = torch.cat([w_dense, b_dense[:, None]], dim=1).T  # [n + 1, d]
    sol = fit.solve(prior, ridge)  # [n + 1, d]
    w_new, b_new = sol[:n].T, sol[n]  # [d, n], [d]
    down = block.experts.down_proj
    down.copy_(w_new[:, groups].permute(1, 0, 2).to(down.dtype))  # [d, E, f] -> [E, d, f]
    if block.shared_expert is not None:
        sw = block.shared_expert.down_proj.weight
        sw.copy_(w_new[:, shared].to(sw.dtype))
    if block.bias is None:
        block.add_output_bias(b_new.new_zeros(d))
    block.bias.copy_(b_new.to(block.bias.dtype))


__all__ = ["refit_down_"]
