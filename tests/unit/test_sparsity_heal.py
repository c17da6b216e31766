"""best+heal: sparsify_ with ``heal_minutes`` distils with the sparsity in the loop, then re-calibrates."""

from __future__ import annotations

import copy

import pytest
import torch

from ffnkit.core.archs import find_ffns
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.modules.sparse_ffn import SparseFFN
from ffnkit.sparsity import SparsityConfig, sparsify_
from ffnkit.sparsity import transform as transform_module
from tests.tiny_models import V, tiny_inputs, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(seed: int, n: int = 16, t: int = 32) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _config(sparsity: float, **kw) -> SparsityConfig:
    small = dict(samples=16, seq_len=32, tokens=512, path_tokens=128, probe_windows=2)
    return SparsityConfig("best", sparsity, **{**small, **kw})


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _ffn_param_ids(model) -> set[int]:
    return {id(p) for f in find_ffns(model) for p in f.module.parameters()}


def test_heal_trains_ffn_weights_with_the_masks_in_the_loop(tmp_path):
    from ffnkit.io import load, save

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    result = sparsify_(model, _config(0.5, heal_minutes=1.0, heal_steps=4, heal_lr=1e-3), calibration=_ids(0))
    assert result.heal is not None and result.heal["steps"] == 4
    # a dense student starts at KL 0 from its own copy: a positive first KL means the masks were active
    assert result.heal["loss_curve"][0] > 1e-6
    assert abs(result.calibration["bytes_skipped"] - 0.5) <= 1e-3  # re-calibrated on the healed weights
    ffn_ids = _ffn_param_ids(model)
    changed = {
        name
        for (name, p), q in zip(model.named_parameters(), dense.parameters(), strict=True)
        if not torch.equal(p, q)
    }
    assert changed and all(id(dict(model.named_parameters())[n]) in ffn_ids for n in changed)
    assert "heal" in model.config.ffnkit["changes"][-1]
    inputs = tiny_inputs(model)
    before = _logits(model, inputs)
    save(model, None, tmp_path / "healed", report=result)
    loaded, _ = load(tmp_path / "healed")
    assert all(isinstance(f.module, SparseFFN) for f in find_ffns(loaded))
    torch.testing.assert_close(_logits(loaded, inputs), before, atol=0, rtol=0)


def test_heal_off_or_at_sparsity_zero_changes_nothing():
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    want = _logits(model, inputs)
    m = copy.deepcopy(model)
    result = sparsify_(m, _config(0.0, heal_minutes=1.0, heal_steps=4), calibration=_ids(0))
    assert result.heal is None
    torch.testing.assert_close(_logits(m, inputs), want, atol=0, rtol=0)
    assert SparsityConfig("best", 0.4).heal_minutes == 0  # off unless asked for


def test_a_failure_after_the_heal_restores_the_weights(monkeypatch):
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    want = _logits(model, inputs)
    real = transform_module._heal

    def heal_then_fail(*args, **kwargs):
        real(*args, **kwargs)  # the weights change here
        raise RuntimeError("boom")

    monkeypatch.setattr(transform_module, "_heal", heal_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        sparsify_(model, _config(0.5, heal_minutes=1.0, heal_steps=3, heal_lr=1e-3), calibration=_ids(0))
    assert not any(isinstance(f.module, SparseFFN) for f in find_ffns(model))
    torch.testing.assert_close(_logits(model, inputs), want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "fields", [{"heal_minutes": -1.0}, {"heal_minutes": True}, {"heal_lr": 0.0}, {"heal_steps": 0}]
)
def test_bad_heal_settings_are_refused(fields):
    with pytest.raises(InvalidArgumentError, match="heal_"):
        SparsityConfig("best", 0.4, **fields)


def test_heal_config_round_trip():
    c = SparsityConfig("best", 0.5, heal_minutes=2.5, heal_lr=3e-4)
    assert SparsityConfig.from_dict(c.to_dict()) == c
