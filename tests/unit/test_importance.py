"""FinerCut (greedy sublayer removal by JS divergence) and ShortGPT block influence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ffnkit import find_ffns
from ffnkit.core.blocks import blocks, sublayers
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.inspect.importance import (
    block_influence,
    finercut,
    js_divergence,
    plot_importance,
    remove_sublayers,
)
from tests.tiny_models import L, V, tiny_model

LMS = ["llama", "gpt2", "opt", "phi3", "gpt_neox", "mixtral", "qwen2_moe"]


def _ids(n: int = 3, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _hooks(model) -> int:
    """Forward hooks in place (transformers adds its own for output_hidden_states: compare counts)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_js_divergence_by_hand():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.1, 0.3, 0.6])
    m = (p + q) / 2
    want = 0.5 * sum(a * math.log(a / c) for a, c in zip(p.tolist(), m.tolist(), strict=True)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q.tolist(), m.tolist(), strict=True)
    )
    got = js_divergence(p.log(), q.log())
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(js_divergence(p.log(), p.log())) == pytest.approx(0.0, abs=1e-7)
    disjoint = js_divergence(torch.tensor([0.0, -1e9]), torch.tensor([-1e9, 0.0]))
    assert float(disjoint) == pytest.approx(math.log(2), rel=1e-5)  # the maximum, ln 2


@pytest.mark.parametrize("family", LMS)
def test_finercut_order_covers_every_candidate_and_is_reversible(family, tmp_path):
    model = tiny_model(family)
    ids = _ids()
    before, hooks = _logits(model, ids), _hooks(model)
    res = finercut(model, ids, batch_size=2)
    assert res.js_nothing_removed == pytest.approx(0.0, abs=1e-7)
    names = [r["name"] for r in res.order]
    assert sorted(names) == sorted(s.name for s in sublayers(model))
    assert len(names) == len(set(names)) == 2 * L
    assert [r["step"] for r in res.order] == list(range(1, 2 * L + 1))
    assert all(r["js"] >= 0 for r in res.order)
    # removing everything leaves embeddings → final norm → head: far from the full model
    assert res.order[-1]["js"] > res.js_nothing_removed
    assert _hooks(model) == hooks
    torch.testing.assert_close(_logits(model, ids), before, atol=0, rtol=0)
    assert plot_importance(res, tmp_path / "fc.png").stat().st_size > 0


def test_finercut_greedy_first_step_is_the_least_harmful_single_removal():
    model = tiny_model("llama")
    ids = _ids()
    ref = F.log_softmax(_logits(model, ids), -1)
    single = {}
    for s in sublayers(model):
        with remove_sublayers(model, [s]):
            single[s.name] = float(js_divergence(ref, F.log_softmax(_logits(model, ids), -1)).mean())
    res = finercut(model, ids, steps=1)
    assert res.order[0]["name"] == min(single, key=single.get)
    assert res.order[0]["js"] == pytest.approx(single[res.order[0]["name"]], rel=1e-6)
    assert len(res.order) == 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3", "gpt_neox"])
def test_zeroing_ffn_equals_zeroing_w_out_in_a_copy(family):
    model = tiny_model(family)
    ids = _ids()
    hooks = _hooks(model)
    cands = [s for s in sublayers(model) if s.kind == "ffn" and s.layer == 0]
    with remove_sublayers(model, cands):
        hooked = _logits(model, ids)
    twin = copy.deepcopy(model)
    ffn = find_ffns(twin)[0]
    with torch.no_grad():
        ffn.W_out.zero_()
        if ffn.b_out is not None:
            ffn.b_out.zero_()
    torch.testing.assert_close(hooked, _logits(twin, ids), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(hooked, _logits(model, ids))  # it did change something
    assert _hooks(model) == hooks


def test_zeroing_attention_equals_zeroing_o_proj_in_a_copy():
    model = tiny_model("llama")
    ids = _ids()
    cands = [s for s in sublayers(model) if s.kind == "attn" and s.layer == 1]
    with remove_sublayers(model, cands):
        hooked = _logits(model, ids)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[1].self_attn.o_proj.weight.zero_()
    torch.testing.assert_close(hooked, _logits(twin, ids), atol=1e-6, rtol=1e-5)


def test_hooks_removed_after_an_error():
    model = tiny_model("llama")
    hooks = _hooks(model)
    with pytest.raises(RuntimeError), remove_sublayers(model, sublayers(model)):
        assert _hooks(model) == hooks + 2 * L
        raise RuntimeError("boom")
    assert _hooks(model) == hooks


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3", "mixtral", "bert"])
def test_block_influence_matches_hidden_states(family, tmp_path):
    model = tiny_model(family)
    ids = _ids(4, 9)
    hooks = _hooks(model)
    res = block_influence(model, ids, batch_size=3)
    assert _hooks(model) == hooks
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # L + 1 entries
    assert [r["layer"] for r in res.layers] == list(range(L))
    # hidden_states[l] is block l's input; the last entry has the final norm applied (decoder models),
    # so the hand computation covers every block but the last
    for layer in range(L - 1):
        cos = F.cosine_similarity(hs[layer].double(), hs[layer + 1].double(), dim=-1)
        assert res.layers[layer]["bi"] == pytest.approx(1 - float(cos.mean()), abs=1e-6)
    assert sorted(res.ranking) == list(range(L))
    bis = [r["bi"] for r in res.layers]
    assert [bis[i] for i in res.ranking] == sorted(bis)
    assert plot_importance(res, tmp_path / "bi.png").stat().st_size > 0


def test_block_paths():
    assert [b.name for b in blocks(tiny_model("llama"))] == ["model.layers.0", "model.layers.1"]
    assert [b.name for b in blocks(tiny_model("opt"))] == ["model.decoder.layers.0", "model.decoder.layers.1"]
    assert [b.attn_name for b in blocks(tiny_model("gpt2"))] == [
        "transformer.h.0.attn",
        "transformer.h.1.attn",
    ]


def test_not_applicable_models_fail_clearly():
    with pytest.raises(InvalidArgumentError, match="encoder-decoder"):
        finercut(tiny_model("t5"), _ids())
    with pytest.raises(InvalidArgumentError, match="language-modelling head"):
        finercut(tiny_model("bert"), _ids())
    with pytest.raises(InvalidArgumentError, match="steps"):
        finercut(tiny_model("llama"), _ids(), steps=99)
