"""The dense decode GEMV on CPU: the torch fallback of ``gemv`` / ``rms_norm_gemv`` against float64 oracles
written here, and the one-line errors. (The Triton kernel's tests are in tests/gpu/test_gemv.py.)"""

from __future__ import annotations

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels import gemv, resolve_backend, rms_norm_gemv
from ffnkit.kernels.dense_gemv import parse_gemv_config


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 33), (2, 4, 17)])
def test_gemv_fallback_matches_float64(backend, shape):
    x, w = _rand(*shape), _rand(13, shape[-1], seed=1)
    want = (x.double() @ w.double().T).float()
    got = gemv(x, w, backend=backend)
    assert got.shape == (*shape[:-1], 13) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gemv_on_cpu_resolves_to_the_cpu_backend():
    assert resolve_backend(torch.zeros(1)) == "cpu"


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_gemv_fallback_matches_float64(with_residual):
    x, w, g = _rand(3, 21), _rand(10, 21, seed=1), _rand(21, seed=2).abs() + 0.5
    r = _rand(3, 21, seed=3) if with_residual else None
    h64 = x.double() + (r.double() if r is not None else 0.0)
    a = h64 / torch.sqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6) * g.double()
    y, h = rms_norm_gemv(x, w, g, 1e-6, r)
    torch.testing.assert_close(y, (a @ w.double().T).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h64.float(), rtol=1e-6, atol=1e-6)


def test_empty_input_gives_empty_output():
    assert gemv(torch.zeros(0, 4), torch.ones(3, 4)).shape == (0, 3)


@pytest.mark.parametrize(
    ("x", "w", "match"),
    [
        (torch.zeros(1, 5), torch.zeros(3, 4), "must be \\[..., 4\\]"),
        (torch.zeros(1, 4, dtype=torch.float64), torch.zeros(3, 4), "cast or move"),
        (torch.zeros(1, 4), torch.zeros(4, 3).T, "unit column stride"),
        (torch.zeros(1, 4), torch.zeros(2, 3, 4), "\\[out, in\\]"),
    ],
)
def test_bad_input_is_a_one_line_error(x, w, match):
    with pytest.raises(InvalidArgumentError, match=match):
        gemv(x, w)


def test_rms_norm_gemv_bad_input():
    x, w = torch.zeros(1, 4), torch.zeros(3, 4)
    with pytest.raises(InvalidArgumentError, match="norm_weight"):
        rms_norm_gemv(x, w, torch.ones(5))
    with pytest.raises(InvalidArgumentError, match="residual"):
        rms_norm_gemv(x, w, torch.ones(4), 1e-5, torch.zeros(2, 4))
    with pytest.raises(InvalidArgumentError, match="eps"):
        rms_norm_gemv(x, w, torch.ones(4), 0.0)


def test_parse_gemv_config():
    assert parse_gemv_config("chunks:8:512:4:2") == {
        "path": "chunks", "BLOCK_O": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2,
    }  # fmt: skip
    assert parse_gemv_config("4:1024:8")["BLOCK_K"] == 1024
    for bad in ("rows:2:8", "chunks:4", "x:1:2:3"):
        with pytest.raises(InvalidArgumentError, match="bad GEMV config"):
            parse_gemv_config(bad)


def test_programmatic_launch_block_sets_and_restores_the_launch_mode():
    from ffnkit.kernels import programmatic_launch
    from ffnkit.kernels.backend import LAUNCH

    assert LAUNCH == {"pdl": False, "prefetch_active": False}
    with programmatic_launch():
        assert LAUNCH == {"pdl": True, "prefetch_active": False}  # the safe default: the gather waits first
        with programmatic_launch(prefetch_active=True):
            assert LAUNCH == {"pdl": True, "prefetch_active": True}
        assert LAUNCH == {"pdl": True, "prefetch_active": False}
    with pytest.raises(RuntimeError), programmatic_launch(prefetch_active=True):
        raise RuntimeError("boom")
    assert LAUNCH == {"pdl": False, "prefetch_active": False}
    with programmatic_launch(False, prefetch_active=True):
        assert LAUNCH == {"pdl": False, "prefetch_active": False}  # no prefetch without the launch mode
