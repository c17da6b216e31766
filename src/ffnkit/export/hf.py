"""A plain transformers folder (no ffnkit needed to load it) from a :class:`~ffnkit.export.plan.ModelPlan`.

Plain ``LlamaForCausalLM`` has one FFN width for all blocks and no way to leave a sublayer out, so a
model with per-layer widths or removed sublayers is refused with a one-line error, unless ``pad``:
then every FFN is padded to the widest with zero neurons (zero gate/up rows, zero down columns: silu(0)·0
adds exactly 0), a removed FFN becomes such an all-zero FFN, and a removed attention keeps zero weights
(its output projection is zero, so it adds exactly 0). Padding gives the original outputs back but not
the smaller size; ``--format gguf`` keeps the size. An FFN output bias (FLAP's compensation, the refit)
is kept with ``mlp_bias=true`` (zero biases on gate/up). Quantised and low-rank FFN matrices are written
dense in ``dtype``.

Example:
    >>> result = write_hf(read_plan(model), tok, "plain", dtype="f32")
    >>> AutoModelForCausalLM.from_pretrained("plain")   # plain transformers
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ffnkit.core.errors import InvalidArgumentError, UnsupportedArchitectureError
from ffnkit.export.plan import ModelPlan

__all__ = ["HF_DTYPES", "HfResult", "write_hf"]

HF_DTYPES = {"auto": torch.float32, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class HfResult:
    """What :func:`write_hf` wrote (JSON-ready through ``to_dict``)."""

    path: str
    dtype: str
    intermediate_size: int
    num_hidden_layers: int
    padded: bool
    dequantised: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plain_config(plan: ModelPlan, width: int, bias: bool) -> Any:
    """A plain ``LlamaConfig`` for ``plan``: its sizes, without ffnkit's keys.

    Example:
        >>> plain_config(read_plan(model), 1536, bias=False).model_type
        'llama'
    """
    from transformers import LlamaConfig

    doc = plan.config.to_dict()
    for key in ("ffnkit", "model_type", "transformers_version", "architectures", "_name_or_path"):
        doc.pop(key, None)
    doc.update(intermediate_size=width, num_hidden_layers=len(plan.layers), mlp_bias=bias)
    config = LlamaConfig(**doc)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _pad(w: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, w.shape[1], dtype=w.dtype)  # [rows, in]
    out[: w.shape[0]] = w
    return out


def _state(plan: ModelPlan, width: int, bias: bool) -> dict[str, torch.Tensor]:
    """transformers' state dict for ``plan`` with every FFN ``width`` wide (zero-padded)."""
    cfg = plan.config
    d = int(cfg.hidden_size)
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    hd = int(getattr(cfg, "head_dim", None) or d // n_head)
    sd = {"model.embed_tokens.weight": plan.embed, "model.norm.weight": plan.norm}
    if plan.head is not None:
        sd["lm_head.weight"] = plan.head
    for i, layer in enumerate(plan.layers):
        p = f"model.layers.{i}."
        attn = layer.attn or {
            "q": torch.zeros(n_head * hd, d),
            "k": torch.zeros(n_kv * hd, d),
            "v": torch.zeros(n_kv * hd, d),
            "o": torch.zeros(d, n_head * hd),  # a zero output projection: the removed attention adds 0
        }
        for n in ("q", "k", "v", "o"):
            sd[f"{p}self_attn.{n}_proj.weight"] = attn[n]
        ones = torch.ones(d)
        sd[f"{p}input_layernorm.weight"] = layer.attn_norm if layer.attn_norm is not None else ones
        sd[f"{p}post_attention_layernorm.weight"] = layer.ffn_norm if layer.ffn_norm is not None else ones
        ffn = layer.ffn or {"gate": torch.zeros(0, d), "up": torch.zeros(0, d), "down": torch.zeros(d, 0)}
        sd[f"{p}mlp.gate_proj.weight"] = _pad(ffn["gate"], width)  # [width, d]
        sd[f"{p}mlp.up_proj.weight"] = _pad(ffn["up"], width)
        sd[f"{p}mlp.down_proj.weight"] = _pad(ffn["down"].T, width).T  # [d, width]
        if bias:
            sd[f"{p}mlp.gate_proj.bias"] = _pad(ffn.get("gate_bias", torch.zeros(0))[:, None], width)[:, 0]
            sd[f"{p}mlp.up_proj.bias"] = _pad(ffn.get("up_bias", torch.zeros(0))[:, None], width)[:, 0]
            sd[f"{p}mlp.down_proj.bias"] = ffn.get("down_bias", torch.zeros(d))
    return sd


def write_hf(
    plan: ModelPlan, tokenizer: Any, path: str | os.PathLike, dtype: str = "auto", pad: bool = False
) -> HfResult:
    """Write ``plan`` as a plain transformers folder at ``path`` (written atomically; callers check first).

    Example:
        >>> write_hf(read_plan(model), tok, "plain").intermediate_size
        1536
    """
    from transformers import LlamaForCausalLM

    from ffnkit.folders import atomic_folder

    if dtype not in HF_DTYPES:
        raise InvalidArgumentError(
            f"--format hf writes float weights; use --dtype {', '.join(HF_DTYPES)} (GGUF quant types: --format gguf)"
        )
    if not plan.uniform and not pad:
        widths = sorted(set(plan.widths))
        what = f"per-layer FFN widths ({widths[0]}…{widths[-1]})" if len(widths) > 1 else "removed sublayers"
        raise UnsupportedArchitectureError(
            f"plain transformers Llama cannot hold {what}; use --format gguf (llama.cpp reads them), or "
            "--pad to zero-pad every FFN to the widest (exact, but not smaller)"
        )
    width = max(max(plan.widths), 1)
    bias = any(len(layer.ffn or {}) > 3 for layer in plan.layers)
    config = plain_config(plan, width, bias)
    torch_dtype = HF_DTYPES[dtype]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {k: v.to(torch_dtype) for k, v in _state(plan, width, bias).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and plan.head is None)]
    if missing or unexpected:  # a bug here, never a user error: say exactly what differs
        raise UnsupportedArchitectureError(
            f"export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if plan.head is None:
        model.tie_weights()
    model.config.dtype = torch_dtype
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return HfResult(
        path=str(path),
        dtype=dtype,
        intermediate_size=width,
        num_hidden_layers=len(plan.layers),
        padded=pad and not plan.uniform,
        dequantised=bool(plan.quantized_bits),
    )
