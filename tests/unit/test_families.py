"""The family matrix: every supported architecture, found and recomputed exactly from canonical weights."""

from __future__ import annotations

import pytest
import torch

from ffnkit import capture, find_ffns
from tests.tiny_models import EXPECTED_FFNS, FAMILIES, F, H, tiny_inputs, tiny_model

ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


def test_find_ffns_shapes(family_model):
    family, model = family_model
    ffns = find_ffns(model)
    assert len(ffns) == EXPECTED_FFNS[family]
    assert [f.index for f in ffns] == list(range(len(ffns)))
    for ffn in ffns:
        assert ffn.d_model == H
        if ffn.kind == "moe":
            assert ffn.num_experts == 4 and ffn.router.weight.shape == (4, H)
            for expert in ffn.experts:
                assert expert.W_in.shape == (ffn.d_ff, H) and expert.W_out.shape == (H, ffn.d_ff)
            continue
        assert ffn.d_ff == F
        assert ffn.W_in.shape == (F, H)
        assert ffn.W_out.shape == (H, F)
        if ffn.kind == "gated":
            assert ffn.W_gate.shape == (F, H)
        else:
            assert ffn.W_gate is None


def test_recompute_from_canonical_weights(family_model):
    family, model = family_model
    ffns = find_ffns(model)
    with torch.no_grad(), capture(model, sites=["in", "out"]) as cap:
        model(**tiny_inputs(model))
    for ffn in ffns:
        x, y = cap["in", ffn.index], cap["out", ffn.index]
        assert x.shape[-1] == H and y.shape == x.shape
        err = (ffn(x) - y).abs().max().item()
        assert err < ATOL, f"{family} layer {ffn.index}: {err}"


def test_sub_updates_sum_to_output(family_model):
    """Σ_i m_i · W_out[:, i] (+ b_out) = out, and the captured pre/gate/post match the handle's own."""
    family, model = family_model
    ffns = [f for f in find_ffns(model) if f.kind != "moe"]
    if not ffns:
        pytest.skip("every FFN of this model is a mixture of experts")
    sites = ["in", "pre", "post", "out"] + (["gate"] if ffns[0].kind == "gated" else [])
    with (
        torch.no_grad(),
        capture(model, sites=sites, ffns=find_ffns(model), layers=[f.index for f in ffns]) as cap,
    ):
        model(**tiny_inputs(model))
    for ffn in ffns:
        m, y = cap["post", ffn.index], cap["out", ffn.index]
        recon = torch.einsum("ti,di->td", m, ffn.W_out)  # Σ_i m_i v_i
        if ffn.b_out is not None:
            recon = recon + ffn.b_out
        assert (recon - y).abs().max().item() < ATOL
        mine = ffn.activations(cap["in", ffn.index])
        for site in sites[1:]:
            assert (mine[site] - cap[site, ffn.index]).abs().max().item() < ATOL, (family, site)


def test_moe_router_capture():
    model = tiny_model("mixtral")
    ffn = find_ffns(model)[0]
    with torch.no_grad(), capture(model, sites=["in", "router"], layers=[0]) as cap:
        model(**tiny_inputs(model))
    logits = cap["router", 0]
    assert logits.shape == (14, 4)
    assert torch.allclose(logits, cap["in", 0] @ ffn.router.weight.T, atol=ATOL)


def test_views_edit_the_model():
    """Handles are views: zeroing a value vector in place changes what the model computes."""
    model = tiny_model("gpt2")
    ffn = find_ffns(model)[1]
    inputs = tiny_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits
        ffn.W_out[:, 5].zero_()  # Conv1D stores [in, out]: the view must hit the right entries
        assert torch.all(model.transformer.h[1].mlp.c_proj.weight[5] == 0)
        after = model(**inputs).logits
    assert not torch.allclose(before, after)
