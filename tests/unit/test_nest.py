"""Nested widths: sorting neurons preserves the function; prefixes slice into standalone models."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from ffnkit.compress.nest import NestConfig, mixnmatch_widths, nest_, slice_widths_
from ffnkit.compress.scores import neuron_scores
from ffnkit.core.archs import find_ffns
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.io import load, save
from tests.tiny_models import DEC, FAMILIES, tiny_inputs, tiny_model


def out(model, x):
    with torch.no_grad():
        return model(**x)[0]  # logits, or the last hidden state of encoders


def nest_tiny(model, x):
    if model.config.model_type == "t5":
        return nest_(model, NestConfig("magnitude"))
    return nest_(model, NestConfig("wanda-sp"), calibration=x["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_nest_preserves_the_function(family):
    model = tiny_model(family)
    x = tiny_inputs(model)
    ref = out(model, x)
    before = [f.W_out.detach().clone() for f in find_ffns(model) if f.kind != "moe"]
    rep = nest_tiny(model, x)
    torch.testing.assert_close(out(model, x), ref, rtol=1e-5, atol=1e-5)
    after = [f.W_out for f in find_ffns(model) if f.kind != "moe"]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)) or not before  # reordered
    assert model.config.ffnkit["nest"]["score"] == rep.config["score"]
    assert rep.parameters_after == rep.parameters_before


def test_nest_sorts_neurons_by_importance():
    model = tiny_model("llama")
    nest_(model, NestConfig("magnitude"))
    for f in find_ffns(model):
        s = neuron_scores("magnitude", f)
        assert torch.all(s[:-1] >= s[1:] - 1e-12)  # most important first


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "qwen2_moe", "bert"])
def test_slicing_full_width_is_the_identity_and_smaller_widths_shrink(family, tmp_path):
    model = tiny_model(family)
    x = tiny_inputs(model)
    nest_tiny(model, x)
    ref = out(model, x)
    full = slice_widths_(model, 1.0)
    assert torch.equal(out(model, x), ref)
    assert full.parameters_after == full.parameters_before
    n = find_ffns(model)[0].d_ff
    rep = slice_widths_(model, [n // 2, n // 4])  # Mix'n'Match: one width per layer
    moe = find_ffns(model)[0].kind == "moe"  # expert widths round up to a multiple of 8
    expected = [-(-w // 8) * 8 for w in (n // 2, n // 4)] if moe else [n // 2, n // 4]
    assert [f.d_ff for f in find_ffns(model)] == expected
    assert rep.parameters_after["ffn"] < rep.parameters_before["ffn"]
    assert rep.parameters_after["total"] < rep.parameters_before["total"]
    sliced = out(model, x)
    save(model, None, tmp_path / "m")
    loaded, _ = load(tmp_path / "m")
    assert torch.equal(out(loaded, x), sliced)


def test_prefix_slice_equals_keeping_the_most_important_neurons():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    nest_(model, NestConfig("wanda-sp"), calibration=x["input_ids"])
    ffn = find_ffns(model)[0]
    # zero the tail neurons by hand: the slice must compute the same
    with torch.no_grad():
        w = ffn.W_out.detach().clone()
        ffn.W_out[:, 24:] = 0
        masked = out(model, x)
        ffn.W_out.copy_(w)
    slice_widths_(model, [24, 48])
    torch.testing.assert_close(out(model, x), masked, rtol=1e-5, atol=1e-5)


def test_uniform_share_and_plain_transformers_load(tmp_path):
    model = tiny_model("llama")
    x = tiny_inputs(model)
    nest_(model, NestConfig("wanda-sp"), calibration=x["input_ids"])
    slice_widths_(model, 0.75)
    assert [f.d_ff for f in find_ffns(model)] == [36, 36]
    assert model.config.intermediate_size == 36
    save(model, None, tmp_path / "m")
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(out(plain, x), out(model, x))


def test_mixnmatch_widths_meet_the_budget():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**DEC, "num_hidden_layers": 4})).eval()
    x = tiny_inputs(model, batch=2, seq=12)
    nest_(model, NestConfig("wanda-sp"), calibration=x["input_ids"])
    mm = mixnmatch_widths(model, 0.5, x["input_ids"], ratios=(0.5,))
    widths = mm["widths"]
    assert len(widths) == 4 and all(1 <= w <= 48 for w in widths)
    assert sum(widths) == pytest.approx(0.5 * 4 * 48, abs=4)
    again = mixnmatch_widths(model, 0.5, None, sensitivity=mm["sensitivity"])  # reused curves
    assert again["widths"] == widths
    rep = slice_widths_(model, widths)
    assert rep.ffn_ratio_removed == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("widths", [0, 49, 0.0, 1.5, -0.5, [24], [24, 24, 24], "half", True])
def test_bad_widths(widths):
    model = tiny_model("llama")
    nest_(model, NestConfig("magnitude"))
    with pytest.raises(InvalidArgumentError):
        slice_widths_(model, widths)
    assert [f.d_ff for f in find_ffns(model)] == [48, 48]


def test_slice_needs_nest_and_scores_are_checked():
    model = tiny_model("llama")
    with pytest.raises(InvalidArgumentError, match="nest_"):
        slice_widths_(model, 0.5)
    with pytest.raises(InvalidArgumentError):
        NestConfig("taylor")
    with pytest.raises(InvalidArgumentError):
        NestConfig("random")
    with pytest.raises(InvalidArgumentError):
        nest_(model, NestConfig("wanda-sp"))  # needs calibration
    assert not hasattr(model.config, "ffnkit")


def test_nest_method_keeps_one_minus_ratio():
    from unittest import mock

    from ffnkit.compress.registry import METHODS

    nest = METHODS.get("nest")
    model = tiny_model("llama")
    ids = tiny_inputs(model)["input_ids"]
    config = nest.build({"ratio": 0.25, "samples": 2, "seq_len": 7})
    assert config.score == "wanda-sp"
    with (
        mock.patch("ffnkit.data.calibration_batches", return_value=ids),
        mock.patch("ffnkit.data.load_corpus"),
    ):
        rep = nest(model, config, tokenizer="tokenizer")
    assert [f.d_ff for f in find_ffns(model)] == [36, 36]
    assert rep.ffn_ratio_removed == pytest.approx(0.25)
