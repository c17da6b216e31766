"""The sync-free pair sort (CUDA-graph capturable) and the benchmark's like-for-like comparison, on CPU."""

from __future__ import annotations

import pytest
import torch

from ffnkit.kernels.moe import sort_pairs
from ffnkit.kernels.moe_graph import compare_like_for_like, target_summary
from tests import moe_cases as mc


@pytest.mark.parametrize("kind", mc.ROUTINGS)
@pytest.mark.parametrize("t,k,e", [(1, 2, 4), (33, 3, 6), (300, 4, 16)])
def test_sort_pairs_against_python_oracle(kind, t, k, e):
    idx, _ = mc.routing(kind, t, k, e, seed=t + k + e, device="cpu")
    order, pos, counts = sort_pairs(idx, e)
    flat = idx.reshape(-1).tolist()
    # oracle: a stable sort of (expert, pair id) in plain Python, counts by counting
    expect_order = sorted(range(len(flat)), key=lambda p: (flat[p], p))
    assert order.tolist() == expect_order
    assert counts.tolist() == [flat.count(j) for j in range(e + 1)]
    assert [expect_order[r] for r in pos.tolist()] == list(range(len(flat)))  # order[pos[p]] == p


def test_sort_pairs_shapes_do_not_depend_on_the_routing():
    a = sort_pairs(torch.zeros(5, 2, dtype=torch.long), 8)  # every pair on expert 0
    b = sort_pairs(torch.full((5, 2), 8), 8)  # every pair on no expert
    assert (
        [x.shape for x in a] == [x.shape for x in b] == [torch.Size([10]), torch.Size([10]), torch.Size([9])]
    )
    assert b[2].tolist() == [0] * 8 + [10]


def _row(tokens, us, graph_us, capture, bw=10.0, comp=1.0):
    return {
        "routing": "uniform",
        "tokens": tokens,
        "us": us,
        "graph_us": graph_us,
        "capture": capture,
        "bandwidth_floor_us": bw,
        "compute_floor_us": comp,
    }


def test_like_for_like_uses_graph_only_where_both_captured():
    row = _row(
        1,
        us={"eager": 3000.0, "batched_mm": 300.0, "grouped_mm": 700.0, "ffnkit": 180.0},
        graph_us={"batched_mm": 90.0, "grouped_mm": 120.0, "ffnkit": 30.0},
        capture={"eager": "not capturable: x", "batched_mm": "captured", "grouped_mm": "captured"},
    )
    cmp = compare_like_for_like(row, ("eager", "batched_mm", "grouped_mm"))
    assert cmp["per_implementation"]["eager"]["mode"] == "eager"
    assert cmp["per_implementation"]["eager"]["speedup"] == pytest.approx(3000 / 180)
    assert cmp["per_implementation"]["batched_mm"]["mode"] == "graph"
    assert (cmp["best"], cmp["mode"], cmp["speedup"]) == ("batched_mm", "graph", pytest.approx(3.0))


def test_like_for_like_falls_back_to_eager_when_ffnkit_did_not_capture():
    row = _row(16, us={"grouped_mm": 500.0, "ffnkit": 250.0}, graph_us={"grouped_mm": 100.0}, capture={})
    cmp = compare_like_for_like(row, ("grouped_mm",))
    assert (cmp["mode"], cmp["speedup"]) == ("eager", pytest.approx(2.0))


def test_target_summary_states_reached_and_missed():
    small = _row(
        1, {"grouped_mm": 500.0, "ffnkit": 250.0}, {"grouped_mm": 100.0, "ffnkit": 40.0}, {}, bw=10.0
    )
    small["like_for_like"] = compare_like_for_like(small, ("grouped_mm",))
    big = _row(4096, {"grouped_mm": 2000.0, "ffnkit": 2500.0}, {}, {}, bw=100.0, comp=1000.0)
    big["like_for_like"] = compare_like_for_like(big, ("grouped_mm",))
    s, b = target_summary({"results": [small, big]})
    assert s["bandwidth_floor"] == {"ratio": 4.0, "target": 3.0, "reached": False}
    assert (
        s["faster_than_transformers_best"]["reached"]
        and s["faster_than_transformers_best"]["mode"] == "graph"
    )
    assert "compute_floor" not in s and "bandwidth_floor" not in b
    assert (
        b["ffnkit_mode"] == "eager"
        and b["compute_floor"]["ratio"] == 2.5
        and not b["compute_floor"]["reached"]
    )
    assert not b["faster_than_transformers_best"]["reached"]


def test_route_thresholds_follow_the_fastest_route_per_size():
    from ffnkit.kernels.moe_bench import route_thresholds

    # graph times (us) shaped like the H200 sweep: gather at 1, sorted at 16/128, fused at 1,024, grouped_mm above
    times = {
        1: {"gather": 42, "sorted": 50, "grouped_mm": 80, "fused_grouped_mm": 74},
        16: {"gather": 270, "sorted": 187, "grouped_mm": 290, "fused_grouped_mm": 263},
        128: {"gather": 1734, "sorted": 245, "grouped_mm": 323, "fused_grouped_mm": 284},
        1024: {"sorted": 383, "grouped_mm": 430, "fused_grouped_mm": 375},
        4096: {"sorted": 1036, "grouped_mm": 901, "fused_grouped_mm": 906},
        16384: {"sorted": 3614, "grouped_mm": 3089, "fused_grouped_mm": 3237},
    }
    got = route_thresholds(times, 8)
    never = 1 << 62  # no tma timings: the tma route is never taken
    assert got == {
        "gather_max_pairs": 8,
        "tma_min_pairs": never,
        "fused_min_pairs": 8192,
        "grouped_mm_min_pairs": 32768,
    }
    times[1024]["fused_grouped_mm"] = 390  # slower than sorted: the fused route is never taken
    assert route_thresholds(times, 8)["fused_min_pairs"] == 32768
    times[4096]["fused_grouped_mm"] = 800  # fused beats grouped_mm at 4,096: grouped_mm only from 16,384
    got = route_thresholds(times, 8)
    assert got["grouped_mm_min_pairs"] == 131072 and got["fused_min_pairs"] == 32768
    # tma fastest at 4,096 and 16,384 tokens but not at 1,024: taken from 4,096 tokens (32,768 pairs)
    times[1024]["tma"], times[4096]["tma"], times[16384]["tma"] = 400, 790, 2870
    assert route_thresholds(times, 8)["tma_min_pairs"] == 32768
    times[128]["tma"] = 200  # a faster small size below a slower one does not count: only from the top down
    assert route_thresholds(times, 8)["tma_min_pairs"] == 32768
