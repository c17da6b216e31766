"""The ``triton`` backend equals the reference (masked dense, float32) on the same cases as the CPU tests.

Skipped where CUDA or Triton is missing (CI has no GPU); run on the accelerator machine:
    python -m pytest -q tests/gpu
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ffnkit.kernels import gather_ffn, resolve_backend, threshold_ffn
from tests import kernel_cases as kc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs a CUDA device and Triton",
    ),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("float32", "bfloat16", "float16")
SHAPES = [*kc.SHAPES, (1000, 512)]  # plus one that spans many neuron blocks and k slices


@pytest.fixture(params=["split", "fused"])
def triton_backend(request, monkeypatch):
    """The Triton backend with batch 1 through the split kernels, then through the fused kernel."""
    import ffnkit.kernels.triton_sparse_ffn as T

    monkeypatch.setitem(
        T.CONFIGS, "fused_1", dict(T.CONFIGS["fused_1"], enabled=int(request.param == "fused"))
    )
    return "triton"


def test_auto_picks_triton_on_cuda():
    assert resolve_backend(torch.zeros(1, device="cuda")) == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 33])
@pytest.mark.parametrize("level", kc.LEVELS)
def test_gather_ffn_equals_reference(triton_backend, dtype, shape, rows, level):
    err = kc.check_gather(triton_backend, *shape, rows, level, dtype, "cuda", seed=rows + len(level))
    assert err <= kc.TOL[dtype], err


@pytest.mark.parametrize("act", kc.ACTS)
@pytest.mark.parametrize("rows", [1, 4])
def test_gather_ffn_activations(triton_backend, act, rows):
    assert kc.check_gather(triton_backend, 64, 48, rows, "half", torch.float32, "cuda", act=act) <= 1e-5


@pytest.mark.parametrize("rows", [1, 5])
def test_gather_scale_equals_each_row_alone(triton_backend, rows):
    assert kc.check_scaled_union(triton_backend, 70, 33, rows, torch.float32, "cuda", seed=rows) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_threshold_ffn_equals_reference(dtype, rows, share_kept, act):
    err = kc.check_threshold("triton", 130, 257, rows, share_kept, dtype, "cuda", act=act)
    assert err <= kc.TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("share_kept", [1.0, 0.6, 0.1, 0.0])
@pytest.mark.parametrize("shape", [(101, 67), (4096, 700)])
def test_sparse_input_linear_equals_reference(dtype, rows, share_kept, shape):
    err = kc.check_input_linear("triton", *shape, rows, share_kept, dtype, "cuda")
    assert err <= kc.TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.2])
def test_teal_ffn_equals_reference(dtype, rows, share_kept):
    assert kc.check_teal("triton", 90, 41, rows, share_kept, dtype, "cuda") <= kc.TOL[dtype]


def test_sparsity_changes_the_output(triton_backend):
    _, packed = kc.make_ffn(40, 24, torch.float32, "cuda", seed=7)
    x = kc.make_x(1, 24, torch.float32, "cuda", seed=8)
    full = gather_ffn(x, packed, torch.arange(40, device="cuda"), backend=triton_backend)
    half = gather_ffn(x, packed, torch.arange(20, device="cuda"), backend=triton_backend)
    assert kc.rel_err(half, full) > 0.1
    assert kc.rel_err(threshold_ffn(x, packed, 0.2, backend="triton"), full) > 1e-3


def test_every_output_is_written(triton_backend):
    """Repeated calls on fresh inputs agree with the reference each time (no stale or unwritten output)."""
    _, packed = kc.make_ffn(300, 200, torch.bfloat16, "cuda", seed=21)
    idx = torch.randperm(300, device="cuda")[:77].int()
    for seed in range(3):
        x = kc.make_x(1, 200, torch.bfloat16, "cuda", seed=100 + seed)
        out = gather_ffn(x, packed, idx, backend=triton_backend)
        assert torch.isfinite(out).all()
        assert kc.rel_err(out, gather_ffn(x, packed, idx, backend="reference")) <= kc.TOL[torch.bfloat16]


def test_cuda_graph_capture(triton_backend):
    """The kernels can be captured in a CUDA graph (how a decode loop would run them)."""
    _, packed = kc.make_ffn(256, 128, torch.bfloat16, "cuda", seed=31)
    x = kc.make_x(1, 128, torch.bfloat16, "cuda", seed=32)
    idx = torch.arange(0, 256, 3, device="cuda")
    expect = gather_ffn(x, packed, idx, backend="reference")
    gather_ffn(x, packed, idx, backend=triton_backend)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_ffn(x, packed, idx, backend=triton_backend)
    graph.replay()
    torch.cuda.synchronize()
    assert kc.rel_err(out, expect) <= kc.TOL[torch.bfloat16]
