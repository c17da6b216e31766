"""The MoE prefill stream kernels (counting sort, row scatter, act-mul, combine) against torch oracles.

The counting sort must equal :func:`ffnkit.kernels.moe.sort_pairs` (a stable ``torch.argsort``) exactly,
including experts with no tokens, skewed routing, no-expert slots (index E) and sizes that span many
sort blocks; the row kernels must equal gathers written with torch indexing. Skipped without CUDA and
Triton; run on the accelerator machine:  python -m pytest -q tests/gpu/test_moe_stream_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from ffnkit.kernels.moe import sort_pairs
from tests import moe_cases as mc
from tests.gpu import NEEDS_CUDA_TRITON

pytestmark = NEEDS_CUDA_TRITON


@pytest.mark.parametrize("routing", mc.ROUTINGS)
@pytest.mark.parametrize("tokens,k,e", [(1, 1, 4), (7, 3, 5), (300, 4, 16), (4096, 8, 64), (9000, 8, 64)])
def test_counting_sort_equals_stable_argsort(tokens, k, e, routing):
    from ffnkit.kernels.moe_stream import sort_by_expert

    idx, _ = mc.routing(routing, tokens, k, e, tokens + k + e, "cuda")
    order, pos, counts, ends = sort_by_expert(idx, e)
    ref_order, ref_pos, ref_counts = sort_pairs(idx, e)
    assert torch.equal(order, ref_order)
    assert torch.equal(pos, ref_pos)
    assert torch.equal(counts, ref_counts)
    assert torch.equal(ends, torch.cumsum(ref_counts[:e], 0).to(torch.int32))


def test_counting_sort_skew_all_to_one_expert_and_empty_experts():
    """Every pair on the last expert (all others empty), across several sort blocks."""
    from ffnkit.kernels.moe_stream import sort_by_expert

    e = 64
    idx = torch.full((5000, 2), e - 1, device="cuda")
    order, pos, counts, ends = sort_by_expert(idx, e)
    assert torch.equal(order, torch.arange(10000, device="cuda"))
    assert counts[: e - 1].sum() == 0 and int(counts[e - 1]) == 10000 and int(counts[e]) == 0
    assert int(ends[0]) == 0 and int(ends[-1]) == 10000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_act_combine_equal_torch(dtype):
    from ffnkit.kernels.moe_stream import act_mul, combine_rows, scatter_rows, sort_by_expert

    t, k, e, f, d = 777, 4, 9, 96, 200  # D and F not multiples of the tiles
    idx, w = mc.routing("none", t, k, e, 5, "cuda")
    order, pos, _, _ = sort_by_expert(idx, e)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, d, device="cuda", generator=g).to(dtype)
    assert torch.equal(scatter_rows(x, pos, k), x[order // k])
    gu = torch.randn(t * k, 2 * f, device="cuda", generator=g).to(dtype)
    ref_h = (torch.nn.functional.silu(gu[:, :f].float()) * gu[:, f:].float()).to(dtype)
    assert mc.rel_err(act_mul(gu, 0), ref_h) < mc.TOL[dtype] / 4
    y = torch.randn(t * k, d, device="cuda", generator=g).to(dtype)
    keep = (idx < e).float() * w  # [T, K] pairs routed nowhere contribute nothing
    ref = (y.float()[pos].view(t, k, d) * keep.unsqueeze(-1)).sum(1)
    out = combine_rows(y, pos, idx, w, e)
    assert out.dtype == dtype and mc.rel_err(out, ref) < mc.TOL[dtype] / 4


def test_stream_stages_run_without_host_sync():
    from ffnkit.kernels.moe_stream import act_mul, combine_rows, scatter_rows, sort_by_expert

    idx, w = mc.routing("skewed", 64, 8, 64, 1, "cuda")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        order, pos, counts, ends = sort_by_expert(idx, 64)
        xs = scatter_rows(x, pos, 8)
        h = act_mul(torch.cat([xs, xs], 1), 0)
        combine_rows(h, pos, idx, w, 64)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
