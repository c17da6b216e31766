"""``DReLUFFN``: TurboSparse's dReLU FFN, y = W_down (ReLU(W_gate x) ⊙ ReLU(W_up x)).

Both factors are zero for about half of the inputs each, so most neurons are exactly zero, but the swap
changes the function: the model needs continued training (``ffnkit.train``) before it is useful.
:func:`ffnkit.sparsity.drelu_` puts one in the place of each gated FFN container; it keeps the
container's children under their own names (same state dict keys) and offers every capture site.

Example:
    >>> m = DReLUFFN(model.model.layers[0].mlp, SparseSpec("up_proj", "gate_proj", "down_proj", "act_fn"),
    ...              d_ff=1536)
    >>> m(torch.randn(1, 3, 576)).shape
    torch.Size([1, 3, 576])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.modules.base import HookPoint, RuntimeModule
from ffnkit.modules.sparse_ffn import SparseSpec

__all__ = ["DReLUFFN"]


class DReLUFFN(RuntimeModule):
    """A gated FFN with ReLU on both the gate and the up projection (see the module doc).

    Example:
        >>> DReLUFFN(mlp, spec, d_ff=1536).change_kind
        'ffn_drelu'
    """

    change_kind = "ffn_drelu"
    weights_writable = True
    sites = ("in", "pre", "gate", "post", "out")

    def __init__(self, container: nn.Module, spec: SparseSpec, *, d_ff: int) -> None:
        super().__init__()
        if not spec.gated:
            raise InvalidArgumentError("dReLU needs a gated FFN (a gate and an up projection)")
        for name, child in container.named_children():
            self.add_module(name, child)
        self.spec, self.d_ff = spec, int(d_ff)
        for site in self.sites:
            setattr(self, f"hook_{site}", HookPoint(site))

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x = self.hook_in(hidden_states)  # [..., d]
        if self.spec.fused:
            gu = self._modules[self.spec.in_name](x)  # [..., 2f]: [gate | up]
            g, u = gu[..., : self.d_ff], gu[..., self.d_ff :]
        else:
            u, g = self._modules[self.spec.in_name](x), self._modules[self.spec.gate_name](x)  # [..., f]
        u, g = self.hook_pre(u), self.hook_gate(g)
        post = self.hook_post(torch.relu(g) * torch.relu(u))  # [..., f], mostly exact zeros
        return self.hook_out(self._modules[self.spec.out_name](post))

    def to_record(self, path: str) -> dict[str, Any]:
        """The row of an ``ffn_drelu`` change that rebuilds it at ``path``.

        Example:
            >>> m.to_record("model.layers.0.mlp")["d_ff"]
            1536
        """
        return {"path": path, "d_ff": self.d_ff, "spec": asdict(self.spec)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: nn.Module) -> DReLUFFN:
        """Example: ``DReLUFFN.from_record(m.to_record("model.layers.0.mlp"), fresh.model.layers[0].mlp)``."""
        return cls(like, SparseSpec(**record["spec"]), d_ff=int(record["d_ff"]))
