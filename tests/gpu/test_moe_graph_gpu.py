"""The triton expert executor runs without a host sync, captures in a CUDA graph and replays exactly.

Each route is captured once on static buffers, then fresh inputs and routings are copied into those
buffers and the graph replayed: the output equals (bit for bit) the same route launched eagerly on those
inputs, and the float32 reference within the stated tolerance. Skipped without CUDA and Triton; run on the
accelerator machine:  python -m pytest -q tests/gpu/test_moe_graph_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from ffnkit.kernels.moe import experts_forward
from tests import moe_cases as mc
from tests.gpu import NEEDS_CUDA_TRITON

pytestmark = NEEDS_CUDA_TRITON

E, F, D, K = 16, 256, 512, 4


def _fn(route):
    from ffnkit.kernels import moe_triton

    if route == "auto":
        return lambda x, gu, dn, idx, w: experts_forward(x, gu, dn, idx, w, backend="triton")
    return lambda x, gu, dn, idx, w: moe_triton.ROUTES[route](x, gu, dn, idx, w, "silu")


def _capture(fn, static):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)  # warm-up (compilation) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*static)
    return g, out


@pytest.mark.parametrize("tokens", [1, 16, 40])  # 4 pairs: gather; 64 and 160 pairs: the sorted route (auto)
@pytest.mark.parametrize("route", ["auto", "gather", "sorted", "grouped_mm", "fused_grouped_mm"])
def test_routes_capture_and_replay_exactly(route, tokens):
    from ffnkit.kernels import moe_triton

    dt = torch.bfloat16
    if route in ("grouped_mm", "fused_grouped_mm") and not moe_triton.grouped_mm_available(
        torch.zeros(1, device="cuda", dtype=dt)
    ):
        pytest.skip("torch grouped_mm runs on bf16 on compute capability >= 9 only")
    fn = _fn(route)
    x, gu, dn = mc.make_experts(tokens, E, F, D, dt, "cuda", 11 + tokens)
    idx, w = mc.routing("skewed", tokens, K, E, 12 + tokens, "cuda")
    static = [x.clone(), gu, dn, idx.clone(), w.clone()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the route raises here
    try:
        fn(*static)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g, out = _capture(fn, static)
    for r, kind in enumerate(("uniform", "none", "few")):  # fresh inputs, incl. no-expert slots, idle experts
        x2 = torch.randn(tokens, D, generator=torch.Generator().manual_seed(r)).to("cuda", dt)
        idx2, w2 = mc.routing(kind, tokens, K, E, 100 + r, "cuda")
        static[0].copy_(x2)
        static[3].copy_(idx2)
        static[4].copy_(w2)
        g.replay()
        torch.cuda.synchronize()
        eager = fn(x2, gu, dn, idx2, w2)
        assert torch.equal(out, eager), (route, tokens, kind)
        ref = experts_forward(x2, gu, dn, idx2, w2, backend="reference")
        assert mc.rel_err(out, ref) < mc.TOL[dt], (route, tokens, kind)


def test_hf_experts_module_on_ffnkit_captures():
    """An OLMoE experts module switched to ffnkit (decode, 1 token) in a graph equals transformers' eager."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    from ffnkit.kernels.moe_hf import use_fast_experts

    cfg = OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                      num_hidden_layers=1, vocab_size=32)  # fmt: skip
    m = OlmoeExperts(cfg)
    _, gu, dn = mc.make_experts(1, E, F, D, torch.float32, "cpu", 3)
    with torch.no_grad():
        m.gate_up_proj.copy_(gu)
        m.down_proj.copy_(dn)
    m = m.cuda().requires_grad_(False)
    x = torch.randn(1, D, device="cuda")
    idx, w = mc.routing("uniform", 1, K, E, 4, "cuda")
    static = [x.clone(), idx.clone(), w.clone()]
    with torch.no_grad():
        m.config._experts_implementation = "eager"
        use_fast_experts(m, backend="triton")
        g, out = _capture(lambda *a: m(*a), static)
        for r in range(3):
            x2 = torch.randn(1, D, device="cuda")
            idx2, w2 = mc.routing("skewed", 1, K, E, 20 + r, "cuda")
            for s, v in zip(static, (x2, idx2, w2), strict=True):
                s.copy_(v)
            g.replay()
            m.config._experts_implementation = "eager"
            ref = m(x2, idx2, w2)
            m.config._experts_implementation = "ffnkit"
            assert mc.rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("tokens", [1, 40])
def test_moe_block_decode_step_captures(tokens):
    """ffnkit's own MoE block (router, experts, shared expert) syncs nowhere and replays in a graph as eager
    (cuBLAS may pick another kernel for the router and shared expert inside a capture: 1e-3, not bitwise)."""
    from ffnkit.modules.moe import MoEBlock

    block = MoEBlock(D, F, E, K, shared=64, dtype=torch.bfloat16, device="cuda").eval()
    g0 = torch.Generator(device="cuda").manual_seed(7)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g0, device="cuda") / p.shape[-1] ** 0.5)
    x = torch.randn(1, tokens, D, device="cuda", dtype=torch.bfloat16)
    static = [x.clone()]
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            block(*static)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        g, out = _capture(lambda a: block(a), static)
        for r in range(3):
            x2 = torch.randn(1, tokens, D, device="cuda", dtype=torch.bfloat16, generator=g0)
            static[0].copy_(x2)
            g.replay()
            torch.cuda.synchronize()
            assert mc.rel_err(out, block(x2)) < 1e-3, r
