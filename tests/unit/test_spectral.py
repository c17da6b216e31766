"""Spectral formulas on known spectra, and the per-layer pass against a raw covariance."""

from __future__ import annotations

import math

import pytest
import torch

from ffnkit import capture
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.inspect.spectral import plot_spectral, spectral_metrics, spectral_utilisation
from tests.tiny_models import F, V, tiny_model


def test_known_spectrum_by_hand():
    lam = torch.tensor([1.0, 4.0, 0.0, 2.0, 1.0] + [0.0] * 195)  # n = 200, any order
    m = spectral_metrics(lam)
    p = [0.5, 0.25, 0.125, 0.125]  # 4, 2, 1, 1 over 8
    assert m.d == 200 and m.total_variance == pytest.approx(8.0)
    assert m.hard_rank == pytest.approx(64 / 22)  # (Σλ)² / Σλ² = 8² / (16 + 4 + 1 + 1)
    assert m.soft_rank == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))  # 2^1.75
    assert m.soft_rank == pytest.approx(2**1.75)
    assert m.top1pct_share == pytest.approx((4 + 2) / 8)  # ceil(200 / 100) = 2 directions
    assert m.lambda_max_share == pytest.approx(0.5)
    assert m.utilisation == pytest.approx(2**1.75 / 200)
    assert m.hard_utilisation == pytest.approx(64 / 22 / 200)
    assert m.hard_soft_ratio == pytest.approx(64 / 22 / 2**1.75)


@pytest.mark.parametrize("r", [1, 3, 7])
def test_flat_spectrum_gives_rank_r(r):
    m = spectral_metrics(torch.cat([torch.full((r,), 2.5), torch.zeros(10)]))
    assert m.hard_rank == pytest.approx(r) and m.soft_rank == pytest.approx(r)


@pytest.mark.parametrize("r", [1, 2, 5])
def test_rank_r_covariance_bounds(r):
    g = torch.Generator().manual_seed(r)
    x = torch.randn(500, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, 30, generator=g, dtype=torch.float64
    )
    eig = torch.linalg.eigvalsh(torch.cov(x.T, correction=0))  # tiny negative round-off included
    m = spectral_metrics(eig)
    assert 1.0 - 1e-9 <= m.hard_rank <= m.soft_rank + 1e-9
    assert m.soft_rank <= r + 1e-6


def test_no_variance_is_an_error():
    with pytest.raises(InvalidArgumentError, match="no variance"):
        spectral_metrics(torch.zeros(5))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3", "t5", "bert"])
def test_spectral_utilisation_matches_raw_covariance(family, tmp_path):
    model = tiny_model(family)
    ids = torch.randint(3, V, (6, 11), generator=torch.Generator().manual_seed(0))
    res = spectral_utilisation(model, ids, batch_size=2, layers_per_pass=1)
    kwargs = {"input_ids": ids, **({"decoder_input_ids": ids} if family == "t5" else {})}
    with torch.no_grad(), capture(model, sites="post") as cap:
        model(**kwargs)
    assert [r["layer"] for r in res.layers] == cap.layers
    for row in res.layers:
        raw = cap["post", row["layer"]].double()  # [N, d_ff]
        want = spectral_metrics(torch.linalg.eigvalsh(torch.cov(raw.T, correction=0)))
        assert row["hard_rank"] == pytest.approx(want.hard_rank, rel=1e-6)
        assert row["soft_rank"] == pytest.approx(want.soft_rank, rel=1e-6)
        assert row["tokens"] == 66 and row["d_ff"] == F
        assert 1.0 <= row["hard_rank"] <= row["soft_rank"] <= min(F, 66)
    assert "hard_rank" in res.formulas
    png = plot_spectral(res, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_moe_only_model_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="mixture of experts"):
        spectral_utilisation(tiny_model("mixtral"), torch.randint(3, V, (2, 5)))
