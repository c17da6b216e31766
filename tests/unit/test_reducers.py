"""Streaming reducers agree with the statistic of the concatenated raw tensor, merge like one pass, and
keep a state whose size does not depend on the number of tokens seen."""

from __future__ import annotations

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.reducers import (
    REDUCERS,
    Count,
    Covariance,
    FiringRate,
    Histogram,
    Max,
    Mean,
    MeanAbs,
    MeanSquare,
    Min,
    Reducer,
    Variance,
    make_reducer,
)

N = 6  # neurons


def chunks() -> list[torch.Tensor]:
    """Chunks of different shapes ([B, T, n] and [T, n]), offset mean so naive variance would lose digits."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 7, N), (13, N), (1, 1, N), (3, 5, N), (40, N)]
    return [torch.randn(*s, generator=g) * 2.0 + 50.0 for s in shapes]


def raw() -> torch.Tensor:
    return torch.cat([c.reshape(-1, N) for c in chunks()]).double()  # [N_tokens, n]


def feed(r: Reducer, xs: list[torch.Tensor]) -> Reducer:
    for x in xs:
        r.update(x)
    return r


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_count_and_means() -> None:
    x, xs = raw(), chunks()
    assert feed(Count(), xs).result() == x.shape[0]
    assert close(feed(Mean(), xs).result(), x.mean(0))
    assert close(feed(MeanAbs(), xs).result(), x.abs().mean(0))
    assert close(feed(MeanSquare(), xs).result(), (x**2).mean(0))
    assert close(feed(Max(), xs).result(), x.amax(0))
    assert close(feed(Min(), xs).result(), x.amin(0))


def test_variance_population_ddof0() -> None:
    x = raw()
    r = feed(Variance(), chunks()).result()
    assert close(r.mean, x.mean(0))
    assert close(r.var, x.var(0, correction=0))
    assert close(r.std, x.std(0, correction=0))
    assert r.count == x.shape[0] and r.var.dtype == torch.float64


def test_variance_float16_input_accumulates_in_float64() -> None:
    x = torch.randn(300, N).half()
    r = feed(Variance(), list(x.split(64))).result()
    assert close(r.var, x.double().var(0, correction=0))


@pytest.mark.parametrize("threshold", [0.0, 0.1, 1.5])
def test_firing_rate(threshold: float) -> None:
    x = raw()  # [tokens, n]
    # the one definition (ffnkit.core.criteria), written out: |x_i| > threshold * mean_j |x_j| per token
    scale = x.abs().mean(1, keepdim=True)  # [tokens, 1]
    ref = (x.abs() > threshold * scale).double().mean(0)
    assert close(feed(FiringRate(threshold), chunks()).result(), ref)


def test_firing_rate_default_threshold_on_known_values() -> None:
    # per token mean |x| = 1.525 and 1.0: active above 0.1525 and 0.1
    x = torch.tensor([[4.0, -2.0, 0.1, 0.0], [0.05, 0.0, -3.9, 0.05]])
    assert FiringRate().update(x).result().tolist() == [0.5, 0.5, 0.5, 0.0]


def test_covariance() -> None:
    x = raw()
    r = feed(Covariance(), chunks()).result()
    xc = x - x.mean(0)
    cov = xc.T @ xc / x.shape[0]
    assert close(r.mean, x.mean(0))
    assert torch.allclose(r.cov, cov, rtol=1e-9, atol=1e-9)
    assert torch.allclose(r.eigvalsh(), torch.linalg.eigvalsh(cov), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("per_neuron", [False, True])
def test_histogram(per_neuron: bool) -> None:
    x = raw()
    lo, hi = 48.0, 52.0  # narrow: many values fall outside
    r = feed(Histogram(bins=8, range=(lo, hi), per_neuron=per_neuron), chunks()).result()
    n_tokens = x.shape[0]
    if per_neuron:
        assert r.counts.shape == (N, 8)
        assert (r.counts.sum(1) == n_tokens).all()  # every token lands in one bin per neuron
        ref = torch.stack([torch.histc(x[:, i].clamp(lo, hi), bins=8, min=lo, max=hi) for i in range(N)])
        assert torch.equal(r.counts.double(), ref.double())
        assert torch.equal(r.underflow, (x < lo).sum(0)) and torch.equal(r.overflow, (x > hi).sum(0))
    else:
        assert r.counts.shape == (8,) and r.counts.sum() == n_tokens * N
        ref = torch.histc(x.clamp(lo, hi), bins=8, min=lo, max=hi)
        assert torch.equal(r.counts.double(), ref.double())
        assert r.underflow == (x < lo).sum() and r.overflow == (x > hi).sum()
    assert r.edges.shape == (9,) and r.edges[0] == lo and r.edges[-1] == hi


def test_histogram_edges_and_clamping() -> None:
    r = Histogram(bins=4, range=(-1.0, 1.0), per_neuron=True).update(
        torch.tensor([[-2.0], [-1.0], [1.0], [9.0]])
    )
    res = r.result()
    assert res.counts.tolist() == [[2, 0, 0, 2]]  # -2 clamps to bin 0, hi edge belongs to the last bin
    assert res.underflow.tolist() == [1] and res.overflow.tolist() == [1]


@pytest.mark.parametrize("name", list(REDUCERS))
def test_merge_equals_single_pass(name: str) -> None:
    xs = chunks()
    single = feed(make_reducer(name), xs)
    a, b, empty = feed(make_reducer(name), xs[:2]), feed(make_reducer(name), xs[2:]), make_reducer(name)
    merged = empty.merge(a).merge(b).merge(make_reducer(name))  # merging into / from empty reducers too
    assert merged.count == single.count
    _assert_same(merged.result(), single.result())


def _assert_same(r1: object, r2: object) -> None:
    if isinstance(r1, torch.Tensor):
        assert torch.allclose(r1.double(), r2.double(), rtol=1e-9, atol=1e-9)
    elif isinstance(r1, int):
        assert r1 == r2
    else:
        for k, v in vars(r1).items():
            _assert_same(v, getattr(r2, k))


@pytest.mark.parametrize("name", list(REDUCERS))
def test_memory_does_not_grow(name: str) -> None:
    r = make_reducer(name)
    r.update(torch.randn(10, N))
    size = r.state_numel()
    for _ in range(5):
        r.update(torch.randn(4, 100, N))
    assert r.state_numel() == size
    assert r.count == 10 + 5 * 400


def test_reset() -> None:
    r = Variance().update(torch.randn(5, N))
    r.reset()
    assert r.count == 0 and r.state_numel() == 0
    r.update(torch.ones(3, 2))  # a new width is fine after reset
    assert r.result().var.tolist() == [0.0, 0.0]


def test_errors() -> None:
    with pytest.raises(InvalidArgumentError):
        make_reducer("median")
    with pytest.raises(InvalidArgumentError):
        Mean().result()  # nothing seen yet
    with pytest.raises(InvalidArgumentError):
        Mean().update(torch.randn(3, 4)).update(torch.randn(3, 5))  # width changed
    with pytest.raises(InvalidArgumentError):
        Mean().merge(Variance())
    with pytest.raises(InvalidArgumentError):
        FiringRate(0.0).merge(FiringRate(1.0))
    with pytest.raises(InvalidArgumentError):
        Histogram(bins=4, range=(1.0, 1.0))
    r = Histogram(bins=4, range=(0.0, 1.0))
    assert make_reducer(r) is r
