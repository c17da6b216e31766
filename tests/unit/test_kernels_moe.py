"""Every CPU path of the expert executor equals the reference (every expert on every token, float32)."""

from __future__ import annotations

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels import moe_cpu
from ffnkit.kernels.moe import experts_cost, experts_forward
from tests import moe_cases as mc

PATHS = {"auto": None, "gather": moe_cpu.gather_experts, "sorted": moe_cpu.sorted_experts}


def _run(path, x, gu, dn, idx, w, act="silu"):
    if path == "auto":
        return experts_forward(x, gu, dn, idx, w, act, backend="cpu")
    return PATHS[path](x, gu, dn, idx, w, act)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("routing", mc.ROUTINGS)
@pytest.mark.parametrize("shape", mc.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_paths_equal_reference(path, routing, shape):
    x, gu, dn, idx, w = mc.case(path, routing, shape)
    ref = experts_forward(x, gu, dn, idx, w, backend="reference")
    out = _run(path, x, gu, dn, idx, w)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert mc.rel_err(out, ref) < mc.TOL[torch.float32]


@pytest.mark.parametrize("act", mc.ACTS)
@pytest.mark.parametrize("path", ["gather", "sorted"])
def test_cpu_activations(act, path):
    x, gu, dn = mc.make_experts(9, 5, 16, 24, torch.float32, "cpu", 3)
    idx, w = mc.routing("uniform", 9, 2, 5, 4, "cpu")
    ref = experts_forward(x, gu, dn, idx, w, act, backend="reference")
    assert mc.rel_err(_run(path, x, gu, dn, idx, w, act), ref) < mc.TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cpu_half_precision(dtype):
    x, gu, dn = mc.make_experts(40, 6, 32, 48, dtype, "cpu", 5)
    idx, w = mc.routing("skewed", 40, 2, 6, 6, "cpu")
    ref = experts_forward(x, gu, dn, idx, w, backend="reference")
    for path in ("gather", "sorted"):
        out = _run(path, x, gu, dn, idx, w)
        assert out.dtype == dtype and mc.rel_err(out, ref) < mc.TOL[dtype]


def test_reference_matches_a_per_pair_loop():
    """The oracle itself against the definition, pair by pair (no shared code with either)."""
    x, gu, dn = mc.make_experts(6, 5, 8, 12, torch.float64, "cpu", 7)
    idx, w = mc.routing("none", 6, 3, 5, 8, "cpu")
    y = torch.zeros_like(x)
    for t in range(6):
        for j in range(3):
            ex = int(idx[t, j])
            if ex == 5:
                continue
            g, u = gu[ex, :8] @ x[t], gu[ex, 8:] @ x[t]
            y[t] += float(w[t, j]) * (dn[ex] @ (torch.nn.functional.silu(g) * u))
    ref = experts_forward(x, gu, dn, idx, w.double(), backend="reference")
    assert torch.allclose(ref, y, atol=1e-5)
    assert ref[0].abs().max() == 0  # token 0 routed nowhere


def test_batch_shapes_and_int32_index():
    x, gu, dn = mc.make_experts(12, 4, 8, 16, torch.float32, "cpu", 9)
    idx, w = mc.routing("uniform", 12, 2, 4, 10, "cpu")
    flat = experts_forward(x, gu, dn, idx, w, backend="reference")
    out = experts_forward(x.view(3, 4, 16), gu, dn, idx.int().view(3, 4, 2), w.view(3, 4, 2), backend="cpu")
    assert out.shape == (3, 4, 16)
    assert mc.rel_err(out.reshape(12, 16), flat) < mc.TOL[torch.float32]


def test_one_expert_everything_equals_dense_ffn():
    x, gu, dn = mc.make_experts(20, 3, 8, 16, torch.float32, "cpu", 11)
    idx = torch.full((20, 1), 2)
    w = torch.ones(20, 1)
    dense = (torch.nn.functional.silu(x @ gu[2, :8].T) * (x @ gu[2, 8:].T)) @ dn[2].T
    for backend in ("reference", "cpu"):
        assert torch.allclose(experts_forward(x, gu, dn, idx, w, backend=backend), dense, atol=1e-5)


def test_bad_input_one_line_errors():
    x, gu, dn = mc.make_experts(4, 3, 8, 16, torch.float32, "cpu", 12)
    idx, w = mc.routing("uniform", 4, 2, 3, 13, "cpu")
    cases = [
        (x, gu[:, :7], dn, idx, w, "silu"),  # odd 2F
        (x, gu, dn[:, :, :5], idx, w, "silu"),  # down width
        (x[:, :5], gu, dn, idx, w, "silu"),  # hidden size
        (x.double(), gu, dn, idx, w, "silu"),  # dtype
        (x, gu, dn, idx.float(), w, "silu"),  # index dtype
        (x, gu, dn, idx, w[:, :1], "silu"),  # weights shape
        (x, gu, dn, idx + 5, w, "silu"),  # out of range
        (x, gu, dn, idx, w, "tanh"),  # activation
    ]
    for args in cases:
        with pytest.raises(InvalidArgumentError) as err:
            experts_forward(*args, backend="cpu")
        assert "\n" not in str(err.value)
    with pytest.raises(InvalidArgumentError):
        experts_forward(x, gu, dn, idx, w, backend="triton")  # CPU tensors


def test_empty_inputs_and_cost():
    x, gu, dn = mc.make_experts(0, 3, 8, 16, torch.float32, "cpu", 14)
    out = experts_forward(x, gu, dn, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), backend="cpu")
    assert out.shape == (0, 16)
    cost = experts_cost(4, torch.tensor([[0, 3], [0, 1], [3, 3], [1, 0]]), 3, 16, 8, 2, 4)
    assert cost["active_experts"] == 2 and cost["weight_bytes"] == 2 * 3 * 16 * 8 * 4
    assert cost["flops"] == 4 * 2 * 6 * 16 * 8
