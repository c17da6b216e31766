"""FFN Fusion: the fused FFN is exactly the sum of the originals given the same input."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from ffnkit.compress.fusion import (
    FFN_NORM,
    FusionConfig,
    auto_runs,
    dependency_matrix,
    fuse_ffns_,
    set_ffn_weights_,
)
from ffnkit.compress.sublayers import removed_sublayers
from ffnkit.core.archs import find_ffns
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError, UnsupportedArchitectureError
from ffnkit.io import load, save
from ffnkit.modules.zero import ZeroFFN
from tests.tiny_models import DEC, tiny_inputs, tiny_model

FUSION_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "phi3")


def deep(family: str = "llama", layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family](**{**DEC, "num_hidden_layers": layers})
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # distinct norm gains per block
    return model.float().eval()


def blocks(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)][0]


@pytest.mark.parametrize("family", FUSION_FAMILIES)
def test_fused_ffn_equals_the_sum_of_the_originals(family):
    model = tiny_model(family)
    b0, b1 = blocks(model)[0], blocks(model)[1]
    norm = FFN_NORM[family]
    assert not torch.equal(getattr(b0, norm).weight, getattr(b1, norm).weight)  # gains really differ
    h = torch.randn(3, 5, model.config.hidden_size)  # the residual stream entering the FFN
    with torch.no_grad():
        expected = b0.mlp(getattr(b0, norm)(h)) + b1.mlp(getattr(b1, norm)(h))  # x + f1(x) + f2(x)
    n_ffn = find_ffns(model)[0].num_parameters() + find_ffns(model)[1].num_parameters()
    rep = fuse_ffns_(model, FusionConfig(runs=[[0, 1]]))
    with torch.no_grad():
        fused = b0.mlp(getattr(b0, norm)(h))
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    assert isinstance(b1.mlp, ZeroFFN)
    ffns = find_ffns(model)
    assert len(ffns) == 1 and ffns[0].d_ff == 2 * 48 and ffns[0].num_parameters() == n_ffn
    assert rep.widths == [{"first": 0, "fused_d_ff": 96, "removed": [1]}]
    x = tiny_inputs(model)
    ids = x["input_ids"][:1]
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 3


def test_fusion_of_a_run_of_three_and_save_load(tmp_path):
    model = deep("llama", 5)
    b = blocks(model)
    h = torch.randn(2, 4, model.config.hidden_size)
    with torch.no_grad():
        expected = sum(b[i].mlp(b[i].post_attention_layernorm(h)) for i in (1, 2, 3))
    fuse_ffns_(model, FusionConfig(runs=[[1, 2, 3]]))
    with torch.no_grad():
        got = b[1].mlp(b[1].post_attention_layernorm(h))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert [r["layer"] for r in removed_sublayers(model)] == [2, 3]
    x = tiny_inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
    save(model, None, tmp_path / "m")
    loaded, _ = load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, ref)


def test_dependency_matrix_and_auto_runs():
    model = deep("qwen2", 5)
    ids = tiny_inputs(model, batch=2, seq=10)["input_ids"]
    dep = dependency_matrix(model, ids)
    assert dep["layers"] == [0, 1, 2, 3, 4]
    m = dep["matrix"]
    assert all(m[i][j] is None for i in range(5) for j in range(i + 1))  # only i < j is defined
    vals = [m[i][j] for i in range(5) for j in range(i + 1, 5)]
    assert all(0.0 <= v <= 2.0 for v in vals) and max(vals) > 0
    pairs = sorted(dep["pairs"], key=lambda p: p["score"])
    assert auto_runs(dep, 2, 1) == [[pairs[0]["i"], pairs[0]["j"]]]
    runs = auto_runs(dep, 2, 2)
    assert len(runs) == 2 and not set(runs[0]) & set(runs[1])
    rep = fuse_ffns_(model, FusionConfig(runs="auto", max_runs=2), dependency=dep)
    assert rep.runs == runs and all(s is not None for s in rep.run_scores)
    rep2 = fuse_ffns_(deep("qwen2", 5), FusionConfig(runs="auto"), calibration=ids)
    assert rep2.runs == auto_runs(dep, 2, 1)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "opt", "mixtral", "phi"])
def test_other_families_are_a_clear_error(family):
    model = tiny_model(family)
    with pytest.raises(UnsupportedArchitectureError):
        fuse_ffns_(model, FusionConfig(runs=[[0, 1]]))


@pytest.mark.parametrize("runs", [[[0]], [[0, 2]], [[0, 1], [1, 2]], "best"])
def test_bad_runs(runs):
    with pytest.raises(InvalidArgumentError):
        FusionConfig(runs=runs)


def test_failed_fusion_leaves_the_model_as_it_was():
    model = deep("llama", 4)
    x = tiny_inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
    with pytest.raises(LayerIndexError):
        fuse_ffns_(model, FusionConfig(runs=[[0, 1], [3, 4]]))
    fuse_ffns_(model, FusionConfig(runs=[[0, 1]]))
    with pytest.raises(InvalidArgumentError):  # block 1's FFN is gone now
        fuse_ffns_(model, FusionConfig(runs=[[1, 2]]))
    model2 = deep("llama", 4)
    with pytest.raises(InvalidArgumentError):
        fuse_ffns_(model2, FusionConfig(runs="auto"))  # auto needs calibration
    with torch.no_grad():
        assert torch.equal(model2(**x).logits, ref)
    assert removed_sublayers(model2) == [] and not hasattr(model2.config, "ffnkit")


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_set_ffn_weights_with_the_same_weights_changes_nothing(family):
    model = tiny_model(family)
    x = tiny_inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
    ffn = find_ffns(model)[0]
    w = {k: getattr(ffn, k).detach().clone() for k in ("W_in", "W_out", "W_gate")}
    set_ffn_weights_(ffn, w["W_in"], w["W_out"], w["W_gate"])
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)
    with pytest.raises(InvalidArgumentError):
        set_ffn_weights_(ffn, w["W_in"][:, :3], w["W_out"], w["W_gate"])
    wider = copy.deepcopy(w)
    set_ffn_weights_(
        ffn, torch.cat([w["W_in"]] * 2), torch.cat([w["W_out"]] * 2, 1), torch.cat([w["W_gate"]] * 2)
    )
    assert ffn.d_ff == 96 and torch.equal(ffn.W_in[48:], wider["W_in"])


def test_fuse_method_maps_the_ratio_to_runs():
    from unittest import mock

    from ffnkit.compress.registry import METHODS

    fuse = METHODS.get("fuse")
    model = deep("llama", 4)
    ids = tiny_inputs(model, batch=2, seq=8)["input_ids"]
    with (
        mock.patch("ffnkit.data.calibration_batches", return_value=ids),
        mock.patch("ffnkit.data.load_corpus"),
    ):
        rep = fuse(model, fuse.build({"ratio": 0.5, "samples": 2, "seq_len": 8}), tokenizer="tokenizer")
    assert len(rep.runs) == 2 and len(find_ffns(model)) == 2
    with pytest.raises(InvalidArgumentError):
        fuse(deep("llama", 4), fuse.build({"ratio": 0.05}))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_failure_after_widening_leaves_the_model_as_it_was(family, monkeypatch):
    from ffnkit.core import structure

    model = deep("llama", 4) if family == "llama" else tiny_model(family)
    runs = [[0, 1], [2, 3]] if family == "llama" else [[0, 1]]
    x = tiny_inputs(model)
    with torch.no_grad():
        ref = model(**x).logits
    monkeypatch.setattr(
        structure, "record_structure", lambda m: (_ for _ in ()).throw(RuntimeError("injected"))
    )
    with pytest.raises(RuntimeError, match="injected"):
        fuse_ffns_(model, FusionConfig(runs=runs))
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)
    ffns = find_ffns(model)
    assert [f.d_ff for f in ffns] == [48] * len(ffns) and all(f.W_in.shape == (48, 32) for f in ffns)
    assert removed_sublayers(model) == [] and not hasattr(model.config, "ffnkit")
