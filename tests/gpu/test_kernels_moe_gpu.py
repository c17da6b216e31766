"""Every ``triton`` route of the expert executor equals the reference (float32, every expert on every token).

Skipped where CUDA or Triton is missing (CI has no GPU); run on the accelerator machine:
    python -m pytest -q tests/gpu/test_kernels_moe_gpu.py
"""

from __future__ import annotations

import zlib

import pytest
import torch

from ffnkit.kernels.moe import experts_forward
from tests import moe_cases as mc
from tests.gpu import NEEDS_CUDA_TRITON

pytestmark = NEEDS_CUDA_TRITON

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _route(name):
    from ffnkit.kernels import moe_triton

    return moe_triton.ROUTES[name]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("route", ["auto", "gather", "sorted", "grouped_mm", "fused_grouped_mm"])
@pytest.mark.parametrize("routing", mc.ROUTINGS)
@pytest.mark.parametrize("shape", mc.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_routes_equal_reference(shape, routing, route, dtype):
    from ffnkit.kernels import moe_triton

    dt = DTYPES[dtype]
    if route in ("grouped_mm", "fused_grouped_mm") and not moe_triton.grouped_mm_available(
        torch.zeros(1, device="cuda", dtype=dt)
    ):
        pytest.skip("torch grouped_mm runs on bf16 only")
    t, k, e, f, d = shape
    seed = zlib.crc32(repr((shape, routing, route, dtype)).encode()) % 10_000
    x, gu, dn = mc.make_experts(t, e, f, d, dt, "cuda", seed)
    idx, w = mc.routing(routing, t, k, e, seed + 1, "cuda")
    ref = experts_forward(x, gu, dn, idx, w, backend="reference")
    if route == "auto":
        out = experts_forward(x, gu, dn, idx, w, backend="triton")
    else:
        out = _route(route)(x, gu, dn, idx, w, "silu")
    torch.cuda.synchronize()
    assert out.shape == x.shape and out.dtype == dt
    assert mc.rel_err(out, ref) < mc.TOL[dt]


@pytest.mark.parametrize("act", mc.ACTS)
@pytest.mark.parametrize("route", ["gather", "sorted"])
def test_triton_activations(act, route):
    x, gu, dn = mc.make_experts(40, 6, 48, 64, torch.float32, "cuda", 3)
    idx, w = mc.routing("skewed", 40, 2, 6, 4, "cuda")
    ref = experts_forward(x, gu, dn, idx, w, act, backend="reference")
    assert mc.rel_err(_route(route)(x, gu, dn, idx, w, act), ref) < mc.TOL[torch.float32]


def test_olmoe_shape_bf16_all_routes_agree():
    """The benchmark's shape (hidden 2048, width 1024, 64 experts, top-8), 300 tokens, skewed routing."""
    x, gu, dn = mc.make_experts(300, 64, 1024, 2048, torch.bfloat16, "cuda", 5)
    idx, w = mc.routing("skewed", 300, 8, 64, 6, "cuda")
    ref = experts_forward(x, gu, dn, idx, w, backend="reference")
    for route in ("gather", "sorted", "grouped_mm", "fused_grouped_mm"):
        assert mc.rel_err(_route(route)(x, gu, dn, idx, w, "silu"), ref) < mc.TOL[torch.bfloat16], route


@pytest.mark.parametrize("routing", ["skewed", "few"])
@pytest.mark.parametrize(
    "tokens", [1100, 4200]
)  # auto takes tma on sm90+ (8,800 and 33,600 pairs), else the sorted route
def test_auto_large_batches_equal_reference(tokens, routing):
    """OLMoE shape at the sizes where auto leaves the sorted route; "few": 55 of 64 experts get no token."""
    from ffnkit.kernels import moe_triton

    if not moe_triton.grouped_mm_available(torch.zeros(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("torch grouped_mm runs on bf16 on compute capability >= 9 only")
    x, gu, dn = mc.make_experts(tokens, 64, 1024, 2048, torch.bfloat16, "cuda", tokens)
    idx, w = mc.routing(routing, tokens, 8, 64, tokens + 1, "cuda")
    ref = experts_forward(x, gu, dn, idx, w, backend="reference")
    out = experts_forward(x, gu, dn, idx, w, backend="triton")
    assert mc.rel_err(out, ref) < mc.TOL[torch.bfloat16]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_hf_models_on_gpu_equal_eager(family):
    from ffnkit.kernels.moe_hf import use_fast_experts
    from tests.tiny_models import tiny_inputs, tiny_model

    model = tiny_model(family).cuda()
    model.set_experts_implementation("eager")
    inputs = {k: v.cuda() for k, v in tiny_inputs(model, batch=2, seq=40).items()}
    with torch.no_grad():
        eager = model(**inputs).logits
        with use_fast_experts(model, backend="triton"):
            fast = model(**inputs).logits
    assert (fast - eager).abs().max() / eager.abs().max() < 1e-5
