"""Activation sparsity: sparsify_ on tiny models of several families (rules, thresholds, save/load, hooks)."""

from __future__ import annotations

import copy

import pytest
import torch

from ffnkit.core.archs import find_ffns
from ffnkit.core.capture import capture
from ffnkit.core.errors import InvalidArgumentError, UnsupportedArchitectureError
from ffnkit.modules.sparse_ffn import SparseFFN
from ffnkit.sparsity import SparsityConfig, measure_sparsity, sparsify_
from ffnkit.steering import NeuronEdit, steer
from tests.tiny_models import V, tiny_inputs, tiny_model

FAMILIES = ["llama", "phi3", "gemma", "gpt2"]
GATED = ["llama", "phi3", "gemma"]
RULES = ["teal", "best", "cats", "chess", "stat-topk", "predictor"]


def _ids(seed: int, n: int = 16, t: int = 32) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _config(rule: str, sparsity: float, **kw) -> SparsityConfig:
    small = dict(
        samples=16,
        seq_len=32,
        tokens=512,
        path_tokens=128,
        probe_windows=2,
        predictor_rank=4,
        predictor_steps=30,
    )
    return SparsityConfig(rule, sparsity, **{**small, **kw})


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _rules_for(family: str) -> list[str]:
    return RULES if family in GATED else ["teal", "best", "stat-topk", "predictor"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_zero_changes_nothing(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    before = _logits(model, inputs)
    for rule in _rules_for(family):
        m = copy.deepcopy(model)
        sparsify_(m, _config(rule, 0.0), calibration=_ids(0))
        assert all(isinstance(f.module, SparseFFN) for f in find_ffns(m))
        torch.testing.assert_close(_logits(m, inputs), before, atol=0, rtol=0, msg=rule)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()  # tiny matrices: threads only add overhead on a shared machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_calibration_hits_target_on_heldout_text(family):
    model = tiny_model(family)
    for rule in _rules_for(family):
        for target in (0.25, 0.45):
            m = copy.deepcopy(model)
            result = sparsify_(m, _config(rule, target), calibration=_ids(0), heldout=_ids(1, n=8))
            got = result.measured["bytes_skipped"]
            assert abs(got - target) <= 0.02, (rule, target, got)
            assert abs(result.calibration["bytes_skipped"] - target) <= 1e-3, rule
            per_layer = [row["bytes_skipped"] for row in result.measured["layers"]]
            assert len(per_layer) == 2 and all(0 < b < 1 for b in per_layer)


def _oracle(ffn, x: torch.Tensor, sparse: SparseFFN) -> torch.Tensor:
    """The masked dense FFN from the canonical weights, written from the rules' definitions."""
    x = x.double()
    wg = ffn.W_gate.double() if ffn.W_gate is not None else None
    wu, wd = ffn.W_in.double(), ffn.W_out.double()
    act = ffn.act_fn
    t_in, t_mid = float(sparse.t_in), float(sparse.t_mid)
    c_in, c_mid = sparse.c_in.double(), sparse.c_mid.double()
    if sparse.mode == "input":
        x = x * ((x * c_in).abs() >= t_in)
    u = x @ wu.T
    if ffn.b_in is not None:
        u = u + ffn.b_in.double()
    g = x @ wg.T if wg is not None else None
    a = act(g.float()).double() if g is not None else act(u.float()).double()
    h = a * u if g is not None else a
    if sparse.mode == "input":
        h = h * ((h * c_mid).abs() >= t_mid)
    elif sparse.mode == "gate":
        h = h * (a.abs() * c_mid > t_mid)
    elif sparse.mode == "stat":
        s = a.abs()  # the activation magnitude's per-token statistic
        h = h * (s >= s.mean(-1, keepdim=True) + t_mid * s.std(-1, keepdim=True))
    else:
        score = (x @ sparse.pred_a.double().T) @ sparse.pred_b.double().T + sparse.pred_bias.double()
        h = h * (score > t_mid)
    y = h @ wd.T
    if ffn.b_out is not None:
        y = y + ffn.b_out.double()
    return y


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_module_equals_masked_dense_oracle(family, backend):
    from ffnkit.kernels import use_backend

    model = tiny_model(family)
    for rule in _rules_for(family):
        m = copy.deepcopy(model)
        sparsify_(m, _config(rule, 0.4), calibration=_ids(0))
        ffn = find_ffns(m)[1]
        sparse = ffn.module
        torch.manual_seed(3)
        with torch.no_grad(), use_backend(backend):
            for shape in ([1, 1, 32], [2, 5, 32]):  # one token: the kernels; more: the masked dense path
                x = torch.randn(*shape)
                want = _oracle(ffn, x, sparse).float()
                torch.testing.assert_close(sparse(x), want, atol=2e-4, rtol=1e-4, msg=f"{rule} {shape}")


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_save_load_reproduces_logits(tmp_path, family):
    from ffnkit.io import load, save

    for rule in ["best", "predictor"] + (["cats"] if family in GATED else []):
        model = tiny_model(family)
        result = sparsify_(model, _config(rule, 0.4), calibration=_ids(0))
        inputs = tiny_inputs(model)
        one = {"input_ids": inputs["input_ids"][:1, :1]}  # a decode step: the kernel path
        before, before_one = _logits(model, inputs), _logits(model, one)
        save(model, None, tmp_path / rule, report=result)
        loaded, _ = load(tmp_path / rule)
        assert all(isinstance(f.module, SparseFFN) for f in find_ffns(loaded))
        torch.testing.assert_close(_logits(loaded, inputs), before, atol=0, rtol=0)
        # one token runs the decode kernels: each sparse FFN gives the same bits after the reload (the
        # whole model's logits only to float rounding: its attention takes another path for one token)
        x = torch.randn(1, 1, find_ffns(model)[0].d_model)
        with torch.no_grad():
            for f, g in zip(find_ffns(model), find_ffns(loaded), strict=True):
                torch.testing.assert_close(g.module(x), f.module(x), atol=0, rtol=0)
        torch.testing.assert_close(_logits(loaded, one), before_one, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_capture_sums_back_to_the_output(family):
    model = tiny_model(family)
    sparsify_(model, _config("teal", 0.5), calibration=_ids(0))
    ffn = find_ffns(model)[0]
    inputs = tiny_inputs(model)
    for ids in (inputs["input_ids"], inputs["input_ids"][:1, :1]):  # hooks attached: the exact slow path
        with capture(model, sites=["in", "post", "out"], layers=[0]) as cap, torch.no_grad():
            model(input_ids=ids)
        post, out = cap["post", 0], cap["out", 0]
        assert (post == 0).float().mean() > 0.2  # the selector zeroed neurons
        rebuilt = post @ ffn.W_out.T + (ffn.b_out if ffn.b_out is not None else 0)
        torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ffn.module(cap["in", 0]), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["best", "predictor", "teal", "cats"])
def test_kernel_and_hooked_paths_agree_on_one_token(rule):
    model = tiny_model("llama")
    sparsify_(model, _config(rule, 0.5), calibration=_ids(0))
    ids = tiny_inputs(model)["input_ids"][:1, :1]
    fast = _logits(model, {"input_ids": ids})
    with capture(model, sites=["post"]):
        slow = _logits(model, {"input_ids": ids})
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule", ["predictor", "teal"])
def test_kernel_path_follows_a_threshold_change(rule):
    """The kernel path reads its thresholds once per change of the buffers: a new t_mid takes effect."""
    model = tiny_model("llama")
    sparsify_(model, _config(rule, 0.5), calibration=_ids(0))
    sparse = find_ffns(model)[0].module
    x = torch.randn(1, 1, sparse.d_model)
    with torch.no_grad():
        before = sparse(x)
        sparse.t_mid.fill_(1e6)  # nothing passes
        after = sparse(x)
        slow = sparse.masked_forward(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, slow, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(after) == 0


def test_steer_still_works_on_a_sparse_model():
    model = tiny_model("llama")
    sparsify_(model, _config("cats", 0.4), calibration=_ids(0))
    inputs = tiny_inputs(model)
    before = _logits(model, inputs)
    with steer(model, NeuronEdit(layer=0, neurons=[3], op="scale", value=1.0)):
        torch.testing.assert_close(_logits(model, inputs), before, atol=0, rtol=0)
    with steer(model, NeuronEdit(layer=0, neurons=[3], op="set", value=5.0)):
        with capture(model, sites=["post"], layers=[0]) as cap:
            steered = _logits(model, inputs)
    assert (cap["post", 0][:, 3] == 5.0).all()
    assert not torch.allclose(steered, before)
    torch.testing.assert_close(_logits(model, inputs), before, atol=0, rtol=0)


def test_measure_sparsity_reports_every_layer_and_site():
    model = tiny_model("llama")
    sparsify_(model, _config("teal", 0.5), calibration=_ids(0))
    m = measure_sparsity(model, _ids(5, n=4))
    assert [r["index"] for r in m.layers] == [0, 1]
    assert set(m.layers[0]["zeroed"]) == {"in", "post"}
    w = (2 / 3, 1 / 3)
    for r in m.layers:  # bytes skipped follows from the zeroed shares
        assert r["bytes_skipped"] == pytest.approx(w[0] * r["zeroed"]["in"] + w[1] * r["zeroed"]["post"])
    assert m.to_dict()["tokens"] == 4 * 32


# ----- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, "0.4", float("nan")])
def test_sparsity_outside_range_is_refused(value):
    with pytest.raises(InvalidArgumentError):
        SparsityConfig("teal", value)


def test_unknown_rule_lists_the_rules():
    with pytest.raises(InvalidArgumentError, match="teal"):
        SparsityConfig("nope", 0.4)


def test_cats_needs_a_gate_and_leaves_the_model_alone():
    model = tiny_model("gpt2")
    before = _logits(model, tiny_inputs(model))
    with pytest.raises(InvalidArgumentError, match="has none"):
        sparsify_(model, _config("cats", 0.4), calibration=_ids(0))
    assert not any(isinstance(f.module, SparseFFN) for f in find_ffns(model))
    torch.testing.assert_close(_logits(model, tiny_inputs(model)), before, atol=0, rtol=0)


def test_cats_cannot_skip_more_than_two_thirds():
    with pytest.raises(InvalidArgumentError, match="at most 67%"):
        sparsify_(tiny_model("llama"), _config("cats", 0.7), calibration=_ids(0))


def test_sparsify_twice_and_moe_are_refused():
    model = tiny_model("llama")
    sparsify_(model, _config("teal", 0.3), calibration=_ids(0))
    with pytest.raises(InvalidArgumentError, match="already sparse"):
        sparsify_(model, _config("teal", 0.3), calibration=_ids(0))
    with pytest.raises(UnsupportedArchitectureError, match="mixture of experts"):
        sparsify_(tiny_model("mixtral"), _config("teal", 0.3), calibration=_ids(0))
    with pytest.raises(UnsupportedArchitectureError, match="module of its own"):
        sparsify_(tiny_model("opt"), _config("teal", 0.3), calibration=_ids(0))


def test_config_round_trip():
    c = SparsityConfig("best", 0.5, layers=[0])
    assert SparsityConfig.from_dict(c.to_dict()) == c
    assert c.allocation == "sensitivity"
    assert SparsityConfig("cats", 0.3).allocation == "uniform"


def test_drelu_conversion_saves_and_reloads(tmp_path):
    from ffnkit.io import load, save
    from ffnkit.sparsity import drelu_

    model = tiny_model("llama")
    drelu_(model)
    ffn = find_ffns(model)[0]
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = (torch.relu(x @ ffn.W_gate.T) * torch.relu(x @ ffn.W_in.T)) @ ffn.W_out.T  # the dReLU oracle
        torch.testing.assert_close(ffn.module(x), want, atol=1e-5, rtol=1e-5)
    inputs = tiny_inputs(model)
    save(model, None, tmp_path / "d")
    loaded, _ = load(tmp_path / "d")
    torch.testing.assert_close(_logits(loaded, inputs), _logits(model, inputs), atol=0, rtol=0)
    with pytest.raises(InvalidArgumentError, match="gated"):
        drelu_(tiny_model("gpt2"))


def test_count_sparsity_is_readable_after_the_block():
    from ffnkit.sparsity.transform import count_sparsity

    model = tiny_model("llama")
    sparsify_(model, _config("cats", 0.4), calibration=_ids(0))
    with count_sparsity(model) as counted, torch.no_grad():
        model(input_ids=_ids(7, n=4))
    inside = measure_sparsity(model, _ids(7, n=4))
    after = counted()
    assert after.bytes_skipped > 0.2 and after.bytes_skipped == pytest.approx(inside.bytes_skipped)
