"""The expert-major C kernel of the ``cpu`` executor equals the reference (every expert on every token, float32).

Both of its tile shapes are forced in turn through ``CONFIGS["c_pack_min_tokens"]`` (1: every expert packed
16 tokens to a block; a huge value: dot tiles on the token rows in place), then left to choose. Skipped
cleanly when the C kernels cannot be built here (the torch paths are tested in test_kernels_moe.py).
"""

from __future__ import annotations

import pytest
import torch

from ffnkit.kernels import moe_cpu
from ffnkit.kernels.cpu_build import cpu_library_status
from ffnkit.kernels.moe import experts_forward
from tests import moe_cases as mc

MODES = {"dots": 1 << 30, "packed": 1, "default": None}


@pytest.fixture(autouse=True)
def _needs_c():
    if not cpu_library_status()["compiled"]:
        pytest.skip(f"C kernels not built here: {cpu_library_status()['error']}")


@pytest.fixture(params=list(MODES))
def mode(request, monkeypatch):
    if MODES[request.param] is not None:
        monkeypatch.setitem(moe_cpu.CONFIGS, "c_pack_min_tokens", MODES[request.param])
    return request.param


def _ref(x, gu, dn, idx, w, act="silu"):
    return experts_forward(x, gu, dn, idx, w, act, backend="reference")


@pytest.mark.parametrize("routing", mc.ROUTINGS)
@pytest.mark.parametrize("shape", mc.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_c_equals_reference(mode, routing, shape):
    x, gu, dn, idx, w = mc.case(mode, routing, shape)
    out = moe_cpu.c_experts(x, gu, dn, idx, w)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert mc.rel_err(out, _ref(x, gu, dn, idx, w)) < mc.TOL[torch.float32]


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 300])
def test_c_token_counts_odd_sizes(mode, tokens):
    """Odd hidden size and width (vector tails), E = 7, every block and tile remainder on the way to 300."""
    e, f, d, k = 7, 13, 37, 3
    x, gu, dn = mc.make_experts(tokens, e, f, d, torch.float32, "cpu", 100 + tokens)
    idx, w = mc.routing("skewed", tokens, k, e, 200 + tokens, "cpu")
    out = moe_cpu.c_experts(x, gu, dn, idx, w)
    assert mc.rel_err(out, _ref(x, gu, dn, idx, w)) < mc.TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("tokens", [1, 6, 40, 130])
def test_c_half_precision(mode, dtype, tokens):
    x, gu, dn = mc.make_experts(tokens, 6, 24, 40, dtype, "cpu", 5 + tokens)
    idx, w = mc.routing("skewed", tokens, 2, 6, 6 + tokens, "cpu")
    out = moe_cpu.c_experts(x, gu, dn, idx, w)
    assert out.dtype == dtype and mc.rel_err(out, _ref(x, gu, dn, idx, w)) < mc.TOL[dtype]


@pytest.mark.parametrize("act", mc.ACTS)
def test_c_activations(mode, act):
    x, gu, dn = mc.make_experts(45, 5, 16, 24, torch.float32, "cpu", 3)
    idx, w = mc.routing("uniform", 45, 2, 5, 4, "cpu")
    out = moe_cpu.c_experts(x, gu, dn, idx, w, act)
    assert mc.rel_err(out, _ref(x, gu, dn, idx, w, act)) < mc.TOL[torch.float32]


def test_c_silu_extreme_gates(mode):
    """The vector exp is clamped: gates of +-200 give silu = g and 0 (no inf or nan)."""
    x, gu, dn = mc.make_experts(20, 2, 8, 16, torch.float32, "cpu", 21)
    gu = gu * 400.0
    idx, w = mc.routing("uniform", 20, 1, 2, 22, "cpu")
    out = moe_cpu.c_experts(x, gu, dn, idx, w)
    assert torch.isfinite(out).all()
    assert mc.rel_err(out, _ref(x, gu, dn, idx, w)) < mc.TOL[torch.float32]


def test_c_no_expert_and_zero_weight_add_nothing(mode):
    x, gu, dn = mc.make_experts(24, 4, 8, 16, torch.float32, "cpu", 31)
    idx, w = mc.routing("uniform", 24, 2, 4, 32, "cpu")
    idx[0] = 4  # token 0: no expert in either slot
    w[1] = 0.0  # token 1: both weights 0
    idx[2, 0], w[2, 1] = 4, 0.0  # token 2: one slot of each kind
    x[2] = float("nan")  # a token that adds nothing is never read
    out = moe_cpu.c_experts(x, gu, dn, idx, w)
    assert out[:3].abs().max() == 0
    keep = slice(3, None)
    assert mc.rel_err(out[keep], _ref(x[keep], gu, dn, idx[keep], w[keep])) < mc.TOL[torch.float32]


def test_c_every_thread_count_gives_the_same_sums():
    """Threads split rows, never a sum: 1, 2 and 3 threads give the same bits."""
    x, gu, dn = mc.make_experts(70, 6, 20, 30, torch.float32, "cpu", 41)
    idx, w = mc.routing("skewed", 70, 3, 6, 42, "cpu")
    saved = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(moe_cpu.c_experts(x, gu, dn, idx, w))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert mc.rel_err(outs[0], _ref(x, gu, dn, idx, w)) < mc.TOL[torch.float32]


def test_executor_takes_the_c_kernel_and_falls_back(monkeypatch):
    x, gu, dn = mc.make_experts(12, 4, 8, 16, torch.float32, "cpu", 51)
    idx, w = mc.routing("uniform", 12, 2, 4, 52, "cpu")
    ref = _ref(x, gu, dn, idx, w)
    calls = []
    real = moe_cpu.c_experts
    monkeypatch.setattr(moe_cpu, "c_experts", lambda *a: calls.append(1) or real(*a))
    assert mc.rel_err(experts_forward(x, gu, dn, idx, w, backend="cpu"), ref) < mc.TOL[torch.float32]
    assert calls == [1]
    # non-contiguous experts (a transposed view) and sizes above c_max_pairs take the torch paths
    gu_t = gu.transpose(1, 2).contiguous().transpose(1, 2)
    out = experts_forward(x, gu_t, dn, idx, w, backend="cpu")
    monkeypatch.setitem(moe_cpu.CONFIGS, "c_max_pairs", 4)
    out2 = experts_forward(x, gu, dn, idx, w, backend="cpu")
    monkeypatch.setattr(moe_cpu, "load_cpu_library", lambda: None)  # no compiler
    monkeypatch.setitem(moe_cpu.CONFIGS, "c_max_pairs", 1 << 62)
    out3 = experts_forward(x, gu, dn, idx, w, backend="cpu")
    assert calls == [1]
    for o in (out, out2, out3):
        assert mc.rel_err(o, ref) < mc.TOL[torch.float32]


def test_router_gradients_take_the_torch_path(monkeypatch):
    """The C kernel has no backward: router weights that want gradients (router training) take the sorted
    torch path, whose weighted sum keeps them."""
    x, gu, dn = mc.make_experts(10, 4, 8, 16, torch.float32, "cpu", 61)
    idx, w = mc.routing("uniform", 10, 2, 4, 62, "cpu")
    monkeypatch.setattr(moe_cpu, "c_experts", lambda *a: pytest.fail("C kernel used with gradients"))
    w = w.clone().requires_grad_(True)
    experts_forward(x, gu, dn, idx, w, backend="cpu").square().sum().backward()
    w_ref = w.detach().clone().requires_grad_(True)
    _ref(x, gu, dn, idx, w_ref).square().sum().backward()
    assert torch.allclose(w.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
