"""Sublayer / block removal for real: exactness against the zeroing hooks, parameters, generate, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from ffnkit.compress.sublayers import (
    SublayerConfig,
    finercut_order,
    remove_sublayers_,
    removed_sublayers,
)
from ffnkit.core.archs import find_ffns
from ffnkit.core.blocks import sublayers
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError
from ffnkit.inspect.importance import finercut, remove_sublayers
from ffnkit.io import load, save
from ffnkit.modules.zero import ZeroAttention, ZeroFFN
from tests.tiny_models import DEC, tiny_inputs, tiny_model

SUBLAYER_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "phi3", "phi",
    "gpt2", "gpt_neox", "mixtral", "qwen2_moe", "olmoe", "qwen3_moe",
)  # fmt: skip
BLOCK_FAMILIES = (*SUBLAYER_FAMILIES, "opt")


def deep_llama(layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**DEC, "num_hidden_layers": layers}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.float().eval()


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def gen(model, ids, use_cache=True):
    return model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=use_cache)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe", "opt"])
def test_removing_nothing_changes_nothing(family):
    model = tiny_model(family)
    x = tiny_inputs(model)
    ref = logits(model, x)
    n = sum(p.numel() for p in model.parameters())
    for cfg in (SublayerConfig("shortgpt", ratio=0.0), SublayerConfig("shortgpt", count=0)):
        rep = remove_sublayers_(model, cfg)
        assert rep.removed == [] and rep.num_layers_after == rep.num_layers_before
    if family != "opt":
        assert remove_sublayers_(model, SublayerConfig("finercut", count=0)).removed == []
    assert torch.equal(logits(model, x), ref)
    assert sum(p.numel() for p in model.parameters()) == n
    assert removed_sublayers(model) == []


@pytest.mark.parametrize("family", SUBLAYER_FAMILIES)
def test_removal_is_real_and_equals_zeroing_hooks(family):
    model = tiny_model(family)
    hooked = copy.deepcopy(model)
    x = tiny_inputs(model)
    cands = {c.name: c for c in sublayers(hooked)}
    with remove_sublayers(hooked, [cands["layers.0.attn"], cands["layers.1.ffn"]]):
        expected = logits(hooked, x)
    n_before = sum(p.numel() for p in model.parameters())
    rep = remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0.attn", "layers.1.ffn"]))
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)
    n_after = sum(p.numel() for p in model.parameters())
    removed_params = sum(r["parameters"] for r in rep.removed)
    assert removed_params > 0 and n_before - n_after == removed_params
    assert rep.parameters_after["total"] == n_after
    assert len(find_ffns(model)) == 1  # the removed FFN is gone from the handles
    kinds = sorted(type(m).__name__ for m in model.modules() if isinstance(m, ZeroAttention | ZeroFFN))
    assert kinds == ["ZeroAttention", "ZeroFFN"]
    # generate runs, and the KV cache bookkeeping is right with layer 0's attention gone
    ids = x["input_ids"][:1]
    assert torch.equal(gen(model, ids), gen(model, ids, use_cache=False))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2_moe", "phi3"])
def test_save_load_after_sublayer_removal(family, tmp_path):
    model = tiny_model(family)
    x = tiny_inputs(model)
    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.1.attn", "layers.0.ffn"]))
    ref = logits(model, x)
    save(model, None, tmp_path / "m")
    loaded, _ = load(tmp_path / "m")
    assert torch.equal(logits(loaded, x), ref)
    assert [r["path"] for r in removed_sublayers(loaded)] == [r["path"] for r in removed_sublayers(model)]


@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_block_deletion_equals_skipping_the_block(family, tmp_path):
    model = tiny_model(family)
    x = tiny_inputs(model)
    hooked = copy.deepcopy(model)
    block = [m for m in hooked.modules() if isinstance(m, torch.nn.ModuleList)][0][1]

    def skip(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = block.register_forward_hook(skip, with_kwargs=True)
    expected = logits(hooked, x)
    handle.remove()
    n_before = sum(p.numel() for p in model.parameters())
    rep = remove_sublayers_(model, SublayerConfig("manual", remove=["layers.1"]))
    assert rep.num_layers_after == 1 and model.config.num_hidden_layers == 1
    assert sum(p.numel() for p in model.parameters()) < n_before
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)
    ids = x["input_ids"][:1]
    assert torch.equal(gen(model, ids), gen(model, ids, use_cache=False))
    save(model, None, tmp_path / "m")
    loaded, _ = load(tmp_path / "m")
    assert torch.equal(logits(loaded, x), logits(model, x))
    # a smaller standard architecture: plain transformers loads it too
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(plain, x), logits(model, x))


def test_deleting_blocks_renumbers_kv_slots_and_keeps_earlier_removals(tmp_path):
    model = deep_llama(5)
    x = tiny_inputs(model)
    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.3.attn", "layers.4.ffn"]))
    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0", "layers.2"]))
    assert model.config.num_hidden_layers == 3
    idx = [b.self_attn.layer_idx for b in model.model.layers]
    assert idx == [0, 1, 2]
    assert sorted((r["kind"], r["layer"]) for r in removed_sublayers(model)) == [("attn", 1), ("ffn", 2)]
    ids = x["input_ids"][:1]
    assert torch.equal(gen(model, ids), gen(model, ids, use_cache=False))
    save(model, None, tmp_path / "m")
    loaded, _ = load(tmp_path / "m")
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_finercut_order_matches_inspect_importance():
    model = deep_llama(3)
    ids = tiny_inputs(model, batch=2, seq=12)["input_ids"]
    ours = finercut_order(model, ids, kind="all", steps=3)
    theirs = finercut(model, ids, steps=3)
    assert ours["suffix_reuse"]  # the shortcut (trial forwards from the candidate's block) was used
    assert [r["name"] for r in ours["order"]] == [r["name"] for r in theirs.order]
    for a, b in zip(ours["order"], theirs.order, strict=True):
        assert a["js"] == pytest.approx(b["js"], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "qwen2_moe"])
def test_finercut_shortcut_or_fallback_gives_the_same_order(family):
    model = tiny_model(family)
    ids = tiny_inputs(model, batch=2, seq=9)["input_ids"]
    ours = finercut_order(model, ids, kind="all", steps=2)
    theirs = finercut(model, ids, steps=2)
    assert [r["name"] for r in ours["order"]] == [r["name"] for r in theirs.order]


def test_finercut_ffn_ratio_removes_that_share_of_ffn_parameters():
    model = deep_llama(4)
    x = tiny_inputs(model)
    ids = tiny_inputs(model, batch=2, seq=12)["input_ids"]
    ref_order = finercut_order(copy.deepcopy(model), ids, kind="ffn", ffn_target=2)
    rep = remove_sublayers_(model, SublayerConfig("finercut", ratio=0.5, kind="ffn"), calibration=ids)
    assert [r["kind"] for r in rep.removed] == ["ffn", "ffn"]
    assert [r["name"] for r in rep.removed] == [r["name"] for r in ref_order["order"]]
    assert rep.ffn_ratio_removed == pytest.approx(0.5)
    assert all(r["score"] is not None and r["score"] >= 0 for r in rep.removed)
    assert torch.isfinite(logits(model, x)).all()


def test_finercut_all_counts_ffn_share_and_takes_attention_on_the_way():
    model = deep_llama(4)
    ids = tiny_inputs(model, batch=2, seq=12)["input_ids"]
    order = finercut_order(copy.deepcopy(model), ids, kind="all", ffn_target=1)
    rep = remove_sublayers_(model, SublayerConfig("finercut", ratio=0.25), order=order)
    assert sum(r["kind"] == "ffn" for r in rep.removed) == 1
    assert rep.removed[-1]["kind"] == "ffn"  # the order stops at the FFN that reaches the share
    assert len(rep.removed) == len(order["order"])


def test_shortgpt_deletes_lowest_bi_blocks():
    model = deep_llama(4)
    ids = tiny_inputs(model, batch=2, seq=12)["input_ids"]
    rep = remove_sublayers_(model, SublayerConfig("shortgpt", ratio=0.5), calibration=ids)
    ranking = rep.scores["ranking"]
    assert sorted(r["layer"] for r in rep.removed) == sorted(ranking[:2])
    assert rep.num_layers_after == 2 and len(model.model.layers) == 2
    assert rep.ffn_ratio_removed == pytest.approx(0.5)
    model2 = deep_llama(4)
    rep2 = remove_sublayers_(model2, SublayerConfig("shortgpt", count=1, kind="ffn"), calibration=ids)
    assert rep2.removed[0]["kind"] == "ffn" and rep2.removed[0]["layer"] == ranking[0]
    assert rep2.num_layers_after == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "finercut", "ratio": 1.0},
        {"method": "finercut", "ratio": -0.1},
        {"method": "finercut", "ratio": 0.2, "count": 2},
        {"method": "finercut"},
        {"method": "prune"},
        {"method": "finercut", "ratio": 0.2, "kind": "mlp"},
        {"method": "manual"},
        {"method": "shortgpt", "count": -1},
        {"method": "shortgpt", "count": 1.5},
    ],
)
def test_bad_configs(kwargs):
    with pytest.raises(InvalidArgumentError):
        SublayerConfig(**kwargs)


def test_bad_removals_leave_the_model_as_it_was():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    ref = logits(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayerIndexError):
        remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0.attn", "layers.9.ffn"]))
    with pytest.raises(InvalidArgumentError):
        remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0.mlp"]))
    with pytest.raises(InvalidArgumentError):  # every FFN
        remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0.ffn", "layers.1.ffn"]))
    with pytest.raises(InvalidArgumentError):  # every block
        remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0", "layers.1"]))
    with pytest.raises(InvalidArgumentError):  # ratio that removes every FFN
        remove_sublayers_(model, SublayerConfig("shortgpt", count=2))
    assert removed_sublayers(model) == [] and model.config.num_hidden_layers == 2
    assert torch.equal(logits(model, x), ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0.attn"]))
    with pytest.raises(InvalidArgumentError):  # twice
        remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0.attn"]))


def test_ffn_inside_the_block_is_a_clear_error():
    model = tiny_model("opt")
    with pytest.raises(InvalidArgumentError, match="whole blocks"):
        remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0.ffn"]))


def test_registry_methods_follow_the_ratio():
    from ffnkit.compress.registry import METHODS
    from tests.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    given = {"ratio": 0.5, "samples": 2, "seq_len": 8, "corpus": "shakespeare"}
    finercut, shortgpt = METHODS.get("finercut"), METHODS.get("shortgpt")
    model = deep_llama(4)
    from unittest import mock

    ids = tiny_inputs(model, batch=2, seq=8)["input_ids"]
    with mock.patch("ffnkit.compress.sublayers._calibration", return_value=ids):
        rep = finercut(model, finercut.build(given), tokenizer=tok)
        assert rep.ffn_ratio_removed == pytest.approx(0.5) and len(find_ffns(model)) == 2
        rep = shortgpt(deep_llama(4), shortgpt.build(given), tokenizer=tok)
        assert rep.num_layers_after == 2


def test_finercut_resume_continues_the_same_greedy_order():
    model = deep_llama(3)
    ids = tiny_inputs(model, batch=2, seq=10)["input_ids"]
    full = finercut_order(model, ids, kind="all", steps=4)
    part = finercut_order(model, ids, kind="all", steps=2)
    resumed = finercut_order(model, ids, kind="all", steps=4, resume=part)
    assert [r["name"] for r in resumed["order"]] == [r["name"] for r in full["order"]]


@pytest.mark.parametrize("target", ["record_change", "removed_sublayers"])
def test_failure_while_recording_undoes_the_removal(target, monkeypatch):
    """A failure after the modules are swapped (recording the change) puts every module back."""
    from ffnkit.compress import sublayer_removal
    from ffnkit.core import structure

    model = deep_llama(4)
    x = tiny_inputs(model)
    ref = logits(model, x)
    before = [type(m).__name__ for m in model.modules()]
    idx = [m.self_attn.layer_idx for m in model.model.layers]
    owner = structure if target == "record_change" else sublayer_removal
    monkeypatch.setattr(owner, target, lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
    remove = ["layers.1.attn", "layers.2.ffn"] if target == "record_change" else ["layers.1"]
    with pytest.raises(RuntimeError, match="injected"):
        remove_sublayers_(model, SublayerConfig("manual", remove=remove))
    assert [type(m).__name__ for m in model.modules()] == before
    assert [m.self_attn.layer_idx for m in model.model.layers] == idx == [0, 1, 2, 3]
    assert model.config.num_hidden_layers == 4 and not hasattr(model.config, "ffnkit")
    assert torch.equal(logits(model, x), ref)
