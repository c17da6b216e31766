"""MoE++ experts in use: how many routing slots zero / copy / constant experts absorb, and the compute saved.

A slot that a zero expert takes runs no FFN expert, a copy or constant expert costs O(d) instead of an
expert's 2·3·d·f (gated) multiply-adds. :func:`routing_shares` runs the model on token ids and counts,
per MoE block, the slots each kind of expert took.

Example:
    >>> moefy_(model, MoEfyConfig(experts=32, active=0.5, zero_experts=4), tokenizer=tok)
    >>> routing_shares(model, ids)["zero_share"]         # share of routed slots the zero experts took
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.modules.moe import MoEBlock

__all__ = ["routing_shares"]


@torch.no_grad()
def routing_shares(model: nn.Module, ids: Tensor, *, batch_size: int = 4) -> dict[str, Any]:
    """Slots taken by FFN / zero / copy / constant experts over ``ids`` [n, T], per block and in total,
    and ``compute_saved``: the share of routed-expert FLOPs the MoE++ experts saved (a copy or constant
    slot counted as free).

    Example:
        >>> routing_shares(model, ids)["layers"][0]["zero"]
    """
    from ffnkit.core.runner import forward

    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    counts = {id(b): torch.zeros(4, dtype=torch.long) for b in blocks}  # ffn, zero, copy, constant

    def hook(block: MoEBlock):
        r = block.gate

        def fn(mod: nn.Module, args: Any, out: tuple[Tensor, Tensor, Tensor]) -> None:
            idx = out[2].flatten().cpu()  # [N·k]
            edges = torch.tensor(
                [r.num_experts, r.num_experts + r.n_zero, r.num_experts + r.n_zero + r.n_copy]
            )
            counts[id(block)] += torch.bincount(torch.bucketize(idx, edges, right=True), minlength=4)

        return block.gate.register_forward_hook(fn)

    handles = [hook(b) for b in blocks]
    try:
        for b in range(0, ids.shape[0], batch_size):
            forward(model, ids[b : b + batch_size])
    finally:
        for h in handles:
            h.remove()
    rows, total = [], torch.zeros(4, dtype=torch.long)
    for b in blocks:
        c = counts[id(b)]
        total += c
        n = max(int(c.sum()), 1)
        rows.append(
            {
                "layer": b.layer,
                **{k: int(v) / n for k, v in zip(("ffn", "zero", "copy", "constant"), c, strict=True)},
            }
        )
    n = max(int(total.sum()), 1)
    share = {k: int(v) / n for k, v in zip(("ffn", "zero", "copy", "constant"), total, strict=True)}
    return {
        "slots": int(total.sum()),
        "ffn_share": share["ffn"],
        "zero_share": share["zero"],
        "copy_share": share["copy"],
        "constant_share": share["constant"],
        "compute_saved": 1.0 - share["ffn"],
        "layers": rows,
    }
