"""Adapter table edge cases: structural fallback, user override, mixed MoE models, bad indices."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from ffnkit import ArchSpec, LayerIndexError, UnsupportedArchitectureError, capture, find_ffns, select_ffns
from tests.tiny_models import MOE, tiny_inputs, tiny_model


def _recompute_error(model, ffns) -> float:
    with torch.no_grad(), capture(model, sites=["in", "out"], ffns=ffns) as cap:
        model(**tiny_inputs(model))
    return max((f(cap["in", f.index]) - cap["out", f.index]).abs().max().item() for f in ffns)


def test_structural_fallback_warns_and_finds_gated_ffns():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.warns(UserWarning, match="no ffnkit adapter"):
        ffns = find_ffns(model)
    assert len(ffns) == 2 and ffns[0].kind == "gated"
    assert ffns[0].W_gate is model.model.layers[0].mlp.gate_proj.weight
    assert _recompute_error(model, ffns) < 1e-5


def test_user_override_by_module_names():
    model = tiny_model("gpt2")
    spec = ArchSpec(family="custom", layers=("h",), ffn=("mlp",), w_in="c_fc", w_out="c_proj")
    ffns = find_ffns(model, spec=spec)
    assert [f.family for f in ffns] == ["custom", "custom"]
    assert _recompute_error(model, ffns) < 1e-5


def test_unknown_architecture_lists_supported_families():
    class NoFFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tf.PretrainedConfig()
            self.config.model_type = "nothing"
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitectureError, match="supported: .*llama.*mixtral"):
        find_ffns(NoFFN())


def test_wrong_override_names_is_a_clear_error():
    model = tiny_model("llama")
    spec = ArchSpec(family="x", layers=("layers",), ffn=("mlp",), w_in="nope", w_out="down_proj")
    with pytest.raises(UnsupportedArchitectureError, match="found no FFN"):
        find_ffns(model, spec=spec)


def test_mixed_dense_and_moe_layers():
    config = tf.Qwen2MoeConfig(
        num_experts=4,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        mlp_only_layers=[0],
        **MOE,
    )
    torch.manual_seed(0)
    model = tf.Qwen2MoeForCausalLM(config).eval()
    ffns = find_ffns(model)
    assert [f.kind for f in ffns] == ["gated", "moe"]
    assert ffns[1].shared is not None and ffns[1].shared.d_ff == 40 and ffns[1].d_ff == 24
    # asking for a dense-only site on the mixed model captures what each layer has
    with torch.no_grad(), capture(model, sites=["post", "out"], ffns=ffns) as cap:
        model(**tiny_inputs(model))
    assert cap["post", 0].shape[-1] == 48
    assert _recompute_error(model, ffns) < 1e-5


def test_layer_index_errors():
    ffns = find_ffns(tiny_model("llama"))
    assert select_ffns(ffns, -1)[0].index == 1
    with pytest.raises(LayerIndexError, match="out of range: this model has 2 FFNs"):
        select_ffns(ffns, 2)
    with pytest.raises(LayerIndexError):
        with capture(tiny_model("llama"), layers=[5]):
            pass


def test_moe_dense_weights_are_a_clear_error():
    from ffnkit import InvalidArgumentError

    ffn = find_ffns(tiny_model("mixtral"))[0]
    with pytest.raises(InvalidArgumentError, match="experts"):
        _ = ffn.W_out
    with pytest.raises(InvalidArgumentError, match="not available on MoE"):
        with capture(tiny_model("mixtral"), sites=["post"], layers=[0]):
            pass
