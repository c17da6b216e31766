"""``LowRankLinear``: a matrix stored as two low-rank factors, y = B·A·x (+ bias).

``ffnkit.compress.lowrank`` computes the factors and puts this module in the place of a Linear; the saved
state dict holds ``<path>.A.weight`` [k, n], ``<path>.B.weight`` [m, k] and ``<path>.B.bias`` [m], and the
change record ``{"path", "in_features", "out_features", "rank", "bias"}`` (kind ``ffn_lowrank``) rebuilds
the shapes on load.

Example:
    >>> lr = LowRankLinear(576, 1536, rank=200)
    >>> lr(torch.randn(2, 576)).shape
    torch.Size([2, 1536])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.views import read_only
from ffnkit.modules.base import RuntimeModule, dtype_source

__all__ = ["LowRankLinear", "build_lowrank"]


def _plain(w: Tensor) -> Tensor:
    """A plain tensor: quantised factors (torchao tensor subclasses) are dequantised."""
    if type(w) not in (Tensor, nn.Parameter) and hasattr(w, "dequantize"):
        return w.dequantize()
    return w


class LowRankLinear(RuntimeModule):
    """y = B(A(x)): A = Linear(n → k, no bias), B = Linear(k → m, the original bias).

    ``weight`` gives the product B·A [out, in] (like ``nn.Linear.weight``) and ``bias`` the bias, so
    FFN handles and hooks read it like the Linear it replaces. The product is computed, not stored: it is
    read-only (a write raises; edit ``.A.weight`` / ``.B.weight``), and the shape cannot be edited.

    Example:
        >>> lr = LowRankLinear(576, 1536, rank=200)
        >>> lr.weight.shape, lr(torch.randn(2, 576)).shape
        (torch.Size([1536, 576]), torch.Size([2, 1536]))
    """

    change_kind = "ffn_lowrank"
    weights_writable = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.B(self.A(x))  # [..., n] -> [..., k] -> [..., m]

    @property
    def weight(self) -> Tensor:  # [out, in], read-only
        product = _plain(self.B.weight) @ _plain(self.A.weight)
        return read_only(product, f"the product of two rank-{self.rank} factors (edit .A / .B instead)")

    @property
    def bias(self) -> Tensor | None:  # [out], a real parameter (B's)
        return self.B.bias

    @property
    def in_features(self) -> int:
        return self.A.in_features

    @property
    def out_features(self) -> int:
        return self.B.out_features

    @property
    def rank(self) -> int:
        return self.A.out_features

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "bias" and "B" in self._modules:
            self.B.bias = value  # an added output bias (FLAP's compensation) lives on B
            return
        if name in ("weight", "in_features", "out_features", "nx", "nf") and "B" in self._modules:
            raise InvalidArgumentError(
                f"this matrix is factorised (rank {self.rank}); its shape cannot be edited — prune "
                "before lowrank_, or edit the factors .A / .B"
            )
        super().__setattr__(name, value)

    def to_record(self, path: str) -> dict[str, Any]:
        """The change record that rebuilds this module at ``path``.

        Example:
            >>> LowRankLinear(8, 4, 2).to_record("mlp.up_proj")["rank"]
            2
        """
        return {
            "path": path,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.B.bias is not None,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: nn.Module) -> LowRankLinear:
        """Placeholder factors shaped as ``record`` says, in the dtype and device of ``like``.

        Example:
            >>> LowRankLinear.from_record({"in_features": 8, "out_features": 4, "rank": 2, "bias": False},
            ...                           nn.Linear(8, 4)).rank
            2
        """
        src = dtype_source(like)
        return cls(
            int(record["in_features"]),
            int(record["out_features"]),
            int(record["rank"]),
            bool(record["bias"]),
            dtype=src.dtype,
            device=src.device,
        )

    def extra_repr(self) -> str:
        bias = self.B.bias is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={bias}"
        )


def build_lowrank(mod: nn.Module, a: Tensor, b: Tensor) -> LowRankLinear:
    """A LowRankLinear with factors a [k, n], b [m, k] and ``mod``'s bias, dtype, device, requires_grad.

    Example:
        >>> A, B, _ = factorize(lin.weight, 64)
        >>> build_lowrank(lin, A, B).rank
        64
    """
    w = dtype_source(mod)
    bias = getattr(mod, "bias", None)
    new = LowRankLinear(a.shape[1], b.shape[0], a.shape[0], bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.A.weight.copy_(a)
        new.B.weight.copy_(b)
        if bias is not None:
            new.B.bias.copy_(bias)
    new.requires_grad_(w.requires_grad)
    new.train(mod.training)
    return new
