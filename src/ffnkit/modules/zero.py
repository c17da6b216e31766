"""Removed sublayers at run time: ``ZeroFFN`` and ``ZeroAttention`` (``ffnkit.compress.sublayers``).

Both have no parameters; the change record ``{"path", "kind": "ffn"|"attn", "layer"}`` (one row of a
``sublayers_removed`` change) rebuilds them on load.

Example:
    >>> ZeroFFN(layer=3)(torch.ones(1, 2, 8)).abs().sum()
    tensor(0.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.modules.base import RuntimeModule

__all__ = ["ZeroAttention", "ZeroFFN"]

_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


class ZeroFFN(RuntimeModule):
    """A removed FFN: no parameters, returns zeros shaped like its input (the residual passes unchanged).

    Example:
        >>> ZeroFFN(layer=3)(torch.ones(1, 2, 8)).abs().sum()
        tensor(0.)
    """

    change_kind = "sublayers_removed"

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = int(layer)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros_like(hidden_states)  # [B, T, d]

    def to_record(self, path: str) -> dict[str, Any]:
        """The row of a ``sublayers_removed`` change that rebuilds it at ``path``.

        Example:
            >>> ZeroFFN(3).to_record("model.layers.3.mlp")
            {'path': 'model.layers.3.mlp', 'kind': 'ffn', 'layer': 3}
        """
        return {"path": path, "kind": "ffn", "layer": self.layer}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: nn.Module | None = None) -> ZeroFFN:
        """Example: ``ZeroFFN.from_record({"path": "model.layers.3.mlp", "kind": "ffn", "layer": 3}, None)``."""
        return cls(int(record["layer"]))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, removed by ffnkit"


class ZeroAttention(RuntimeModule):
    """A removed attention sublayer: returns ``(zeros, None)`` like v5 attention modules.

    It writes a [B, 1, T, 1] zero placeholder into the KV cache (if one is passed) under its
    ``layer_idx``, so the cache keeps counting tokens for this layer (positions and masks read the
    length of layer 0's cache). A pre-allocated static cache sized for the full layer does not accept
    it: use the default dynamic cache.

    Example:
        >>> out, weights = ZeroAttention(layer_idx=0)(hidden_states=torch.ones(1, 2, 8))
    """

    change_kind = "sublayers_removed"

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = int(layer_idx)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # [B, T, d]
        if hidden is None:
            raise InvalidArgumentError("ZeroAttention needs the hidden states (first argument)")
        cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
        if cache is not None and hasattr(cache, "update"):
            b, t = hidden.shape[0], hidden.shape[1]
            dummy = hidden.new_zeros(b, 1, t, 1)  # [B, heads=1, T, head_dim=1]
            cache.update(dummy, dummy, self.layer_idx)
        return torch.zeros_like(hidden), None

    def to_record(self, path: str) -> dict[str, Any]:
        """The row of a ``sublayers_removed`` change that rebuilds it at ``path``.

        Example:
            >>> ZeroAttention(0).to_record("model.layers.0.self_attn")["kind"]
            'attn'
        """
        return {"path": path, "kind": "attn", "layer": self.layer_idx}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: nn.Module | None = None) -> ZeroAttention:
        """Example: ``ZeroAttention.from_record({"path": "...self_attn", "kind": "attn", "layer": 0}, None)``."""
        return cls(int(record["layer"]))

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, removed by ffnkit"
