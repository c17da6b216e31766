"""The ``tma`` prefill route (persistent TMA grouped GEMMs, :mod:`ffnkit.kernels.moe_tma`) against the reference.

Fresh random experts, inputs and routing per case (every routing scenario of tests/moe_cases.py: skewed,
experts with no token, no-expert slots, zero weights, one expert twice per token), every launch variant
(gathered or permuted input rows, combine or atomics, flattened loops, small and large tiles). Needs an
sm90+ GPU; skipped elsewhere. Run on the accelerator machine:  python -m pytest -q tests/gpu/test_moe_tma_gpu.py
"""

from __future__ import annotations

import zlib

import pytest
import torch

from ffnkit.kernels.moe import experts_forward
from tests import moe_cases as mc
from tests.gpu import NEEDS_CUDA_TRITON

pytestmark = [
    *NEEDS_CUDA_TRITON,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs sm90+ (TMA)"
    ),
]

SMALL = {
    "gate_up": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2, "num_warps": 4, "num_stages": 3,
                "FLATTEN": False, "GATHER": True},
    "down": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3,
             "FLATTEN": False, "ATOMIC": False},
}  # fmt: skip
VARIANTS = {
    "default": {},
    "permuted": {"gate_up": {"GATHER": False}},
    "atomic": {"down": {"ATOMIC": True}},
    "flatten": {"gate_up": {"FLATTEN": True}, "down": {"FLATTEN": True}},
    "joint": {"gate_up": {"JOINT": True}},
    "joint_permuted": {"gate_up": {"JOINT": True, "GATHER": False}},
    "one_tile_per_program": {"gate_up": {"PERSISTENT": False}, "down": {"PERSISTENT": False}},
    "two_loads": {"gate_up": {"JOINT": False}},
}
# (tokens, K, E, F, D): tiles that divide F and D; one token; many row blocks per expert; the OLMoE shape
SHAPES = [(1, 2, 4, 128, 256), (37, 3, 6, 256, 256), (700, 4, 16, 128, 512), (2100, 8, 64, 1024, 2048)]


def _configs(base: dict, variant: str) -> dict:
    over = VARIANTS[variant]
    return {part: {**base[part], **over.get(part, {})} for part in ("gate_up", "down")}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("routing", mc.ROUTINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tma_route_equals_reference(shape, routing, tiles, variant):
    from ffnkit.kernels.moe_tma import TMA_CONFIGS, tma_experts, tma_supported

    t, k, e, f, d = shape
    cfg = _configs(SMALL if tiles == "small" else TMA_CONFIGS, variant)
    seed = zlib.crc32(repr((shape, routing, tiles, variant)).encode()) % 10_000
    x, gu, dn = mc.make_experts(t, e, f, d, torch.bfloat16, "cuda", seed)
    if not tma_supported(x, gu, cfg):
        pytest.skip("tiles do not divide this shape")
    if t > 1000 and (tiles, variant) != ("default", "default") and routing not in ("skewed", "none"):
        pytest.skip("the OLMoE shape: every variant on two routings, the defaults on all (time)")
    idx, w = mc.routing(routing, t, k, e, seed + 1, "cuda")
    ref = experts_forward(x, gu, dn, idx, w, backend="reference")
    out = tma_experts(x, gu, dn, idx, w, configs=cfg)
    torch.cuda.synchronize()
    assert out.shape == x.shape and out.dtype == x.dtype
    assert mc.rel_err(out, ref) < mc.TOL[torch.bfloat16]


@pytest.mark.parametrize("act", mc.ACTS)
def test_tma_activations(act):
    from ffnkit.kernels.moe_tma import tma_experts

    x, gu, dn = mc.make_experts(300, 8, 128, 256, torch.bfloat16, "cuda", 11)
    idx, w = mc.routing("skewed", 300, 2, 8, 12, "cuda")
    ref = experts_forward(x, gu, dn, idx, w, act, backend="reference")
    assert mc.rel_err(tma_experts(x, gu, dn, idx, w, act), ref) < mc.TOL[torch.bfloat16]


def test_tma_all_pairs_on_one_expert_and_no_host_sync():
    """Every pair on the last expert (63 experts empty), captured without a host sync."""
    from ffnkit.kernels.moe_tma import tma_experts

    x, gu, dn = mc.make_experts(1000, 64, 1024, 2048, torch.bfloat16, "cuda", 13)
    idx = torch.full((1000, 2), 63, device="cuda")
    w = torch.full((1000, 2), 0.5, device="cuda")
    ref = experts_forward(x, gu, dn, idx, w, backend="reference")
    tma_experts(x, gu, dn, idx, w)  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = tma_experts(x, gu, dn, idx, w)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert mc.rel_err(out, ref) < mc.TOL[torch.bfloat16]


def test_tma_route_captures_in_a_cuda_graph_and_replays_new_inputs():
    """Captured once, replayed on new inputs and routing copied into the static tensors: equals eager."""
    from ffnkit.kernels.moe_tma import tma_experts

    t, k, e, f, d = 600, 4, 16, 128, 512
    x, gu, dn = mc.make_experts(t, e, f, d, torch.bfloat16, "cuda", 21)
    idx, w = mc.routing("skewed", t, k, e, 22, "cuda")
    static = [x.clone(), idx.clone(), w.clone()]
    tma_experts(static[0], gu, dn, static[1], static[2])  # compile before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tma_experts(static[0], gu, dn, static[1], static[2])
    x2, _, _ = mc.make_experts(t, e, f, d, torch.bfloat16, "cuda", 23)
    idx2, w2 = mc.routing("few", t, k, e, 24, "cuda")
    for dst, src in zip(static, (x2, idx2, w2), strict=True):
        dst.copy_(src)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, tma_experts(x2, gu, dn, idx2, w2))
