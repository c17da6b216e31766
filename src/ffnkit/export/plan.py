"""Read any ffnkit output of a Llama-family model into plain per-layer tensors for an exporter.

Every runtime module ffnkit swaps in is turned back into what other tools read: a low-rank or quantised
FFN matrix becomes its dense (dequantised) weight, a removed FFN or attention sublayer (``ZeroFFN`` /
``ZeroAttention``) becomes ``None``, a removed block is simply absent (ffnkit renumbers the blocks).
Weights keep transformers' orientation ([out, in]) and names; the writers rename them.

Example:
    >>> model, tok = ffnkit.load("out/best30")
    >>> plan = read_plan(model)
    >>> [layer.d_ff for layer in plan.layers][:3]
    [1280, 1248, 1216]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.errors import UnsupportedArchitectureError

__all__ = ["LayerPlan", "ModelPlan", "read_plan"]

# model types whose decoder is Llama's (RMSNorm, rotary attention, SwiGLU FFN, no attention bias)
LLAMA_FAMILY = ("llama",)


@dataclass
class LayerPlan:
    """One decoder block: ``attn`` (q, k, v, o weights [out, in]) or None if removed; ``ffn`` (gate, up,
    down weights and optional biases) or None if removed; the two RMSNorm gains."""

    attn_norm: Tensor | None
    attn: dict[str, Tensor] | None
    ffn_norm: Tensor | None
    ffn: dict[str, Tensor] | None
    quantized: dict[str, int] = field(default_factory=dict)  # FFN matrix name -> ffnkit bits
    asymmetric: bool = False  # any quantised FFN matrix has zero points

    @property
    def d_ff(self) -> int:
        """FFN width (0 when the FFN sublayer was removed)."""
        return 0 if self.ffn is None else int(self.ffn["gate"].shape[0])


@dataclass
class ModelPlan:
    """The whole model: embeddings, blocks, final norm, head (None when tied to the embeddings)."""

    config: Any
    embed: Tensor  # [V, d]
    layers: list[LayerPlan]
    norm: Tensor  # [d]
    head: Tensor | None  # [V, d]; None: tied

    @property
    def widths(self) -> list[int]:
        return [layer.d_ff for layer in self.layers]

    @property
    def uniform(self) -> bool:
        """Whether one Llama config describes it: one FFN width and no removed sublayer."""
        return len(set(self.widths)) == 1 and all(
            layer.attn is not None and layer.ffn is not None for layer in self.layers
        )

    @property
    def quantized_bits(self) -> set[int]:
        return {b for layer in self.layers for b in layer.quantized.values()}


def _weight(mod: nn.Module) -> Tensor:
    """The dense weight [out, in] of a Linear or of an ffnkit runtime module (low-rank, quantised)."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise UnsupportedArchitectureError(
            f"cannot export a {type(mod).__name__} (no 2-D weight); export supports Linear, low-rank and "
            "quantised FFN matrices"
        )
    return w.detach().float().cpu()


def _bias(mod: nn.Module) -> Tensor | None:
    b = getattr(mod, "bias", None)
    return b.detach().float().cpu() if isinstance(b, Tensor) else None


def _check_config(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    original = (getattr(config, "ffnkit", None) or {}).get("original_model_type")
    if (original or model_type) not in LLAMA_FAMILY:
        raise UnsupportedArchitectureError(
            f"export supports the Llama family ({', '.join(LLAMA_FAMILY)}), not {original or model_type!r}; "
            "save it with ffnkit.save and use transformers' own exporters"
        )
    if getattr(config, "attention_bias", False):
        raise UnsupportedArchitectureError("export does not support attention biases (attention_bias=true)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise UnsupportedArchitectureError(
            f"export supports plain rotary embeddings only, not rope_type {rope.get('rope_type')!r}"
        )


@torch.no_grad()
def read_plan(model: nn.Module) -> ModelPlan:
    """Dense float32 tensors of every block of a (changed) Llama-family causal LM.

    Raises :class:`UnsupportedArchitectureError` (one line) for other families and for modules it cannot
    densify.

    Example:
        >>> plan = read_plan(tiny_llama)
        >>> plan.layers[0].ffn["down"].shape      # [d, d_ff]
        torch.Size([32, 48])
    """
    from ffnkit.modules.zero import ZeroAttention, ZeroFFN

    config = model.config
    _check_config(config)
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(model, "lm_head"):
        raise UnsupportedArchitectureError(
            f"export needs a causal LM with model.layers and lm_head, got {type(model).__name__}"
        )
    layers = []
    for i, block in enumerate(body.layers):
        attn_mod, mlp = block.self_attn, block.mlp
        attn = None
        if not isinstance(attn_mod, ZeroAttention):
            attn = {n: _weight(getattr(attn_mod, f"{n}_proj")) for n in ("q", "k", "v", "o")}
        ffn = None
        quantized: dict[str, int] = {}
        asymmetric = False
        if not isinstance(mlp, ZeroFFN):
            if not all(hasattr(mlp, f"{n}_proj") for n in ("gate", "up", "down")):
                raise UnsupportedArchitectureError(
                    f"layer {i}: cannot export FFN {type(mlp).__name__} (needs gate/up/down projections)"
                )
            ffn = {}
            for n in ("gate", "up", "down"):
                mod = getattr(mlp, f"{n}_proj")
                ffn[n] = _weight(mod)
                b = _bias(mod)
                if b is not None:
                    ffn[f"{n}_bias"] = b
                bits = getattr(mod, "bits", None)
                if isinstance(bits, int):
                    quantized[n] = bits
                    asymmetric = asymmetric or getattr(mod, "zero_point", None) is not None
        layers.append(
            LayerPlan(
                attn_norm=None if attn is None else block.input_layernorm.weight.detach().float().cpu(),
                attn=attn,
                ffn_norm=None
                if ffn is None
                else block.post_attention_layernorm.weight.detach().float().cpu(),
                ffn=ffn,
                quantized=quantized,
                asymmetric=asymmetric,
            )
        )
    embed = body.embed_tokens.weight.detach().float().cpu()  # [V, d]
    head_w = model.lm_head.weight
    tied = head_w is body.embed_tokens.weight or bool(getattr(config, "tie_word_embeddings", False))
    return ModelPlan(
        config=config,
        embed=embed,
        layers=layers,
        norm=body.norm.weight.detach().float().cpu(),
        head=None if tied else head_w.detach().float().cpu(),
    )
