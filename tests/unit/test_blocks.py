"""Blocks and sublayers topology (core.blocks) and the transformers helpers (core.hf)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from ffnkit.core.archs import find_ffns
from ffnkit.core.blocks import (
    attn_path,
    block_modules,
    block_of,
    blocks,
    ffn_path,
    has_submodule,
    layer_list,
    num_blocks,
    parameter_count,
    single_stack,
    sublayers,
    zero_output,
)
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.hf import auto_model_class, quiet_loading, text_config
from tests.tiny_models import DEC, L, tiny_model


def test_layer_list_and_paths_on_llama():
    model = tiny_model("llama")
    owner, attr, mlist = layer_list(model)
    assert owner is model.model and attr == "layers" and mlist is model.model.layers
    assert block_modules(model) == list(model.model.layers) and num_blocks(model) == L
    assert attn_path(model) == "self_attn" and ffn_path(model) == "mlp"
    name, module = block_of(model, find_ffns(model)[1])
    assert name == "model.layers.1" and module is model.model.layers[1]
    assert [s.name for s in sublayers(model)] == [
        "layers.0.attn",
        "layers.0.ffn",
        "layers.1.attn",
        "layers.1.ffn",
    ]
    assert [b.attn for b in blocks(model)] == [blk.self_attn for blk in model.model.layers]


def test_opt_block_is_its_own_ffn_container():
    model = tiny_model("opt")
    name, module = block_of(model, find_ffns(model)[0])
    assert name == "model.decoder.layers.0" and module is model.model.decoder.layers[0]
    with pytest.raises(InvalidArgumentError, match="whole blocks"):
        ffn_path(model)


def test_encoder_decoder_is_refused_in_one_line():
    with pytest.raises(InvalidArgumentError, match="encoder-decoder"):
        single_stack(tiny_model("t5"), "FinerCut")
    with pytest.raises(InvalidArgumentError, match="single stack"):
        layer_list(tiny_model("t5"))


def test_parameter_count_and_has_submodule():
    lin = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    assert parameter_count(lin) == 4 * 3 + 3
    assert has_submodule(lin, "0") and has_submodule(lin, "") and not has_submodule(lin, "2")


def test_zero_output_keeps_the_structure():
    x = torch.ones(2, 3)
    assert torch.equal(zero_output(None, (), x), torch.zeros(2, 3))
    out = zero_output(None, (), (x, "extra"))
    assert torch.equal(out[0], torch.zeros(2, 3)) and out[1] == "extra"
    with pytest.raises(InvalidArgumentError, match="cannot zero"):
        zero_output(None, (), "text")


def test_text_config_of_a_multimodal_config_and_of_a_plain_one():
    text = tf.Gemma3TextConfig(head_dim=8, **DEC)
    multi = tf.Gemma3Config(text_config=text.to_dict())
    assert text_config(multi).hidden_size == DEC["hidden_size"] and text_config(multi) is multi.text_config
    llama = tiny_model("llama")
    assert text_config(llama) is llama.config and text_config(llama.config) is llama.config


def test_auto_model_class():
    assert auto_model_class(tf.LlamaConfig(**DEC)) is tf.AutoModelForCausalLM  # by model type
    assert auto_model_class(tf.T5Config()) is tf.AutoModelForSeq2SeqLM
    assert auto_model_class(tf.BertConfig(architectures=["BertModel"])) is tf.AutoModel
    assert auto_model_class(tf.GPT2Config(architectures=["GPT2LMHeadModel"])) is tf.AutoModelForCausalLM


def test_quiet_loading_restores_the_progress_bar_switch_after_an_error():
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    with pytest.raises(RuntimeError), quiet_loading():
        assert not hf_logging.is_progress_bar_enabled()
        raise RuntimeError("load failed")
    assert hf_logging.is_progress_bar_enabled()
