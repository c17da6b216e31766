"""prune_: zero ratio is the identity, pruning really shrinks, FLAP's compensation is exact, errors are clear."""

from __future__ import annotations

import json

import pytest
import torch

from ffnkit import find_ffns
from ffnkit.compress import PruneConfig, allocate, prune_
from ffnkit.compress.prune import METHODS
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.evaluate import count_parameters
from tests.tiny_models import FAMILIES, V, tiny_inputs, tiny_model

CALIB = torch.randint(3, V, (4, 16), generator=torch.Generator().manual_seed(5))
LM_FAMILIES = [f for f in FAMILIES if f not in ("bert", "roberta")]


def _out(model, inputs):
    with torch.no_grad():
        o = model(**inputs)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
def test_zero_ratio_changes_nothing(family, method):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    report = prune_(model, PruneConfig(method, 0.0), calibration=CALIB)
    assert torch.equal(_out(model, inputs), ref)
    assert report.parameters_after["ffn"] == report.parameters_before["ffn"]
    assert all(r["d_ff_after"] == r["d_ff_before"] for r in report.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_shrinks_every_family(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    before = count_parameters(model, find_ffns(model))
    report = prune_(model, PruneConfig("wanda-sp", 0.3), calibration=CALIB)
    after = count_parameters(model, find_ffns(model))
    assert after["total"] < before["total"] and after["ffn"] == report.parameters_after["ffn"]
    assert 0.2 < report.ffn_ratio_removed < 0.4, report.ffn_ratio_removed
    assert all(r["d_ff_after"] < r["d_ff_before"] for r in report.layers)
    assert _out(model, inputs).isfinite().all()
    json.dumps(report.to_dict())  # JSON-ready


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocation", ["uniform", "global", "sensitivity"])
def test_methods_and_allocations_hit_the_ratio(method, allocation):
    model = tiny_model("llama")
    cfg = PruneConfig(method, 0.4, allocation=allocation, sensitivity_samples=2, protect_min=0.1)
    report = prune_(model, cfg, calibration=CALIB)
    assert abs(report.ffn_ratio_removed - 0.4) < 0.05
    assert all(r["d_ff_after"] >= 5 for r in report.layers)  # protect_min 0.1 of 48
    assert _out(model, tiny_inputs(model)).isfinite().all()
    if allocation == "sensitivity":
        assert set(report.sensitivity["kl"]) == {"0", "1"}


def test_flap_bias_compensation_is_exact_for_constant_neurons():
    """Neurons whose m is constant (W_in row zero, so m = act(b_in)) are pruned first by FLAP
    (Var = 0) and their contribution W_out[:, P]·E[m_P] moves exactly into b_out."""
    model = tiny_model("opt")
    inputs = tiny_inputs(model)
    n_const = 16  # of 48
    with torch.no_grad():
        for f in find_ffns(model):
            f.W_in[:n_const] = 0.0
            f.b_in[:n_const] = torch.linspace(0.5, 2.0, n_const)  # ReLU(b) > 0: a nonzero constant
    ref = _out(model, inputs)
    report = prune_(model, PruneConfig("flap", 0.32), calibration=CALIB)
    assert [r["d_ff_after"] for r in report.layers] == [48 - 16, 48 - 16]
    assert report.bias_compensated == [0, 1]
    assert torch.allclose(_out(model, inputs), ref, atol=1e-4)
    # without compensation the same pruning changes the output
    model2 = tiny_model("opt")
    with torch.no_grad():
        for f in find_ffns(model2):
            f.W_in[:n_const] = 0.0
            f.b_in[:n_const] = torch.linspace(0.5, 2.0, n_const)
    prune_(model2, PruneConfig("flap", 0.32, bias_compensation=False), calibration=CALIB)
    assert not torch.allclose(_out(model2, inputs), ref, atol=1e-3)


def test_bias_compensation_adds_bias_where_none():
    model = tiny_model("llama")
    assert find_ffns(model)[0].b_out is None
    prune_(model, PruneConfig("flap", 0.3), calibration=CALIB)
    ffn = find_ffns(model)[0]
    assert ffn.b_out is not None and ffn.out_proj.bias is not None
    assert model.config.ffnkit["structure"]["bias_out"] == [True, True]


def test_refit_beats_bias_compensation_on_layer_output():
    """The least-squares refit minimises the calibration error of each FFN's output: lower than bias only."""
    from ffnkit.core.capture import capture

    errs = {}
    ref_model = tiny_model("llama")
    with torch.no_grad(), capture(ref_model, sites=["in", "out"], layers=[0]) as cap:
        ref_model(input_ids=CALIB)
    x, y = cap["in", 0], cap["out", 0]
    for reconstruct in (False, True):
        model = tiny_model("llama")
        prune_(model, PruneConfig("flap", 0.5, reconstruct=reconstruct), calibration=CALIB)
        with torch.no_grad():
            errs[reconstruct] = (find_ffns(model)[0](x) - y).pow(2).mean().item()
    assert errs[True] < errs[False]


def test_moe_experts_are_pruned_and_run():
    model = tiny_model("mixtral")
    report = prune_(model, PruneConfig("flap", 0.5, allocation="global"), calibration=CALIB)
    for f in find_ffns(model):
        assert f.d_ff == 24 - 8 or f.d_ff % 8 == 0  # one width per layer, multiple of 8
        assert all(e.d_ff == f.d_ff for e in f.experts)
    assert report.ffn_ratio_removed > 0.2
    assert _out(model, tiny_inputs(model)).isfinite().all()


@pytest.mark.parametrize("ratio", [1.5, -0.1, 1.0])
def test_ratio_out_of_range(ratio):
    with pytest.raises(InvalidArgumentError, match=r"\[0, 1\)"):
        PruneConfig("flap", ratio)


def test_unknown_method_and_allocation():
    with pytest.raises(InvalidArgumentError, match="wanda-sp"):
        PruneConfig("bogus", 0.3)
    with pytest.raises(InvalidArgumentError, match="sensitivity"):
        PruneConfig("flap", 0.3, allocation="nope")


def test_config_json_round_trip():
    cfg = PruneConfig("lorap", 0.25, allocation="global", samples=8, layers=[0, 1], reconstruct=True)
    again = PruneConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    with pytest.raises(InvalidArgumentError, match="unknown PruneConfig fields"):
        PruneConfig.from_dict({"method": "flap", "colour": 1})


def test_data_methods_need_calibration():
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        prune_(tiny_model("llama"), PruneConfig("wanda-sp", 0.3))
    prune_(tiny_model("llama"), PruneConfig("magnitude", 0.3))  # data-free: fine


def test_global_allocation_prefers_low_z_scores():
    s0 = torch.tensor([0.0] + [10.0] * 9)  # unit 0: one neuron far below the rest (z = -2.85)
    s1 = torch.tensor([0.0] * 9 + [100.0])  # unit 1: nine neurons at z = -0.32
    kept = allocate({(0, None): s0, (1, None): s1}, {(0, None): 1, (1, None): 1}, 9, "global")
    assert kept == {(0, None): 9, (1, None): 2}
    kept = allocate({(0, None): s0, (1, None): s1}, {(0, None): 1, (1, None): 1}, 10, "uniform")
    assert kept == {(0, None): 5, (1, None): 5}


def test_failure_midway_leaves_model_unchanged(monkeypatch):
    from ffnkit.core import transaction

    model = tiny_model("phi3")
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    real, calls = transaction._apply_swap, {"n": 0}

    def flaky(swap):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("injected")
        return real(swap)

    monkeypatch.setattr(transaction, "_apply_swap", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        prune_(model, PruneConfig("flap", 0.3), calibration=CALIB)
    monkeypatch.setattr(transaction, "_apply_swap", real)
    assert torch.equal(_out(model, inputs), ref)
    assert [f.d_ff for f in find_ffns(model)] == [48, 48]


def test_cli_unknown_method_lists_the_available_ones():
    from typer.testing import CliRunner

    from ffnkit.cli.main import app

    result = CliRunner().invoke(app, ["compress", "smollm2-135m", "--method", "bogus", "-o", "x"])
    assert result.exit_code != 0
    assert "wanda-sp" in str(result.exception) and "flap" in str(result.exception)


def test_sensitivity_allocation_stops_at_the_last_measured_ratio():
    from ffnkit.compress.prune import allocate

    a, b = (0, None), (1, None)
    scores = {a: torch.rand(100), b: torch.rand(100)}
    curves = {a: ([0.1, 0.2, 0.3], [0.0, 0.0, 0.0]), b: ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])}
    keep = allocate(scores, {a: 1.0, b: 1.0}, 40.0, "sensitivity", 0.05, curves)
    # layer a costs nothing as far as measured, but is not extrapolated past 30%: b pays the rest
    assert keep == {a: 70, b: 90}
