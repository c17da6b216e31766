"""The W_out refit of sparsified FFNs (``SparsityConfig.refit``) and the shared ridge-towards-prior solver."""

from __future__ import annotations

import copy

import pytest
import torch

from ffnkit.core.archs import find_ffns
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.lstsq import RidgeTowards
from ffnkit.modules.sparse_ffn import SparseFFN
from ffnkit.sparsity import Calibration, SparsityConfig, sparsify_
from ffnkit.sparsity import refit as refit_module
from ffnkit.sparsity.calibrate import LayerPlan, build_sparse
from ffnkit.sparsity.refit import refit_out_
from tests.tiny_models import V, tiny_model

SMALL = dict(samples=16, seq_len=32, tokens=512, path_tokens=128, probe_windows=2)


def _ids(seed: int, n: int = 16, t: int = 32) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def test_solver_matches_the_closed_form_and_leaves_free_unknowns_unshrunk():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 5, generator=g, dtype=torch.float64)
    f[:, -1] = 1.0  # a bias column
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    prior = torch.randn(5, 3, generator=g, dtype=torch.float64)
    fit = RidgeTowards(5, 3, free=1)
    for part_f, part_y in zip(f.split(7), y.split(7), strict=True):  # streamed in uneven chunks
        fit.update(part_f, part_y)
    got = fit.solve(prior, ridge=0.7)
    gram = f.T @ f
    lam = 0.7 * gram.diagonal()[:4].mean()
    reg = torch.diag(torch.tensor([lam, lam, lam, lam, 0.0], dtype=torch.float64))
    want = torch.linalg.solve(gram + reg, f.T @ y + reg @ prior)
    torch.testing.assert_close(got, want)
    assert fit.tokens == 40
    # a huge ridge pins the shrunk unknowns to the prior, never the free one
    fit = RidgeTowards(5, 3, free=1)
    fit.update(f, y)
    pinned = fit.solve(prior, ridge=1e9)
    torch.testing.assert_close(pinned[:4], prior[:4], atol=1e-6, rtol=0)
    assert not torch.allclose(pinned[4], prior[4], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights and an output bias
def test_refit_without_masks_returns_the_dense_weights(family):
    model = tiny_model(family)
    ffn = find_ffns(model)[0]
    module = build_sparse(ffn, "input")
    LayerPlan(index=ffn.index).apply(module)  # thresholds 0: nothing zeroed
    w, b = ffn.W_out.detach().clone(), None if ffn.b_out is None else ffn.b_out.detach().clone()
    report = refit_out_(module, ffn, torch.randn(300, ffn.d_model), ridge=3.0)
    assert report["error_before"] == 0.0 and report["error_after"] < 1e-10
    torch.testing.assert_close(ffn.W_out, w, atol=1e-5, rtol=1e-5)
    if b is not None:
        torch.testing.assert_close(ffn.b_out, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_refit_lowers_every_layers_output_error_as_reported(family):
    model = tiny_model(family)
    cal = Calibration.collect(model, find_ffns(model), _ids(0), 512)
    plain, refit = copy.deepcopy(model), copy.deepcopy(model)
    sparsify_(plain, SparsityConfig("best", 0.5, refit=False, **SMALL), stats=cal)
    result = sparsify_(refit, SparsityConfig("best", 0.5, **SMALL), stats=cal)
    dense = find_ffns(model)
    with torch.no_grad():
        for row, d, p, r in zip(result.layers, dense, find_ffns(plain), find_ffns(refit), strict=True):
            x = cal.inputs[d.index]
            y = d.forward(x).double()
            err = {k: float((f.module(x).double() - y).pow(2).sum() / y.pow(2).sum()) for k, f in (("p", p), ("r", r))}  # fmt: skip
            assert err["r"] < err["p"], (row["name"], err)
            assert row["refit"]["error_before"] == pytest.approx(err["p"], rel=1e-4)
            assert row["refit"]["error_after"] == pytest.approx(err["r"], rel=1e-3, abs=1e-6)
            # the thresholds are the same: only W_out (and b_out) moved
            assert torch.equal(p.module.c_mid, r.module.c_mid) and float(p.module.t_mid) == float(
                r.module.t_mid
            )
    assert refit.config.ffnkit["changes"][-1]["refit"] == {"ridge": 3.0, "tokens": 512}
    assert "refit" not in plain.config.ffnkit["changes"][-1]


def test_refit_defaults_on_for_best_only_and_validates():
    assert SparsityConfig("best", 0.4).refit is True
    assert SparsityConfig("teal", 0.4).refit is False
    assert SparsityConfig("teal", 0.4, refit=True).refit is True
    for bad in (dict(refit_ridge=0.0), dict(refit_ridge=-1), dict(refit="yes")):
        with pytest.raises(InvalidArgumentError):
            SparsityConfig("best", 0.4, **bad)


def test_a_failed_refit_leaves_the_model_unchanged(monkeypatch):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = refit_out_, []

    def fails_on_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(refit_module, "refit_out_", fails_on_the_second_layer)
    with pytest.raises(RuntimeError, match="boom"):
        sparsify_(model, SparsityConfig("best", 0.5, **SMALL), calibration=_ids(0))
    assert len(calls) == 2
    assert not any(isinstance(f.module, SparseFFN) for f in find_ffns(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
