"""Write a :class:`~ffnkit.export.plan.ModelPlan` as a GGUF file that llama.cpp (and so ollama) runs.

Architecture: plain ``llama`` when one Llama config describes the model (one FFN width, every sublayer
present); otherwise llama.cpp's ``deci`` architecture (the DeciLM / Llama-Nemotron graph), which reads
``deci.feed_forward_length`` and ``deci.attention.head_count(_kv)`` as per-layer arrays. A removed
attention sublayer is head count 0 there (llama.cpp skips it); a removed FFN with its attention kept is
written as a zero FFN of width 32 (all-zero matrices, output exactly 0), because llama.cpp's deci graph
skips the *whole* block, attention included, when a layer's FFN width is 0; a block with both removed
is width 0 and head count 0 (an identity block). An FFN output bias (FLAP's bias compensation, the
least-squares refit) is written as ``ffn_down.bias``, which both graphs add.

Tensor types (``dtype``): ``f32``, ``f16``, ``bf16`` and the block quantisations ``q8_0``, ``q5_0``,
``q5_1``, ``q4_0``, ``q4_1`` (quantised here with the ``gguf`` package's reference quantisers). 1-D
tensors stay float32, as in llama.cpp's converter. A block quantisation needs each row (the input
dimension) to be whole blocks of 32: a matrix whose rows are not (``ffn_down`` of a width that is not a
multiple of 32) is written as F16 and listed in the result's ``fallback``; ``--align 32`` on compress
avoids it. ``auto``: F16, and for an ffnkit-quantised model its FFN matrices in the nearest GGUF type
(8 bits → Q8_0, 5 → Q5_0/Q5_1, ≤ 4 → Q4_0/Q4_1, the ``_1`` types for asymmetric ones): ffnkit's
integers are dequantised and quantised again in GGUF's blocks, so the values are close, not equal.
llama.cpp's own ``llama-quantize`` turns an F16 export into its k-quants.

Example:
    >>> result = write_gguf(read_plan(model), tok, "model.gguf", dtype="q8_0")
    >>> result.architecture, result.widths[:2]
    ('deci', [1280, 1248])
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.export.gguf_vocab import vocab_metadata, write_vocab
from ffnkit.export.plan import ModelPlan

__all__ = ["GGUF_DTYPES", "GgufResult", "write_gguf"]

GGUF_DTYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
BLOCK = 32  # elements per block of every GGUF quant type written here
ZERO_FFN_WIDTH = BLOCK  # a removed FFN whose attention stays (see the module docstring)


@dataclass
class GgufResult:
    """What :func:`write_gguf` wrote (JSON-ready through ``to_dict``)."""

    path: str
    architecture: str
    dtype: str
    file_type: str
    widths: list[int]  # FFN width per block as written (a zero FFN counts its 32)
    head_counts: list[int]
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensors
    fallback: list[str] = field(default_factory=list)  # matrices written F16: rows not whole blocks
    dequantised: bool = False  # ffnkit integers dequantised and quantised again
    tokenizer_pre: str = ""
    warnings: list[str] = field(default_factory=list)
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _qtype(name: str):
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q5_0": gguf.GGMLQuantizationType.Q5_0,
        "q5_1": gguf.GGMLQuantizationType.Q5_1,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
    }[name]


def _file_type(name: str) -> int:
    import gguf

    t = gguf.LlamaFileType
    return {
        "f32": t.ALL_F32,
        "f16": t.MOSTLY_F16,
        "bf16": t.MOSTLY_BF16,
        "q8_0": t.MOSTLY_Q8_0,
        "q5_0": t.MOSTLY_Q5_0,
        "q5_1": t.MOSTLY_Q5_1,
        "q4_0": t.MOSTLY_Q4_0,
        "q4_1": t.MOSTLY_Q4_1,
    }[name]


def ffnkit_bits_to_gguf(bits: int, asymmetric: bool) -> str:
    """The GGUF block type closest to ffnkit's integer width (rounding up, never losing bits).

    Example:
        >>> ffnkit_bits_to_gguf(4, asymmetric=True)
        'q4_1'
    """
    if bits <= 4:
        return "q4_1" if asymmetric else "q4_0"
    if bits == 5:
        return "q5_1" if asymmetric else "q5_0"
    return "q8_0"


def rope_permute(w: Tensor, heads: int) -> Tensor:
    """Rows of a Q or K projection [heads·hd, d] from transformers' half-split rotary layout to
    llama.cpp's interleaved pairs: within each head, row j < hd/2 goes to 2j and row hd/2 + j to 2j + 1.

    Example:
        >>> rope_permute(torch.arange(4.0)[:, None], heads=1).flatten().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    rows, d = w.shape
    hd = rows // heads
    return w.reshape(heads, 2, hd // 2, d).transpose(1, 2).reshape(rows, d)  # [heads·hd, d]


class _Tensors:
    """Adds tensors to a GGUF writer in the requested type, with the F16 fallback for ragged rows."""

    def __init__(self, writer: Any, dtype: str) -> None:
        self.writer, self.dtype = writer, dtype
        self.types: dict[str, int] = {}
        self.fallback: list[str] = []

    def add(self, name: str, t: Tensor, dtype: str | None = None) -> None:
        import gguf

        arr = t.detach().float().cpu().numpy()  # [out, in]: GGUF's dims are the reverse, as llama.cpp reads
        kind = dtype or self.dtype
        if arr.ndim == 1 or kind == "f32":
            kind = "f32"
        elif kind.startswith("q") and arr.shape[-1] % BLOCK:
            self.fallback.append(name)
            kind = "f16"
        qtype = _qtype(kind)
        if kind == "f32":
            self.writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif kind == "f16":
            self.writer.add_tensor(name, arr.astype(np.float16))
        else:
            self.writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        self.types[qtype.name] = self.types.get(qtype.name, 0) + 1


def _check_dtype(dtype: str) -> None:
    if dtype not in GGUF_DTYPES:
        raise InvalidArgumentError(
            f"unknown GGUF dtype {dtype!r}; use one of {', '.join(GGUF_DTYPES)} (llama.cpp's llama-quantize "
            "makes k-quants from an f16 export)"
        )


def write_gguf(plan: ModelPlan, tokenizer: Any, path: str | os.PathLike, dtype: str = "auto") -> GgufResult:
    """Write ``plan`` and ``tokenizer`` to the GGUF file ``path`` (overwritten; callers check first).

    Example:
        >>> write_gguf(read_plan(model), tok, "m.gguf", "f16").architecture
        'llama'
    """
    import gguf

    _check_dtype(dtype)
    config = plan.config
    arch = "llama" if plan.uniform else "deci"
    bits = plan.quantized_bits
    base = "f16" if dtype == "auto" else dtype
    writer = gguf.GGUFWriter(str(path), arch)
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    d = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or d // n_head)
    layers = plan.layers
    widths = [
        layer.d_ff if layer.ffn is not None else (ZERO_FFN_WIDTH if layer.attn is not None else 0)
        for layer in layers
    ]
    heads = [n_head if layer.attn is not None else 0 for layer in layers]
    kv_heads = [n_kv if layer.attn is not None else 0 for layer in layers]

    writer.add_name(str(getattr(config, "_name_or_path", "") or "ffnkit export"))
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(d)
    writer.add_block_count(len(layers))
    uniform_heads = len(set(heads)) == 1 and len(set(kv_heads)) == 1
    writer.add_feed_forward_length(widths[0] if arch == "llama" else widths)
    writer.add_head_count(heads[0] if uniform_heads else heads)
    writer.add_head_count_kv(kv_heads[0] if uniform_heads else kv_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(int(plan.embed.shape[0]))
    writer.add_file_type(_file_type(base))

    vocab = vocab_metadata(tokenizer, int(plan.embed.shape[0]))
    write_vocab(writer, vocab)

    out = _Tensors(writer, base)
    out.add("token_embd.weight", plan.embed)
    for i, layer in enumerate(layers):
        if layer.attn is not None:
            out.add(f"blk.{i}.attn_norm.weight", layer.attn_norm)
            out.add(f"blk.{i}.attn_q.weight", rope_permute(layer.attn["q"], n_head))
            out.add(f"blk.{i}.attn_k.weight", rope_permute(layer.attn["k"], n_kv))
            out.add(f"blk.{i}.attn_v.weight", layer.attn["v"])
            out.add(f"blk.{i}.attn_output.weight", layer.attn["o"])
        ffn = layer.ffn
        if ffn is None and layer.attn is None:
            continue  # an identity block: llama.cpp reads width 0 and head count 0
        if ffn is None:
            import torch

            zero = torch.zeros(ZERO_FFN_WIDTH, d)  # [32, d]
            ffn, norm = {"gate": zero, "up": zero, "down": zero.T}, torch.ones(d)
        else:
            norm = layer.ffn_norm
        # dtype "auto": ffnkit-quantised FFN matrices go to their nearest GGUF block type
        ffn_type = (
            ffnkit_bits_to_gguf(max(layer.quantized.values()), layer.asymmetric)
            if (dtype == "auto" and layer.quantized)
            else None
        )
        out.add(f"blk.{i}.ffn_norm.weight", norm)
        for name in ("gate", "up", "down"):
            out.add(f"blk.{i}.ffn_{name}.weight", ffn[name], ffn_type if name in layer.quantized else None)
            if f"{name}_bias" in ffn:
                out.add(f"blk.{i}.ffn_{name}.bias", ffn[f"{name}_bias"])
    out.add("output_norm.weight", plan.norm)
    if plan.head is not None:
        out.add("output.weight", plan.head)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    warnings = list(vocab.warnings)
    if bits and dtype != "auto":
        warnings.append(f"ffnkit's {sorted(bits)}-bit FFN integers were dequantised and written as {dtype}")
    return GgufResult(
        path=str(path),
        architecture=arch,
        dtype=dtype,
        file_type=base,
        widths=widths,
        head_counts=heads,
        tensor_types=out.types,
        fallback=out.fallback,
        dequantised=bool(bits),
        tokenizer_pre=vocab.pre,
        warnings=warnings,
        bytes=Path(path).stat().st_size,
    )
