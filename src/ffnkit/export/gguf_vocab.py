"""Tokenizer metadata for a GGUF file, read from a transformers tokenizer (byte-level BPE).

llama.cpp tokenises with the token list, the merges, the token types and a named pre-tokeniser
(``tokenizer.ggml.pre``) that selects its splitting regex. The name is read off the tokenizer's own
pre-tokeniser: plain byte-level splitting is GPT-2's (``gpt-2``); byte-level after splitting every digit
is SmolLM's (``smollm``); anything else is written as ``default`` and reported, since llama.cpp may
then split text differently from transformers (token ids given directly are unaffected).

Example:
    >>> meta = vocab_metadata(tok)
    >>> meta.model, meta.pre, len(meta.tokens)
    ('gpt2', 'gpt-2', 49152)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ffnkit.core.errors import UnsupportedArchitectureError

__all__ = ["VocabMetadata", "vocab_metadata", "write_vocab"]

# gguf.TokenType values (the gguf package's enum, spelled out so this module imports without it)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


@dataclass
class VocabMetadata:
    """What llama.cpp's tokenizer needs: tokens by id, their types, merges, special ids, the pre-tokeniser."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)


def _pre_name(pre: Any) -> tuple[str, str | None]:
    """llama.cpp's pre-tokeniser name for a tokenizers ``pre_tokenizer`` JSON (and a warning if unsure)."""
    if pre is None:
        return "default", "the tokenizer has no pre-tokeniser; llama.cpp uses its default splitting"
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2", None
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        types = [p.get("type") for p in parts]
        if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm", None
    return "default", f"pre-tokeniser {kind!r} is not mapped; llama.cpp may split text differently"


def vocab_metadata(tokenizer: Any, vocab_size: int | None = None) -> VocabMetadata:
    """Read a fast byte-level BPE tokenizer (``tokenizer.backend_tokenizer``) into GGUF's fields.

    ``vocab_size``: the model's embedding rows; ids past the tokenizer's vocabulary get padding tokens.

    Example:
        >>> vocab_metadata(tok, model.config.vocab_size).special["eos"]
        2
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedArchitectureError(
            "GGUF export needs a fast (tokenizers) tokenizer; save the model with one"
        )
    doc = json.loads(backend.to_str())
    model = doc.get("model", {})
    decoder = (doc.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise UnsupportedArchitectureError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style), not {model.get('type')!r} "
            f"with decoder {decoder!r}"
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in doc.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(max(by_id) + 1, vocab_size or 0)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    kinds = [types.get(i, USER_DEFINED) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre, warning = _pre_name(doc.get("pre_tokenizer"))
    special = {}
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n:
            special[name] = tid
    probe = tokenizer("a")["input_ids"]  # does the tokenizer itself put BOS in front?
    add_bos = bool(probe) and "bos" in special and probe[0] == special["bos"]
    template = getattr(tokenizer, "chat_template", None)
    return VocabMetadata(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        types=kinds,
        merges=merges,
        special=special,
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
        warnings=[warning] if warning else [],
    )


def write_vocab(writer: Any, meta: VocabMetadata) -> None:
    """Add ``meta`` to a ``gguf.GGUFWriter`` under llama.cpp's ``tokenizer.ggml.*`` keys.

    Example:
        >>> write_vocab(gguf.GGUFWriter("m.gguf", "llama"), vocab_metadata(tok))
    """
    writer.add_tokenizer_model(meta.model)
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.types)
    writer.add_token_merges(meta.merges)
    for name, tid in meta.special.items():
        getattr(writer, f"add_{name}_token_id")(tid)
    writer.add_add_bos_token(meta.add_bos)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
