"""Vocabulary projection and neuron search on every family with an unembedding."""

from __future__ import annotations

import pytest
import torch

from ffnkit import find_ffns
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError
from ffnkit.inspect.lens import Lens
from ffnkit.inspect.vocab import project_neurons, search_neurons, topk_streaming, units_of
from tests.tiny_models import FAMILIES, H, V, tiny_model

NO_HEAD = {"bert", "roberta"}  # encoder-only: no unembedding
PROJECTED = [f for f in FAMILIES if f not in NO_HEAD]


class FakeTokenizer:
    """Words 'w<i>' are token i; a leading space maps to the same token (enough for the search rule)."""

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [int(text.strip()[1:])]}

    def decode(self, ids):
        return f"w{ids[0]}"

    def __len__(self):
        return V


@pytest.fixture(scope="module", params=PROJECTED)
def model(request):
    return tiny_model(request.param)


def _brute(model, use_gain):
    """Full E @ direction(W_out) per unit, no streaming: [n, V] per (layer, expert)."""
    lens = Lens.of(model)
    out = {}
    for unit in units_of(find_ffns(model)):
        out[(unit.layer, unit.expert)] = (lens.E.float() @ lens.direction(unit.W_out, use_gain=use_gain)).T
    return out


@pytest.mark.parametrize("use_gain", [True, False])
def test_streaming_projection_equals_full_product(model, use_gain):
    """Chunks of 7 neurons × 10 vocabulary rows give the same top/bottom-k as one full product."""
    k = 5
    proj = project_neurons(model, top_k=k, use_gain=use_gain, chunk_size=7, vocab_chunk=10)
    brute = _brute(model, use_gain)
    assert {(u.layer, u.expert) for u in proj.units} == set(brute)
    for u in proj.units:
        full = brute[(u.layer, u.expert)]  # [n, V]
        top = full.topk(k, dim=-1)
        bottom = full.topk(k, dim=-1, largest=False)
        assert torch.allclose(u.top_logits, top.values, atol=1e-5)
        assert torch.allclose(u.bottom_logits, bottom.values, atol=1e-5)
        # ids agree wherever values are not tied
        assert torch.allclose(full.gather(1, u.top_ids), top.values, atol=1e-5)
        assert torch.allclose(full.gather(1, u.bottom_ids), bottom.values, atol=1e-5)


def test_raw_basis_is_E_times_v(model):
    """use_gain=False is Geva's r_i = E v_i, literally."""
    unit = units_of(find_ffns(model))[0]
    r = Lens.of(model).E.float() @ unit.W_out[:, 3].float()
    experts = None if unit.expert is None else [unit.expert]
    proj = project_neurons(model, layers=[unit.layer], neurons=[3], top_k=4, use_gain=False, experts=experts)
    assert torch.allclose(proj.units[0].top_logits[0], r.topk(4).values, atol=1e-5)
    assert "E v_i" in proj.basis


def test_gain_matches_the_norm_module(model):
    """g read from the module (Gemma: 1 + w) is what the final norm multiplies by: for a zero-mean,
    unit-RMS x, norm(x) − norm(−x) = 2 g ⊙ x."""
    lens = Lens.of(model)
    x = torch.ones(H)
    x[1::2] = -1.0  # mean 0, RMS 1, std 1
    diff = (lens.normed(x) - lens.normed(-x)) / lens.scale
    assert torch.allclose(diff, 2 * lens.gain * x, atol=1e-3)


def test_moe_layers_project_per_expert():
    model = tiny_model("qwen2_moe")
    proj = project_neurons(model, layers=[0], top_k=3)
    experts = [u.expert for u in proj.units]
    assert experts == [0, 1, 2, 3, "shared"]
    rows = list(proj.rows())
    assert rows[0]["expert"] == 0 and rows[-1]["expert"] == "shared"
    with pytest.raises(LayerIndexError):
        project_neurons(model, layers=[0], experts=[4])


@pytest.mark.parametrize("family", sorted(NO_HEAD))
def test_encoder_only_models_have_no_projection(family):
    with pytest.raises(InvalidArgumentError, match="no unembedding"):
        project_neurons(tiny_model(family), layers=[0])


def test_out_of_range_errors():
    model = tiny_model("llama")
    with pytest.raises(LayerIndexError):
        project_neurons(model, layers=[5])
    with pytest.raises(LayerIndexError):
        project_neurons(model, layers=[0], neurons=[48])
    with pytest.raises(InvalidArgumentError):
        project_neurons(model, layers=[0], top_k=0)


def test_topk_streaming_merges_vocab_blocks():
    g = torch.Generator().manual_seed(0)
    E, W = torch.randn(101, 8, generator=g), torch.randn(8, 13, generator=g)
    full = (E @ W).T
    tv, ti, bv, bi = topk_streaming(E, W, 4, vocab_chunk=9)
    assert torch.equal(ti, full.topk(4).indices) and torch.equal(bi, full.topk(4, largest=False).indices)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_search_finds_a_planted_neuron(family):
    """A value vector built to promote tokens 10, 11, 12 is the top hit when searching for them."""
    model = tiny_model(family)
    lens = Lens.of(model)
    ffn = find_ffns(model)[1]
    unit = ffn.experts[2] if ffn.kind == "moe" else ffn
    with torch.no_grad():
        planted = lens.E[[10, 11, 12]].float().sum(0) / lens.gain  # g ⊙ v = Σ e_w
        unit.W_out[:, 5] = planted * (unit.W_out[:, 5].norm() / planted.norm())
    res = search_neurons(model, FakeTokenizer(), ["w10", "w11", "w12"], top_n=3, top_k=5)
    best = res.hits[0]
    assert (best["layer"], best["expert"], best["neuron"]) == (1, 2 if ffn.kind == "moe" else None, 5)
    assert len({t["id"] for t in best["promoted"]} & {10, 11, 12}) >= 2
    assert res.hits[0]["score"] >= res.hits[1]["score"]


def test_search_score_is_the_documented_z_score():
    """The closed-form mean/variance equals standardising the full projection over the vocabulary."""
    model = tiny_model("gpt2")
    words = ["w20", "w30"]
    res = search_neurons(model, FakeTokenizer(), words, top_n=5)
    lens = Lens.of(model)
    best = res.hits[0]
    W = find_ffns(model)[best["layer"]].W_out.detach()
    r = lens.E.float() @ lens.direction(W[:, [best["neuron"]]])[:, 0]  # [V]
    z = (r - r.mean()) / r.std(unbiased=False)
    assert abs(best["score"] - float((z[20] + z[30]) / 2)) < 1e-3
    # no neuron of any layer scores higher
    for ffn in find_ffns(model):
        R = lens.E.float() @ lens.direction(ffn.W_out.detach())  # [V, n]
        Z = (R - R.mean(0)) / R.std(0, unbiased=False)
        assert float(((Z[20] + Z[30]) / 2).max()) <= best["score"] + 1e-3
