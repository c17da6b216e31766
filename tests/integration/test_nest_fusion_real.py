"""Nested widths, FFN Fusion and sublayer removal on the real default model (SmolLM2-135M)."""

from __future__ import annotations

import copy

import pytest
import torch

from ffnkit.compress.fusion import FusionConfig, fuse_ffns_
from ffnkit.compress.nest import NestConfig, nest_, slice_widths_
from ffnkit.compress.sublayers import SublayerConfig, remove_sublayers_
from ffnkit.core.archs import find_ffns
from ffnkit.data import calibration_batches, evaluation_tokens, load_corpus
from ffnkit.evaluate import perplexity
from ffnkit.sources.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real():
    model, tok = load_model()
    return model.eval(), tok


def test_nest_keeps_logits_and_slices_gracefully(real):
    base, tok = real
    model = copy.deepcopy(base)
    cal = calibration_batches(load_corpus(), tok, n_samples=2, seq_len=64)
    nest_(model, NestConfig("wanda-sp"), calibration=cal)
    ids = evaluation_tokens(load_corpus("austen"), tok, max_tokens=512)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids[None, :96]).logits, base(input_ids=ids[None, :96]).logits,
                                   rtol=1e-4, atol=2e-3)  # fmt: skip
    dense = perplexity(base, ids, window=512, progress=False).perplexity
    rep = slice_widths_(model, 0.9)
    assert [f.d_ff for f in find_ffns(model)] == [1382] * 30
    assert rep.parameters_after["total"] < rep.parameters_before["total"] - 30 * 154 * 3 * 576 + 1
    sliced = perplexity(model, ids, window=512, progress=False).perplexity
    # the least important 10% by Wanda-sp: a small loss, not a collapse (measured ~1.05x)
    assert dense < sliced < 1.3 * dense


def test_fusion_is_exact_on_the_real_weights(real):
    base, _ = real
    model = copy.deepcopy(base)
    b28, b29 = model.model.layers[28], model.model.layers[29]
    h = torch.randn(1, 8, 576) * 5
    with torch.no_grad():
        expected = b28.mlp(b28.post_attention_layernorm(h)) + b29.mlp(b29.post_attention_layernorm(h))
    rep = fuse_ffns_(model, FusionConfig(runs=[[28, 29]]))
    with torch.no_grad():
        got = b28.mlp(b28.post_attention_layernorm(h))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert rep.widths[0]["fused_d_ff"] == 3072 and len(find_ffns(model)) == 29


def test_removing_ffn_sublayers_drops_their_parameters(real):
    base, _ = real
    model = copy.deepcopy(base)
    per_ffn = find_ffns(model)[0].num_parameters()
    rep = remove_sublayers_(model, SublayerConfig("manual", remove=["layers.20.ffn", "layers.25.ffn"]))
    assert rep.parameters_before["total"] - rep.parameters_after["total"] == 2 * per_ffn
    assert rep.ffn_ratio_removed == pytest.approx(2 / 30)
    out = model.generate(torch.tensor([[1, 504, 3276]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
