"""One definition of an active neuron (core.criteria), used by every part of ffnkit that counts them."""

from __future__ import annotations

import pytest
import torch

from ffnkit import capture, find_ffns
from ffnkit.core.criteria import ACTIVE_THRESHOLD, active, relative_magnitude
from tests.tiny_models import V, tiny_model


def test_rule_by_hand():
    m = torch.tensor([[4.0, -2.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]])  # token 0: mean |m| = 1.525
    assert active(m).tolist() == [[True, True, False, False], [False] * 4]
    assert active(m, threshold=2.0).tolist()[0] == [True, False, False, False]  # |m| > 3.05
    assert active(m, threshold=0.0).tolist()[0] == [True, True, True, False]  # ReLU-style "m != 0"
    rel = relative_magnitude(m)
    torch.testing.assert_close(rel[0], torch.tensor([4, 2, 0.1, 0], dtype=torch.float64) / 1.525)
    assert rel[1].tolist() == [0.0] * 4  # an all-zero token: nothing active, no division by zero
    assert ACTIVE_THRESHOLD == 0.1


def _raw_post(model, ids):
    with torch.no_grad(), capture(model, sites="post") as cap:
        model(input_ids=ids)
    return {i: cap["post", i].double().reshape(-1, cap["post", i].shape[-1]) for i in cap.layers}


def _oracle(raw: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Firing rate per neuron, the rule written out: |m_i| > threshold × mean_j |m_j| per token."""
    return (raw.abs() > threshold * raw.abs().mean(1, keepdim=True)).double().mean(0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_firing_rate_in_ffnkit_is_the_one_rule(family):
    from ffnkit.compress.scores import collect_stats, neuron_scores
    from ffnkit.inspect.contrast import set_stats
    from ffnkit.inspect.stats import neuron_stats
    from ffnkit.report.stats import activation_stats

    model = tiny_model(family)
    ids = torch.randint(3, V, (4, 7), generator=torch.Generator().manual_seed(0))
    raw = _raw_post(model, ids)
    ffns = find_ffns(model)
    stats = neuron_stats(model, ids, batch_size=2).layers
    sets = set_stats(model, list(ids)).neurons
    pruning = collect_stats(model, ids, ffns, batch_size=2)
    report = activation_stats(model, ffns, ids, progress=False)
    for f in ffns:
        want = _oracle(raw[f.index])
        torch.testing.assert_close(stats[f.index]["firing_rate"], want)  # ffnkit inspect stats
        torch.testing.assert_close(sets[f.index]["firing_rate"], want)  # ffnkit inspect contrast
        torch.testing.assert_close(neuron_scores("frequency", f, pruning), want)  # the pruning score
        row = report[f.index]
        assert row["firing_site"] == "post"
        assert row["mean_firing_rate"] == pytest.approx(float(want.mean()))  # the report
        # sparsity@eps = share of entries inactive at threshold eps (read off a histogram: ~1e-2)
        for eps in (0.01, 0.1, 0.5):
            inactive = 1 - float(_oracle(raw[f.index], eps).mean())
            assert row["activation_sparsity"][f"{eps:g}"] == pytest.approx(inactive, abs=0.02)
