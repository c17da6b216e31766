"""Kernels on the CPU: every CPU backend (the C kernels and their pure-torch fallback) equals the reference;
the reference equals an independent dense computation; the backend switch and the input checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ffnkit
import ffnkit.kernels.backend as backend_mod
import ffnkit.kernels.cpu_sparse_ffn as cpu_impl
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels import (
    BACKENDS,
    KERNELS,
    available_backends,
    gather_ffn,
    kernel_activation,
    pack_ffn,
    pack_teal,
    predicted_ffn,
    resolve_backend,
    sparse_input_linear,
    teal_ffn,
    threshold_ffn,
    unpack_ffn,
    use_backend,
)
from ffnkit.kernels import reference as ref
from ffnkit.kernels.cpu_build import cpu_library_status
from tests import kernel_cases as kc

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("float32", "bfloat16", "float16")


@pytest.fixture(params=["c", "torch"])
def cpu_backend(request, monkeypatch):
    """The ``cpu`` backend through its C kernels, then through its pure-torch fallback."""
    if request.param == "c" and not cpu_library_status()["compiled"]:
        pytest.skip(f"C kernels not built here: {cpu_library_status()['error']}")
    if request.param == "torch":
        monkeypatch.setattr(cpu_impl, "load_cpu_library", lambda: None)
    return "cpu"


def tol(dtype, request) -> float:
    # the torch fallback multiplies in bf16/fp16 with bf16/fp16 intermediates (like a dense bf16 FFN)
    fallback = request.node.callspec.params.get("cpu_backend") == "torch"
    return kc.TOL[dtype] * (3 if dtype != torch.float32 and fallback else 1)


# ------------------------------------------------------------------------------ the reference is right


def test_reference_equals_dense_ffn_with_dropped_neurons_zeroed():
    (wg, wu, wd), packed = kc.make_ffn(50, 24, torch.float64, "cpu", seed=11)
    x = kc.make_x(3, 24, torch.float64, "cpu", seed=12)
    idx = torch.tensor([3, 7, 20, 49])
    keep = torch.zeros(50, dtype=torch.float64)
    keep[idx] = 1
    dense_masked = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ (wd * keep).T  # columns zeroed
    assert kc.rel_err(ref.gather_ffn(x, packed, idx), dense_masked) < 1e-6
    full = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    assert kc.rel_err(ref.threshold_ffn(x, packed, 0.0), full) < 1e-6
    assert kc.rel_err(ref.gather_ffn(x, packed, torch.arange(50)), full) < 1e-6
    w_t = wg.T.contiguous()  # [24, 50]
    kept = torch.where(x.abs() >= 0.5, x, 0.0)
    assert kc.rel_err(ref.sparse_input_linear(x, w_t, 0.5), kept @ w_t) < 1e-6


def test_pack_unpack_roundtrip():
    (wg, wu, wd), packed = kc.make_ffn(9, 5, torch.float32, "cpu", seed=1)
    assert packed.shape == (9, 3, 5) and packed.is_contiguous()
    g, u, d = unpack_ffn(packed)
    assert torch.equal(g, wg) and torch.equal(u, wu) and torch.equal(d, wd)
    assert torch.equal(packed[4, 2], wd[:, 4])  # neuron 4's down column sits next to its rows


# ------------------------------------------------------------------------------ cpu backend == reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", kc.SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("level", kc.LEVELS)
def test_gather_ffn_equals_reference(cpu_backend, request, dtype, shape, rows, level):
    err = kc.check_gather(cpu_backend, *shape, rows, level, dtype, "cpu", seed=rows + len(level))
    assert err <= tol(dtype, request), err


@pytest.mark.parametrize("act", kc.ACTS)
def test_gather_ffn_activations(cpu_backend, act):
    assert kc.check_gather(cpu_backend, 64, 48, 2, "half", torch.float32, "cpu", act=act) <= 1e-5


@pytest.mark.parametrize("rows", [1, 5])
def test_gather_scale_equals_each_row_alone(cpu_backend, rows):
    assert kc.check_scaled_union(cpu_backend, 70, 33, rows, torch.float32, "cpu", seed=rows) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_threshold_ffn_equals_reference(cpu_backend, request, dtype, rows, share_kept, act):
    err = kc.check_threshold(cpu_backend, 130, 257, rows, share_kept, dtype, "cpu", act=act)
    assert err <= tol(dtype, request), err


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("share_kept", [1.0, 0.6, 0.1, 0.0])
def test_sparse_input_linear_equals_reference(cpu_backend, request, dtype, rows, share_kept):
    err = kc.check_input_linear(cpu_backend, 101, 67, rows, share_kept, dtype, "cpu")
    assert err <= tol(dtype, request), err


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.2])
def test_teal_ffn_equals_reference(cpu_backend, request, dtype, share_kept):
    assert kc.check_teal(cpu_backend, 90, 41, 2, share_kept, dtype, "cpu") <= tol(dtype, request)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_threshold_ffn_per_neuron_equals_oracle(cpu_backend, request, backend, dtype, rows, act):
    """CHESS-style thresholds (one per neuron) against a float64 oracle built in the test."""
    err = kc.check_threshold_per_neuron(backend, 131, 67, rows, dtype, "cpu", act=act, seed=rows)
    assert err <= tol(dtype, request), err


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("rows", [1, 3])
def test_teal_ffn_per_channel_equals_oracle(cpu_backend, request, backend, dtype, rows):
    err = kc.check_teal_per_channel(backend, 93, 45, rows, dtype, "cpu", seed=rows)
    assert err <= tol(dtype, request), err


def test_threshold_tensor_of_one_value_equals_the_number(cpu_backend):
    _, packed = kc.make_ffn(50, 20, torch.float32, "cpu", seed=3)
    x = kc.make_x(2, 20, torch.float32, "cpu", seed=4)
    # (the C kernel's threads may add their partial sums in another order: equal up to float32 rounding)
    same = threshold_ffn(x, packed, torch.full((50,), 0.2))
    assert kc.rel_err(same, threshold_ffn(x, packed, 0.2)) < 1e-6
    w_t = kc.make_x(20, 7, torch.float32, "cpu", seed=5)
    by_input = sparse_input_linear(x, w_t, torch.full((20,), 0.5))
    assert kc.rel_err(by_input, sparse_input_linear(x, w_t, 0.5)) < 1e-6
    # and a threshold tensor really is per unit: raising one neuron's threshold drops only that neuron
    a = ref.activation("silu", x @ packed[:, 0].T)  # [N, F]
    t = torch.zeros(50)
    t[7] = float(a[:, 7].abs().max()) + 1.0
    diff = threshold_ffn(x, packed, t, backend="reference") - threshold_ffn(
        x, packed, 0.0, backend="reference"
    )
    expect = -(a[:, 7:8] * (x @ packed[7:8, 1].T)) @ packed[7:8, 2]  # minus neuron 7's contribution
    assert torch.allclose(diff, expect, atol=1e-5)


def test_threshold_zero_equals_dense(cpu_backend):
    (wg, wu, wd), packed = kc.make_ffn(40, 24, torch.float32, "cpu", seed=5)
    x = kc.make_x(2, 24, torch.float32, "cpu", seed=6)
    dense = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    assert kc.rel_err(threshold_ffn(x, packed, 0.0, backend=cpu_backend), dense) < 1e-5
    w_t = wg.T.contiguous()
    assert kc.rel_err(sparse_input_linear(x, w_t, 0.0, backend=cpu_backend), x @ w_t) < 1e-5


def test_sparsity_changes_the_output(cpu_backend):
    """Dropping neurons must matter (guards against a kernel that ignores idx or the threshold)."""
    _, packed = kc.make_ffn(40, 24, torch.float32, "cpu", seed=7)
    x = kc.make_x(1, 24, torch.float32, "cpu", seed=8)
    full = gather_ffn(x, packed, torch.arange(40), backend=cpu_backend)
    half = gather_ffn(x, packed, torch.arange(20), backend=cpu_backend)
    assert kc.rel_err(half, full) > 0.1
    assert kc.rel_err(threshold_ffn(x, packed, 0.2, backend=cpu_backend), full) > 1e-3


def test_leading_dims_and_int32_idx(cpu_backend):
    _, packed = kc.make_ffn(30, 16, torch.float32, "cpu", seed=9)
    x = kc.make_x(6, 16, torch.float32, "cpu", seed=10).reshape(2, 3, 16)
    idx = torch.tensor([0, 4, 29], dtype=torch.int32)
    out = gather_ffn(x, packed, idx, backend=cpu_backend)
    assert out.shape == (2, 3, 16)
    assert kc.rel_err(out, gather_ffn(x, packed, idx.long(), backend="reference")) < 1e-5


def test_c_kernel_reads_three_separate_tensors():
    if not cpu_library_status()["compiled"]:
        pytest.skip("C kernels not built here")
    (wg, wu, wd), packed = kc.make_ffn(45, 19, torch.float32, "cpu", seed=3)
    x = kc.make_x(3, 19, torch.float32, "cpu", seed=4)
    idx = torch.tensor([44, 2, 17, 30])
    out = cpu_impl.ffn_rows(x, (wg, wu, wd.T.contiguous()), idx, None)
    assert kc.rel_err(out, ref.gather_ffn(x, packed, idx)) < 1e-5


# ------------------------------------------------------------------------------------ backend switch


def test_dispatch_table_is_complete():
    kernels = {k for k, _ in KERNELS}
    assert kernels == {
        "gather_ffn",
        "threshold_ffn",
        "predicted_ffn",
        "sparse_input_linear",
        "teal_ffn",
        "experts_forward",
        "quant_pack",
        "quant_linear",
        "quant_ffn_pack",
        "quant_ffn",
        "gemv",
        "rms_norm_gemv",
    }
    gpu_only = {
        "quant_ffn_pack",
        "quant_ffn",
    }  # the fused int4 FFN: other backends run the matrices one by one
    assert {(k, b) for k in kernels - gpu_only for b in BACKENDS} | {(k, "triton") for k in gpu_only} == set(
        KERNELS
    )


def test_backend_resolution_and_precedence(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("FFNKIT_KERNEL_BACKEND", raising=False)
    assert resolve_backend(x) == "cpu"  # auto on a CPU tensor
    monkeypatch.setenv("FFNKIT_KERNEL_BACKEND", "reference")
    assert resolve_backend(x) == "reference"
    with use_backend("cpu"):
        assert resolve_backend(x) == "cpu"  # the block beats the environment
        assert resolve_backend(x, "reference") == "reference"  # the argument beats the block
        with use_backend("auto"):
            assert resolve_backend(x) == "cpu"
    monkeypatch.setenv("FFNKIT_KERNEL_BACKEND", "nope")
    with pytest.raises(InvalidArgumentError, match="FFNKIT_KERNEL_BACKEND"):
        resolve_backend(x)


def test_env_var_selects_the_backend_that_runs(monkeypatch):
    calls = []

    def fake(*args, **kwargs):
        calls.append("reference")
        return torch.zeros(1, 4)

    monkeypatch.setitem(backend_mod._LOADED, ("gather_ffn", "reference"), fake)
    monkeypatch.setenv("FFNKIT_KERNEL_BACKEND", "reference")
    gather_ffn(torch.randn(1, 4), torch.randn(6, 3, 4), torch.tensor([1]))
    assert calls == ["reference"]


def test_backend_errors():
    with pytest.raises(InvalidArgumentError, match="unknown kernel backend 'gpu'"):
        with use_backend("gpu"):
            pass
    x = torch.randn(1, 4)
    packed = torch.randn(6, 3, 4)
    with pytest.raises(InvalidArgumentError, match="triton"):  # a CPU tensor or no Triton: both refuse
        gather_ffn(x, packed, torch.tensor([0]), backend="triton")
    assert available_backends()[:2] == ["reference", "cpu"]


def test_import_touches_neither_triton_nor_cuda():
    code = (
        "import sys, torch, ffnkit, ffnkit.kernels\n"
        "from ffnkit.kernels import gather_ffn, pack_ffn\n"
        "p = pack_ffn(torch.randn(8, 4), torch.randn(8, 4), torch.randn(4, 8))\n"
        "gather_ffn(torch.randn(1, 4), p, torch.tensor([1, 2]))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    src = str(Path(ffnkit.__file__).resolve().parents[1])  # this checkout's src, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------ bad input


def test_input_errors():
    _, packed = kc.make_ffn(10, 4, torch.float32, "cpu", seed=0)
    x = torch.randn(2, 4)
    idx = torch.tensor([1, 2])
    cases = [
        (lambda: gather_ffn(x, packed[:, :2], idx), "F, 3, D"),
        (lambda: gather_ffn(torch.randn(2, 5), packed, idx), r"\[\.\.\., 4\]"),
        (lambda: gather_ffn(x.double(), packed, idx), "cast or move"),
        (lambda: gather_ffn(x, packed, torch.tensor([0, 10])), "outside"),
        (lambda: gather_ffn(x, packed, torch.tensor([-1])), "outside"),
        (lambda: gather_ffn(x, packed, idx.float()), "int32/int64"),
        (lambda: gather_ffn(x, packed, idx[None]), "1-D"),
        (lambda: gather_ffn(x, packed, idx, scale=torch.ones(1, 2)), "scale"),
        (lambda: gather_ffn(x, packed, idx, act="tanh"), "activation"),
        (lambda: gather_ffn(x, packed.transpose(0, 1).contiguous().transpose(0, 1), idx), "contiguous"),
        (lambda: threshold_ffn(x, packed, -0.1), "threshold"),
        (lambda: threshold_ffn(x, packed, float("nan")), "threshold"),
        (
            lambda: threshold_ffn(x, packed, torch.ones(9)),
            r"per-neuron thresholds must be a floating-point \[10\]",
        ),
        (lambda: threshold_ffn(x, packed, torch.ones(10, dtype=torch.int64)), "floating-point"),
        (lambda: threshold_ffn(x, packed, -torch.ones(10)), ">= 0"),
        (lambda: threshold_ffn(x, packed, torch.full((10,), float("nan"))), ">= 0"),
        (lambda: sparse_input_linear(x, torch.randn(4, 3), torch.ones(3)), r"per-input thresholds"),
        (lambda: sparse_input_linear(x, torch.randn(5, 3), 0.1), "input width"),
        (lambda: sparse_input_linear(x, torch.randn(4), 0.1), r"\[in, out\]"),
        (lambda: pack_ffn(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)), "W_down"),
        (lambda: teal_ffn(x, packed, 0.1, 0.1), "TealWeights"),
        (lambda: kernel_activation("tanh"), "no sparse kernel"),
    ]
    for fn, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            fn()


def test_empty_inputs_give_zeros(cpu_backend):
    _, packed = kc.make_ffn(10, 4, torch.float32, "cpu", seed=0)
    empty = torch.tensor([], dtype=torch.long)
    assert torch.count_nonzero(gather_ffn(torch.randn(2, 4), packed, empty, backend=cpu_backend)) == 0
    assert gather_ffn(torch.randn(0, 4), packed, torch.tensor([1]), backend=cpu_backend).shape == (0, 4)
    w = pack_teal(torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6))
    assert torch.count_nonzero(teal_ffn(torch.randn(1, 4), w, 1e9, 0.0, backend=cpu_backend)) == 0


@pytest.mark.parametrize("distance", [1, 3])
def test_c_kernel_with_software_prefetch(monkeypatch, distance):
    """The optional prefetch (off by default) changes timing only, never the result."""
    if not cpu_library_status()["compiled"]:
        pytest.skip("C kernels not built here")
    monkeypatch.setattr(cpu_impl, "PREFETCH", distance)
    assert kc.check_gather("cpu", 130, 257, 3, "half", torch.float32, "cpu") <= 1e-5
    assert kc.check_threshold("cpu", 130, 257, 2, 0.3, torch.float32, "cpu") <= 1e-5
    assert kc.check_input_linear("cpu", 101, 67, 2, 0.4, torch.float32, "cpu") <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.1, 0.0])
def test_predicted_ffn_equals_each_row_on_its_own_set(backend, rows, share_kept):
    err = kc.check_predicted(backend, 70, 33, rows, share_kept, torch.float32, "cpu", seed=rows)
    assert err <= kc.TOL[torch.float32], err


def test_predicted_ffn_rejects_mis_shaped_predictor():
    _, packed = kc.make_ffn(10, 4, torch.float32, "cpu", seed=0)
    with pytest.raises(InvalidArgumentError, match="pred_b must be"):
        predicted_ffn(torch.randn(1, 4), packed, torch.randn(1, 2), torch.randn(9, 2), torch.zeros(10), 0.0)
    with pytest.raises(InvalidArgumentError, match="z must be"):
        predicted_ffn(torch.randn(1, 4), packed, torch.randn(1, 3), torch.randn(10, 2), torch.zeros(10), 0.0)
