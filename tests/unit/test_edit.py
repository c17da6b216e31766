"""core/edit: shape changes on every family layout are exact, atomic, and keep the handle valid."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from ffnkit import find_ffns
from ffnkit.core import edit, transaction
from ffnkit.core.edit import keep_neurons_, permute_neurons_, set_bias_out_
from ffnkit.core.errors import InvalidArgumentError
from tests.tiny_models import FAMILIES, H, tiny_inputs, tiny_model


def _out(model, inputs):
    with torch.no_grad():
        o = model(**inputs)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _fail_swap_at(monkeypatch, n: int) -> tuple[dict, object]:
    """Make the n-th attribute swap of core.edit's transaction raise; returns (call counter, real swap)."""
    calls, real = {"n": 0}, transaction._apply_swap

    def flaky(swap):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return real(swap)

    monkeypatch.setattr(transaction, "_apply_swap", flaky)
    return calls, real


def _random_perm(ffn, gen):
    if ffn.kind == "moe":
        return torch.stack([torch.randperm(ffn.d_ff, generator=gen) for _ in range(ffn.num_experts)])
    return torch.randperm(ffn.d_ff, generator=gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_permutation_preserves_logits(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    gen = torch.Generator().manual_seed(0)
    for ffn in find_ffns(model):
        permute_neurons_(ffn, _random_perm(ffn, gen), model=model)
        if ffn.shared is not None:
            permute_neurons_(ffn.shared, _random_perm(ffn.shared, gen), model=model)
    got = _out(model, inputs)
    assert (got - ref).abs().max().item() < 1e-5
    # a permutation really happened: the weights moved
    assert not torch.equal(
        find_ffns(model)[0].parameters()[1], find_ffns(tiny_model(family))[0].parameters()[1]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_shrinks_and_handle_stays_valid(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    for ffn in find_ffns(model):
        k = ffn.d_ff // 2
        keep_neurons_(ffn, torch.arange(0, 2 * k, 2), model=model)
        assert ffn.d_ff == k
        units = ffn.experts if ffn.kind == "moe" else [ffn]
        for u in units:
            assert u.W_in.shape == (k, H) and u.W_out.shape == (H, k)
            if u.kind == "gated":
                assert u.W_gate.shape == (k, H)
        if ffn.kind != "moe":
            mod = ffn.out_proj
            assert (mod.nx if isinstance(mod, Conv1D) else mod.in_features) == k
    assert _out(model, inputs).isfinite().all()
    widths = model.config.ffnkit["structure"]["d_ff"]
    assert widths == [f.d_ff for f in find_ffns(model)]  # a fresh handle sees the same widths


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt", "t5-gated"])
def test_keep_matches_handle_forward_of_subset(family):
    """Keeping neurons K equals Σ_{i∈K} m_i v_i (+ b_out) computed from the original weights."""
    model = tiny_model(family)
    ffn = find_ffns(model)[0]
    x = torch.randn(5, H)
    sites = ffn.activations(x)
    idx = torch.tensor([3, 0, 7, 11])
    expected = sites["post"][:, idx] @ ffn.W_out[:, idx].T
    if ffn.b_out is not None:
        expected = expected + ffn.b_out
    keep_neurons_(ffn, idx)
    assert torch.allclose(ffn(x), expected, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "bert", "t5"])
def test_set_bias_out_adds_bias(family):
    model = tiny_model(family)
    ffn = find_ffns(model)[0]
    x = torch.randn(4, H)
    with torch.no_grad():
        before = ffn.module and _ffn_out(ffn, x)
    b = torch.randn(H)
    old = ffn.b_out.clone() if ffn.b_out is not None else torch.zeros(H)
    set_bias_out_(ffn, old + b, model=model)
    with torch.no_grad():
        after = _ffn_out(ffn, x)
    assert torch.allclose(after - before, b.expand_as(after), atol=1e-5)
    assert model.config.ffnkit["structure"]["bias_out"][0] is True


def _ffn_out(ffn, x):
    """The output as the model's own modules compute it (not the handle's formula)."""
    from ffnkit.core.capture import site_hooks

    module, _, extract = site_hooks(ffn, "out")
    got = {}
    h = module.register_forward_hook(lambda m, a, o: got.setdefault("out", extract(a, o)))
    try:
        ffn.out_proj(ffn.activations(x)["post"])
    finally:
        h.remove()
    return got["out"]


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "mixtral", "qwen2_moe"])
def test_atomicity_failure_mid_edit_leaves_model_unchanged(family, monkeypatch):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    state = copy.deepcopy(model.state_dict())
    ffns = find_ffns(model)
    widths = [f.d_ff for f in ffns]
    config_before = model.config.to_dict()
    calls, real = _fail_swap_at(monkeypatch, 5)
    keep = {f: torch.arange(f.d_ff // 2) for f in ffns}
    bias = {f: torch.ones(H) for f in ffns if f.kind != "moe"}
    with pytest.raises(RuntimeError, match="injected"):
        edit.edit_ffns_(model, keep, bias)
    assert calls["n"] == 5
    monkeypatch.setattr(transaction, "_apply_swap", real)
    assert [f.d_ff for f in ffns] == widths  # the handles too
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert model.config.to_dict() == config_before
    assert torch.equal(_out(model, inputs), ref)


def test_atomicity_failure_in_recording_restores_everything(monkeypatch):
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    from ffnkit.core import structure

    monkeypatch.setattr(
        structure, "record_change", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    ffn = find_ffns(model)[0]
    with pytest.raises(RuntimeError, match="boom"):
        keep_neurons_(ffn, torch.arange(5), model=model)
    assert ffn.d_ff == 48 and not hasattr(model.config, "ffnkit")
    assert model.config.intermediate_size == 48
    assert torch.equal(_out(model, inputs), ref)


def test_bad_indices_are_clear_errors():
    ffn = find_ffns(tiny_model("llama"))[0]
    with pytest.raises(InvalidArgumentError, match=r"\[0, 47\]"):
        keep_neurons_(ffn, torch.tensor([0, 48]))
    with pytest.raises(InvalidArgumentError, match="at least one"):
        keep_neurons_(ffn, torch.tensor([], dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="permutation"):
        permute_neurons_(ffn, torch.zeros(48, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="b_out"):
        set_bias_out_(ffn, torch.zeros(3))
    assert ffn.d_ff == 48


def test_uniform_widths_update_config_key():
    for family, key in (
        ("llama", "intermediate_size"),
        ("gpt2", "n_inner"),
        ("opt", "ffn_dim"),
        ("t5", "d_ff"),
    ):
        model = tiny_model(family)
        for f in find_ffns(model):
            keep_neurons_(f, torch.arange(20), model=model)
        assert getattr(model.config, key) == 20, family


@pytest.mark.parametrize("family", ["llama", "phi3", "opt"])
def test_set_ffn_weights_widens_exactly_and_atomically(family, monkeypatch):
    """Doubling every neuron and halving W_out is the same function; a failure midway changes nothing."""
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    ffn = find_ffns(model)[0]
    w = {k: getattr(ffn, k) for k in ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out")}
    w = {k: None if v is None else v.detach().clone() for k, v in w.items()}
    two = {
        k: None if v is None else torch.cat([v, v])
        for k, v in w.items()
        if k in ("W_in", "W_gate", "b_in", "b_gate")
    }
    _, real = _fail_swap_at(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="injected"):
        edit.set_ffn_weights_(ffn, W_out=torch.cat([w["W_out"], w["W_out"]], 1) / 2, b_out=w["b_out"], **two)
    monkeypatch.setattr(transaction, "_apply_swap", real)
    assert ffn.d_ff == 48 and torch.equal(_out(model, inputs), ref)
    edit.set_ffn_weights_(ffn, W_out=torch.cat([w["W_out"], w["W_out"]], 1) / 2, b_out=w["b_out"], **two)
    assert ffn.d_ff == 96 and torch.equal(ffn.W_in[48:], w["W_in"])
    assert torch.allclose(_out(model, inputs), ref, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="W_in must be"):
        edit.set_ffn_weights_(ffn, w["W_in"][:, :3], w["W_out"], w["W_gate"])
