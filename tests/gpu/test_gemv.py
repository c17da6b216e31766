"""The Triton GEMV (``triton_gemv``) against F.linear in float32 on fresh random inputs.

Tolerances (relative error of the output's norm, and every element within ``tol`` x max |y|): float32
1e-5; bfloat16 1e-2 (inputs and weights are the same bf16 values as the oracle's, the sum is float32,
the output is rounded once to bf16: a 2^-9 relative step; the fused norm rounds its normalised input to bf16
too, as an unfused rms_norm does). Skipped without CUDA and Triton; run on the accelerator machine:
    python -m pytest -q tests/gpu/test_gemv.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ffnkit.kernels import gemv, resolve_backend, rms_norm_gemv
from tests.gpu import NEEDS_CUDA_TRITON

pytestmark = NEEDS_CUDA_TRITON

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = list(TOL)
SHAPES = [(37, 70), (65, 129), (8, 16), (1000, 1030), (6144, 4096), (4096, 4096)]  # [out, in]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    err = float((got.float() - want).norm() / want.norm())
    worst = float((got.float() - want).abs().max() / want.abs().max())
    assert err < tol and worst < 4 * tol, (err, worst)


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


@pytest.fixture(params=["chunks", "rows"])
def path(request, monkeypatch):
    """Route the products through one kernel path, with up to 4 rows on the Triton kernel (the shipped
    MAX_ROWS sends more than one row to cuBLAS); a row count the rows path cannot take goes to chunks."""
    import ffnkit.kernels.triton_gemv as TG

    monkeypatch.setitem(TG.CONFIGS, "path", request.param)
    monkeypatch.setitem(TG.CONFIGS, "MAX_ROWS", 4)
    return request.param


def test_auto_picks_triton_on_cuda():
    assert resolve_backend(torch.zeros(1, device="cuda")) == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_float32_linear(shape, rows, dtype, path):
    o, k = shape
    x, w = _rand(rows, k, dtype=dtype, seed=0), _rand(o, k, dtype=dtype, seed=1)
    got = gemv(x, w)
    assert got.shape == (rows, o) and got.dtype == dtype
    _close(got, F.linear(x.float(), w.float()), dtype)


def test_more_rows_than_max_rows_go_to_cublas(path):
    x, w = _rand(2, 5, 64, dtype=torch.bfloat16, seed=0), _rand(96, 64, dtype=torch.bfloat16, seed=1)
    assert torch.equal(gemv(x, w), F.linear(x, w))  # 10 rows: F.linear itself


def test_persistent_rows_grid_matches():
    import ffnkit.kernels.triton_gemv as TG

    x, w = _rand(1, 4096, dtype=torch.bfloat16, seed=0), _rand(6144, 4096, dtype=torch.bfloat16, seed=1)
    for cfg in ({"path": "rows", "PROGRAMS_PER_SM": 2, "BLOCK_O": 4}, {"path": "chunks", "BLOCK_O": 8}):
        _close(TG.gemv(x, w, config=cfg), F.linear(x.float(), w.float()), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(65, 129), (6144, 4096)])
def test_rms_norm_gemv_matches_float32(shape, rows, residual, dtype, path):
    o, k = shape
    x, w = _rand(rows, k, dtype=dtype, seed=0), _rand(o, k, dtype=dtype, seed=1)
    g = (_rand(k, dtype=torch.float32, seed=2).abs() + 0.5).to(dtype)
    r = _rand(rows, k, dtype=dtype, seed=3) if residual else None
    want_h = x.float() + (r.float() if residual else 0.0)
    a = want_h / torch.sqrt(want_h.pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()
    y, h = rms_norm_gemv(x, w, g, 1e-5, r)
    _close(y, a @ w.float().T, dtype)
    torch.testing.assert_close(h.float(), want_h, rtol=TOL[dtype], atol=TOL[dtype])


def test_gemv_is_captured_in_a_cuda_graph(path):
    x = _rand(1, 4096, dtype=torch.bfloat16, seed=0)
    w = _rand(6144, 4096, dtype=torch.bfloat16, seed=1)
    g_ = (_rand(4096, dtype=torch.float32, seed=2).abs() + 0.5).to(torch.bfloat16)
    r = _rand(1, 4096, dtype=torch.bfloat16, seed=3)
    gemv(x, w), rms_norm_gemv(x, w, g_, 1e-5, r)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv(x, w)
        y2, h = rms_norm_gemv(x, w, g_, 1e-5, r)
    x.copy_(_rand(1, 4096, dtype=torch.bfloat16, seed=4))  # new input, same buffer
    graph.replay()
    torch.cuda.synchronize()
    _close(y, F.linear(x.float(), w.float()), torch.bfloat16)
    hh = x.float() + r.float()
    a = hh / torch.sqrt(hh.pow(2).mean(-1, keepdim=True) + 1e-5) * g_.float()
    _close(y2, a @ w.float().T, torch.bfloat16)
