"""Pruning a sparsified FFN is refused with one line and leaves the model unchanged (it used to leave the
SparseFFN's per-neuron scales at the old width, so the next forward failed with a shape error)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ffnkit import PruneConfig, SparsityConfig, find_ffns, prune_, sparsify_
from ffnkit.core.errors import InvalidArgumentError

SPARSE = SparsityConfig("teal", 0.4, samples=2, seq_len=16, tokens=64, path_tokens=32)


def tiny_llama() -> tuple[LlamaForCausalLM, torch.Tensor]:
    """A 2-layer Llama (d_ff 64) and calibration ids [4, 32]."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval(), torch.randint(0, 100, (4, 32))


def test_prune_after_sparsify_is_refused_and_model_unchanged() -> None:
    model, ids = tiny_llama()
    sparsify_(model, SPARSE, calibration=ids)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(InvalidArgumentError, match="prune\\) first, then sparsify"):
        prune_(model, PruneConfig("magnitude", 0.25), calibration=ids)
    assert [f.d_ff for f in find_ffns(model)] == [64, 64]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_sparsify_after_prune_works() -> None:
    model, ids = tiny_llama()
    prune_(model, PruneConfig("magnitude", 0.25), calibration=ids)
    sparsify_(model, SPARSE, calibration=ids)
    assert [f.d_ff for f in find_ffns(model)] == [48, 48]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
