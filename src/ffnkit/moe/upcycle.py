"""Upcycling: a dense FFN becomes an MoE whose experts start from its weights, ``upcycle_(model, cfg)``.

- copy (sparse upcycling, Komatsuzaki et al.): every one of E experts is the whole dense FFN, a new
  softmax top-k router (small random rows, ``router_std``) with renormalised top-k weights; the weights
  sum to 1 over identical experts, so the block equals the dense FFN at initialisation.
- granular / virtual group (Megatron's upcycling utilities): the dense FFN is cut into G neuron slices;
  expert e holds slice e mod G (its down projection × G), so E/G virtual experts each hold a whole copy.
  The router rows are repeated within a virtual group, so the top-k (k a multiple of G) always takes
  whole virtual groups with equal weights 1/k: the layer equals the dense FFN at initialisation.

The new router (and the experts) then learn by continued training through the same code as healing:
``heal_(model, reference, HealConfig(params="ffn"))`` trains every FFN parameter, routers included.

Example:
    >>> report = upcycle_(model, UpcycleConfig(experts=8, top_k=2, granular=True))
    >>> report.layers[0]["expert_size"]        # d_ff / 2
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ffnkit.core.archs import find_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.transaction import Transaction
from ffnkit.modules.moe import MoEBlock, link_routing_state
from ffnkit.moe.convert import CHANGE_KIND, dense_targets, moe_blocks

__all__ = ["UpcycleConfig", "UpcycleReport", "upcycle_"]


@dataclass
class UpcycleConfig(JsonConfig):
    """How to upcycle. ``granular``: slices instead of copies, ``groups`` G slices per FFN (default: top_k).

    Example:
        >>> UpcycleConfig(experts=8, top_k=2, granular=True).to_dict()["groups"] is None
        True
    """

    experts: int = 8
    top_k: int = 2
    granular: bool = False
    groups: int | None = None
    router_std: float = 0.02
    layers: list[int] | None = None
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.experts, int) or self.experts < 1:
            raise InvalidArgumentError(f"experts must be a positive integer, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise InvalidArgumentError(f"top_k must be in [1, experts={self.experts}], got {self.top_k}")
        if self.groups is not None and not self.granular:
            raise InvalidArgumentError("groups= applies to granular upcycling: add granular=True")
        if self.granular:
            g = self.group_count
            if g < 1 or self.experts % g or self.top_k % g:
                raise InvalidArgumentError(
                    f"granular upcycling needs groups (G={g}) dividing both experts ({self.experts}) and "
                    f"top_k ({self.top_k}); choose experts and top_k as multiples of G"
                )
        if not self.router_std >= 0:
            raise InvalidArgumentError(f"router_std must be >= 0, got {self.router_std}")

    @property
    def group_count(self) -> int:
        """G: neuron slices per dense FFN (1 for copy upcycling)."""
        return (self.groups or self.top_k) if self.granular else 1


@dataclass
class UpcycleReport:
    """What ``upcycle_`` changed (JSON-ready through ``to_dict``)."""

    transform: str
    config: dict[str, Any]
    layers: list[dict[str, Any]]
    active_fraction: float  # neurons computed per token / dense d_ff
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _block(ffn: FFN, config: UpcycleConfig, gen: torch.Generator) -> MoEBlock:
    g = config.group_count
    if ffn.d_ff % g:
        raise InvalidArgumentError(
            f"granular upcycling cuts {ffn.name} ({ffn.d_ff} neurons) into {g} slices: choose groups dividing d_ff"
        )
    if ffn.W_gate is None or any(b is not None for b in (ffn.b_in, ffn.b_gate, ffn.b_out)):
        raise InvalidArgumentError(
            f"upcycle_ needs gated FFNs without biases (llama, mistral, qwen, gemma, phi3 ...); {ffn.name} is "
            "not — use moefy_ for other families"
        )
    w_in, w_gate, w_out = ffn.W_in.detach(), ffn.W_gate.detach(), ffn.W_out.detach()  # [n, d], [n, d], [d, n]
    f = ffn.d_ff // g
    block = MoEBlock(
        ffn.d_model,
        f,
        config.experts,
        config.top_k,
        act=ffn.activation,
        router={"kind": "linear", "weighting": "softmax", "norm_topk_prob": True},
        layer=ffn.index,
        dtype=w_in.dtype,
        device=w_in.device,
    )
    slices = torch.arange(config.experts) % g  # [E]: slice of each expert
    rows = slices[:, None] * f + torch.arange(f)[None]  # [E, f] neuron indices
    rows = rows.to(w_in.device)
    # the top-k weights of one virtual group are 1/k each and k/G groups are chosen: × G restores the sum
    block.experts.set_weights(w_gate[rows], w_in[rows], w_out[:, rows].permute(1, 0, 2) * g)  # [E, f, d] ...
    virtual = torch.randn(config.experts // g, ffn.d_model, generator=gen) * config.router_std  # [V, d]
    block.gate.weight.copy_(virtual.repeat_interleave(g, dim=0))  # [E, d]: one row per virtual group
    block.train(ffn.module.training)
    return block


def upcycle_(
    model: nn.Module,
    config: UpcycleConfig | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = False,
    **_: Any,
) -> UpcycleReport:
    """Upcycle the chosen dense FFNs into mixtures of experts, in place and atomically (see the module doc).

    Example:
        >>> report = upcycle_(model, UpcycleConfig(experts=8, top_k=2))
        >>> find_ffns(model)[0].kind
        'moe'
    """
    from ffnkit.evaluate import count_parameters

    start = time.perf_counter()
    config = config or UpcycleConfig()
    ffns = dense_targets(model, config.layers, "upcycle_")
    before = count_parameters(model, find_ffns(model))
    gen = torch.Generator().manual_seed(config.seed)
    blocks = [(f.name, _block(f, config, gen)) for f in ffns]
    with Transaction(model) as tx:
        for path, block in blocks:
            tx.replace(path, block)
        tx.record({"kind": CHANGE_KIND, "blocks": [b.to_record(p) for p, b in blocks]})
    link_routing_state(moe_blocks(model))
    g = config.group_count
    rows = [
        {
            "index": f.index,
            "name": f.name,
            "d_ff": f.d_ff,
            "experts": config.experts,
            "expert_size": f.d_ff // g,
            "top_k": config.top_k,
            "active_fraction": config.top_k / g,
        }
        for f in ffns
    ]
    return UpcycleReport(
        transform="upcycle",
        config=config.to_dict(),
        layers=rows,
        active_fraction=config.top_k / g,
        parameters_before=before,
        parameters_after=count_parameters(model, find_ffns(model)),
        seconds=time.perf_counter() - start,
    )
