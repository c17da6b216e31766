"""Oracle routing: choose each token's experts by the true norm of what they add (a measuring stick).

``oracle_routing(model)`` makes every ffnkit :class:`~ffnkit.modules.moe.MoEBlock` of the model pick, per
token, the top-k experts with the largest ‖expert output‖ (computed with every expert, so it costs the
dense FFN and more): the best any router could do with the same split and k. Benchmarks report it as an
``oracle`` row beside the learned routers, to show the router's gap; it is not a conversion result.
The blocks get their own routers back when the context ends (also on error).

Example:
    >>> with oracle_routing(model):
    ...     ppl = measure(model, evaluation).perplexity
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.modules.moe import MoEBlock

__all__ = ["oracle_routing"]


@contextmanager
def oracle_routing(model: nn.Module) -> Iterator[list[MoEBlock]]:
    """Route every ffnkit MoE block of ``model`` by the experts' true output norms inside the context.

    Example:
        >>> with oracle_routing(model) as blocks:
        ...     len(blocks)
        30
    """
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    if not blocks:
        raise InvalidArgumentError(
            "oracle_routing needs ffnkit MoE blocks: convert the model with moefy_ first"
        )
    for b in blocks:
        if b.gate.num_routed != b.num_experts or b.gate.weighting != "ones":
            raise InvalidArgumentError(
                "oracle_routing covers weight-1 routing over FFN experts only (no MoE++ experts)"
            )
    try:
        for b in blocks:

            def logits(x: Tensor, previous: Tensor | None = None, *, _b: MoEBlock = b) -> Tensor:
                norms = _b.experts.output_norms(x)  # [N, E]
                return torch.log_softmax(norms.clamp_min(1e-30).log(), dim=-1).to(x.dtype)

            b.gate.router_logits = logits  # an instance attribute shadows the method
        yield blocks
    finally:
        for b in blocks:
            b.gate.__dict__.pop("router_logits", None)
