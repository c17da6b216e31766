"""Quantisation of the real default model saves, reloads bit for bit, and shrinks the file.

int8 and int4 (one scale per 64 inputs) of all 30 FFNs; perplexity on the last 1,024 tokens of Austen's
Persuasion in 512-token windows, in memory and after ``ffnkit.load``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ffnkit import evaluation_tokens, find_ffns, load_corpus, load_model, perplexity
from ffnkit.compress.quantize import QuantizeConfig, quantize_
from ffnkit.io import load, save
from ffnkit.modules.quantized import QuantizedLinear

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model, tok = load_model("smollm2-135m")
    tokens = evaluation_tokens(load_corpus("austen"), tok, max_tokens=1024)
    dense = perplexity(model, tokens, window=512, progress=False).perplexity
    save(model, tok, root / "float")
    return root, tok, tokens, dense


def _size(folder) -> int:
    return (folder / "model.safetensors").stat().st_size


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_real_model_round_trip(setup, bits):
    root, tok, tokens, dense = setup
    model, _ = load_model("smollm2-135m")
    report = quantize_(model, QuantizeConfig(bits=bits, group_size=64))
    assert all(isinstance(f.out_proj, QuantizedLinear) for f in find_ffns(model))
    ppl = perplexity(model, tokens, window=512, progress=False).perplexity
    save(model, tok, root / f"q{bits}", report=report)
    loaded, _ = load(root / f"q{bits}")
    x = tokens[None, :256]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert perplexity(loaded, tokens, window=512, progress=False).perplexity == pytest.approx(ppl, rel=1e-6)
    # int8 is nearly lossless; int4 (asymmetric, groups of 64) costs perplexity but stays usable
    assert ppl == pytest.approx(dense, rel=0.02 if bits == 8 else 0.5)
    saved = _size(root / "float") - _size(root / f"q{bits}")
    assert saved == pytest.approx(report.ffn_bytes_before - report.ffn_bytes_after, rel=0.01)
    # FFN weights go from 32 bits to bits + 0.5 (a float32 scale per 64 weights) + bits / 64 (a packed
    # zero point per 64 weights: the default mapping is asymmetric)
    assert report.stored_bits_per_weight == pytest.approx(bits + 0.5 + bits / 64)
