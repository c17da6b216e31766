"""Dense → MoE (moefy_) and upcycling: exactness at full activation / init, replay, the errors."""

from __future__ import annotations

import json

import pytest
import torch

from ffnkit import capture, find_ffns, load, save
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.modules.moe import MoEBlock, experts_reference
from ffnkit.moe.convert import MoEfyConfig, moefy_
from ffnkit.moe.upcycle import UpcycleConfig, upcycle_
from tests.tiny_models import F, H, tiny_inputs, tiny_model, tiny_tokenizer

FAMILIES = ["llama", "gpt2", "phi3"]  # gated, non-gated with biases, fused gate-and-up
CALIB = torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(5))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _dense_oracle(ffn_weights, x):
    """The dense FFN from weights read before conversion: W_out (act(W_gate x) * W_in x) (+ biases)."""
    w_in, w_gate, w_out, b_in, b_gate, b_out, act = ffn_weights
    pre = x @ w_in.T + (b_in if b_in is not None else 0)
    if w_gate is None:
        m = act(pre)
    else:
        m = act(x @ w_gate.T + (b_gate if b_gate is not None else 0)) * pre
    return m @ w_out.T + (b_out if b_out is not None else 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("split", ["kmeans", "random", "coact"])
def test_all_experts_active_equals_the_dense_ffn(family, split):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ffn = find_ffns(model)[1]
    x = torch.randn(9, H)
    w = tuple(
        t.detach().clone() if t is not None else None
        for t in (ffn.W_in, ffn.W_gate, ffn.W_out, ffn.b_in, ffn.b_gate, ffn.b_out)
    )
    before = _logits(model, inputs)
    moefy_(model, MoEfyConfig(experts=4, split=split, router="centroid", active=1.0), calibration=CALIB)
    block = model.get_submodule(ffn.name)
    assert isinstance(block, MoEBlock) and block.gate.top_k == 4
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, _dense_oracle((*w, ffn.act_fn), x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_logits(model, inputs), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_half_active_is_a_real_moe_that_differs_and_reports(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    before = _logits(model, inputs)
    report = moefy_(
        model,
        MoEfyConfig(
            experts=4, split="kmeans", router="mlp", active=0.5, shared=8, router_steps=30, router_hidden=4
        ),
        calibration=CALIB,
    )
    ffns = find_ffns(model)
    assert all(f.kind == "moe" and f.num_experts == 4 and f.router.top_k == 2 for f in ffns)
    assert all(f.shared is not None and f.shared.d_ff == 8 for f in ffns)
    assert report.layers[0]["expert_size"] == (F - 8) // 4
    assert report.active_fraction == pytest.approx((8 + 2 * 10) / F)
    assert 0 < report.mass_recall["router"] <= report.mass_recall["oracle"] + 1e-6 <= 1 + 1e-6
    assert report.ffn_flops_per_token_after < report.ffn_flops_per_token_before
    after = _logits(model, inputs)
    assert after.isfinite().all() and not torch.allclose(after, before)
    json.dumps(report.to_dict())
    # the handle recomputes the block exactly (router, weight-1 routing, shared expert, biases)
    x = torch.randn(6, H)
    with torch.no_grad():
        torch.testing.assert_close(ffns[0](x), model.get_submodule(ffns[0].name)(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("granular", [False, True])
def test_upcycling_equals_the_dense_model_at_init(granular):
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    before = _logits(model, inputs)
    report = upcycle_(model, UpcycleConfig(experts=8, top_k=4, granular=granular))
    ffn = find_ffns(model)[0]
    assert ffn.kind == "moe" and ffn.num_experts == 8
    assert ffn.d_ff == (F // 4 if granular else F) and report.active_fraction == (1.0 if granular else 4.0)
    torch.testing.assert_close(_logits(model, inputs), before, atol=1e-5, rtol=1e-5)
    # a real router: tokens go to different experts
    with torch.no_grad():
        _, _, idx = ffn.router.route(torch.randn(64, H))
    assert idx.unique().numel() > 4


def test_converted_model_saves_and_reloads_exactly(tmp_path):
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    moefy_(
        model,
        MoEfyConfig(
            experts=4, split="kmeans", router="mlp", active=0.5, shared=8, zero_experts=1, router_steps=20
        ),
        calibration=CALIB,
    )
    want = _logits(model, inputs)
    save(model, tiny_tokenizer(), tmp_path / "moe")
    again, _ = load(tmp_path / "moe")
    assert torch.equal(_logits(again, inputs), want)
    assert [f.kind for f in find_ffns(again)] == ["moe", "moe"]
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == "ffnkit"


def test_upcycled_gpt2_is_refused_and_nothing_changes():
    model = tiny_model("gpt2")
    with pytest.raises(InvalidArgumentError, match="gated"):
        upcycle_(model, UpcycleConfig(experts=4, top_k=2))
    assert all(f.kind == "mlp" for f in find_ffns(model))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"experts": 5}, "divide"),
        ({"experts": 4, "shared": 6}, "divide"),
        ({"active": 0.0}, r"\(0, 1\]"),
        ({"active": 1.5}, r"\(0, 1\]"),
        ({"experts": 4, "top_k": 5}, "top_k"),
        ({"split": "spectral"}, "kmeans"),
        ({"router": "hash"}, "centroid"),
        ({"active": 0.5, "top_k": 2}, "not both"),
        ({"refit_ridge": 0.0}, "refit_ridge"),
    ],
)
def test_bad_configs_are_one_line_errors_and_change_nothing(fields, match):
    model = tiny_model("llama")
    before = [f.W_in.clone() for f in find_ffns(model)]
    with pytest.raises(InvalidArgumentError, match=match) as err:
        moefy_(model, MoEfyConfig(**{"router": "centroid", **fields}))
    assert "\n" not in str(err.value)
    assert all(
        f.kind == "gated" and torch.equal(f.W_in, b) for f, b in zip(find_ffns(model), before, strict=True)
    )


def test_converting_an_moe_model_is_refused():
    model = tiny_model("mixtral")
    with pytest.raises(InvalidArgumentError, match="already mixtures of experts"):
        moefy_(model, MoEfyConfig(experts=4, router="centroid"))
    with pytest.raises(InvalidArgumentError, match="already mixtures of experts"):
        upcycle_(model, UpcycleConfig(experts=4))


def test_bad_upcycle_configs():
    with pytest.raises(InvalidArgumentError, match="divid"):
        UpcycleConfig(experts=6, top_k=4, granular=True)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        UpcycleConfig(experts=2, top_k=3)


def test_reference_loop_against_an_independent_dense_sum():
    """experts_reference == Σ_k w_k · expert_k(x) written out token by token."""
    g = torch.Generator().manual_seed(0)
    E, f, d, T, k = 5, 6, 8, 11, 2  # noqa: N806
    gu, down = torch.randn(E, 2 * f, d, generator=g), torch.randn(E, d, f, generator=g)
    x, w = torch.randn(T, d, generator=g), torch.rand(T, k, generator=g)
    idx = torch.randint(0, E + 1, (T, k), generator=g)  # index E contributes nothing
    want = torch.zeros(T, d)
    for t in range(T):
        for j in range(k):
            e = int(idx[t, j])
            if e < E:
                h = gu[e] @ x[t]
                want[t] += w[t, j] * (down[e] @ (torch.nn.functional.silu(h[:f]) * h[f:]))
    torch.testing.assert_close(experts_reference(x, gu, down, idx, w), want, atol=1e-5, rtol=1e-5)


def test_global_allocation_keeps_the_average_and_differs_per_layer():
    from ffnkit.moe.convert import global_top_k, plan_moefy

    model = tiny_model("llama")
    cfg = MoEfyConfig(
        experts=8,
        split="kmeans",
        router="mlp",
        router_target="mass",
        active=0.5,
        allocation="global",
        router_steps=30,
        router_hidden=4,
    )
    plan = plan_moefy(model, cfg, calibration=CALIB)
    ffns = find_ffns(model)
    ks = global_top_k(ffns, plan, cfg)
    assert sum(ks.values()) == 8  # the same neurons as top-4 in both layers
    assert all(1 <= k <= 8 for k in ks.values())
    # more recall per extra expert in a layer gets it the expert first: an oracle check on the plan
    report = moefy_(model, cfg, plan=plan)
    assert [row["top_k"] for row in report.layers] == [ks[0], ks[1]]
    assert report.active_fraction == pytest.approx(0.5)
    with pytest.raises(InvalidArgumentError, match="not top_k"):
        MoEfyConfig(experts=8, top_k=2, allocation="global")


def _block_error(**fields) -> torch.Tensor:
    """Output error [n, d] of layer 0's converted block on the calibration tokens it was made from
    (oracle: the dense FFN's output captured before conversion)."""
    model = tiny_model("llama")
    ffn = find_ffns(model)[0]
    with torch.no_grad(), capture(model, sites=["in", "out"], layers=[0]) as cap:
        model(input_ids=CALIB)
    x, y = cap["in", 0], cap["out", 0]
    report = moefy_(model, MoEfyConfig(experts=4, split="coact", layers=[0], **fields), calibration=CALIB)
    assert report.layers[0]["refit"] is fields.get("refit", True)
    with torch.no_grad():
        return model.get_submodule(ffn.name)(x) - y


def test_output_bias_compensation_lowers_the_mean_error():
    errs = {
        c: _block_error(router="centroid", active=0.25, compensate=c, refit=False).mean(0).norm().item()
        for c in (False, True)
    }
    assert errs[True] < 0.5 * errs[False]


def _squared_error(refit: bool, compensate: bool = True) -> float:
    err = _block_error(router="mlp", active=0.5, compensate=compensate, refit=refit)
    return float((err**2).sum())


def test_refit_fits_the_calibration_output_better_than_bias_compensation():
    """Least squares with the routing in the loop, shrunk towards the dense weights: at the dense weights
    with the compensated bias its objective equals compensation's error, so its error cannot exceed it;
    both beat the plain conversion."""
    plain, compensated, refit = _squared_error(False, False), _squared_error(False), _squared_error(True)
    assert refit <= compensated * (1 + 1e-6)
    assert refit < 0.9 * plain


def test_refit_with_every_expert_chosen_returns_the_dense_weights():
    """With top-k = E every neuron is kept for every token, so the fit reproduces the dense FFN."""
    model = tiny_model("llama")
    ffn = find_ffns(model)[0]
    x = torch.randn(9, H)
    w = tuple(
        t.detach().clone() if t is not None else None
        for t in (ffn.W_in, ffn.W_gate, ffn.W_out, ffn.b_in, ffn.b_gate, ffn.b_out)
    )
    report = moefy_(model, MoEfyConfig(experts=4, router="mlp", split="coact", active=1.0), calibration=CALIB)
    assert all(row["refit"] for row in report.layers)
    with torch.no_grad():
        got = model.get_submodule(ffn.name)(x)
    torch.testing.assert_close(got, _dense_oracle((*w, ffn.act_fn), x), atol=1e-5, rtol=1e-4)
