"""LoRAP keeps the lowest-scored 1% of each layer's neurons and removes the next-lowest (its reference code)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from ffnkit import find_ffns
from ffnkit.compress import PruneConfig, allocate, prune_
from ffnkit.compress.prune import _keep_index
from ffnkit.compress.score_functions import SCORES
from ffnkit.compress.scores import collect_stats, lowest_protected, neuron_scores
from ffnkit.core.errors import InvalidArgumentError
from tests.tiny_models import DEC, V

CALIB = torch.randint(3, V, (4, 16), generator=torch.Generator().manual_seed(5))


def _wide_llama(d_ff: int = 200) -> torch.nn.Module:
    """A tiny llama whose FFNs are wide enough for ⌊0.01 · d_ff⌋ ≥ 1 (200 neurons: 2 protected)."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**DEC, "intermediate_size": d_ff}))
    return model.float().eval()


def test_lowest_protected_marks_the_floor_of_one_percent():
    score = torch.randn(250, generator=torch.Generator().manual_seed(0))
    mask = lowest_protected(score, 0.01)  # ⌊2.5⌋ = 2
    assert mask.dtype == torch.bool and int(mask.sum()) == 2
    assert set(mask.nonzero().flatten().tolist()) == set(torch.argsort(score)[:2].tolist())
    assert not lowest_protected(score[:99], 0.01).any()  # ⌊0.99⌋ = 0: nothing protected
    keep_lowest = {e.name: e.meta["keep_lowest"] for e in SCORES.entries() if "keep_lowest" in e.meta}
    assert keep_lowest == {"lorap": 0.01}


def test_keep_index_removes_what_the_reference_slice_removes():
    """Reference: removed = sort(score).indices[⌊0.01·n⌋ : ⌊0.01·n⌋ + r] (r neurons pruned)."""
    n, r = 300, 90
    score = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    order = torch.sort(score).indices
    expected = set(order[3 : 3 + r].tolist())  # skip the 3 lowest, remove the next 90
    kept = _keep_index(score, n - r, lowest_protected(score, 0.01))
    removed = set(range(n)) - set(kept.tolist())
    assert removed == expected
    assert torch.equal(kept, torch.sort(kept).values)  # original order
    plain = set(range(n)) - set(_keep_index(score, n - r).tolist())
    assert plain == set(order[:r].tolist()) and plain != expected  # without protection: the 90 lowest


def test_config_defaults_to_one_percent_for_lorap_only():
    assert PruneConfig("lorap", 0.3).lowest_share == 0.01
    assert PruneConfig("flap", 0.3).lowest_share == 0.0
    assert PruneConfig("lorap", 0.3, keep_lowest=0.0).lowest_share == 0.0
    assert PruneConfig("wanda-sp", 0.3, keep_lowest=0.02).lowest_share == 0.02
    with pytest.raises(InvalidArgumentError, match="keep_lowest"):
        PruneConfig("lorap", 0.3, keep_lowest=1.5)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prune_lorap_keeps_its_lowest_scored_neurons(allocation):
    model = _wide_llama()
    stats = collect_stats(model, CALIB)
    before = {}
    for f in find_ffns(model):
        s = neuron_scores("lorap", f, stats)
        low = torch.argsort(s)[:2]  # ⌊0.01 · 200⌋ = 2 protected
        before[f.index] = f.W_out.detach()[:, low].clone()  # [d, 2]: the protected value vectors
    report = prune_(model, PruneConfig("lorap", 0.3, allocation=allocation), stats=stats)
    assert 0.25 < report.ffn_ratio_removed < 0.35
    for f in find_ffns(model):
        assert f.d_ff < 200
        w = f.W_out.detach()  # [d, k]
        for col in before[f.index].T:
            assert (w == col[:, None]).all(0).any(), "a protected (lowest-scored) neuron was removed"

    # the same pruning without LoRAP's detail removes exactly those lowest-scored neurons
    plain = _wide_llama()
    prune_(plain, PruneConfig("lorap", 0.3, allocation=allocation, keep_lowest=0.0), stats=stats)
    for f in find_ffns(plain):
        w = f.W_out.detach()
        assert not any((w == col[:, None]).all(0).any() for col in before[f.index].T)


def test_global_allocation_never_spends_protected_neurons():
    s0 = torch.tensor([0.0, 0.0] + [10.0] * 8)  # two far-low neurons, both protected
    s1 = torch.tensor([0.0] * 9 + [100.0])
    scores, costs = {(0, None): s0, (1, None): s1}, {(0, None): 1, (1, None): 1}
    prot = {(0, None): torch.tensor([True, True] + [False] * 8)}
    assert allocate(scores, costs, 2, "global") == {(0, None): 8, (1, None): 10}
    assert allocate(scores, costs, 2, "global", protected=prot) == {(0, None): 10, (1, None): 8}
