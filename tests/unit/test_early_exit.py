"""Early exit: saturation layers, the threshold rule's extreme cases, and the lens against hidden states."""

from __future__ import annotations

import json

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.inspect.early_exit import (
    NEVER,
    LensTrajectory,
    apply_exit_rule,
    calibrate_threshold,
    early_exit,
    lens_trajectory,
)
from ffnkit.inspect.lens import Lens
from tests.tiny_models import L, V, tiny_model

LMS = ["llama", "gpt2", "opt", "phi3", "mixtral"]


def _ids(n: int = 3, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def test_saturation_by_hand():
    # 4 layers, 5 tokens; final top-1 = 7 everywhere
    top1 = torch.tensor(
        [
            [7, 1, 7, 1, 7],
            [7, 7, 1, 1, 7],
            [7, 7, 7, 1, 1],
            [7, 7, 7, 7, 1],
        ]
    )
    traj = LensTrajectory(top1=top1, prob=torch.rand(4, 5), final=torch.full((5,), 7))
    assert traj.saturation().tolist() == [1, 2, 3, 4, 5]  # 5 = never (even layer 4 disagrees)


def test_rule_extremes_on_synthetic_trajectory():
    top1 = torch.tensor([[1, 2, 3], [4, 2, 3], [4, 5, 6]])
    prob = torch.tensor([[0.2, 0.9, 0.5], [0.6, 0.3, 0.95], [0.99, 0.99, 0.99]])
    traj = LensTrajectory(top1, prob, final=torch.tensor([4, 5, 6]))
    zero = apply_exit_rule(traj, 0.0)
    assert zero.mean_exit_layer == 1.0 and zero.layers_saved == pytest.approx(2 / 3)
    assert zero.agreement == 0.0
    never = apply_exit_rule(traj, NEVER)
    assert never.layers_saved == 0.0 and never.agreement == 1.0 and never.mean_exit_layer == 3.0
    mid = apply_exit_rule(traj, 0.55)  # exits at layers 2, 1, 2 → predictions 4, 2, 3
    assert mid.mean_exit_layer == pytest.approx(5 / 3)
    assert mid.agreement == pytest.approx(1 / 3)
    assert mid.layers_saved == pytest.approx(((3 - 2) + (3 - 1) + (3 - 2)) / 3 / 3)
    cal = calibrate_threshold(traj, target=1.0)
    assert cal.agreement == 1.0 and cal.threshold == pytest.approx(0.96)  # first grid value > 0.95
    with pytest.raises(InvalidArgumentError, match="target"):
        calibrate_threshold(traj, target=1.5)


@pytest.mark.parametrize("family", LMS)
def test_lens_trajectory_on_models(family):
    model = tiny_model(family)
    ids = _ids()
    traj = lens_trajectory(model, ids, batch_size=2)
    assert traj.top1.shape == (L, ids.numel()) and traj.prob.shape == (L, ids.numel())
    # the lens after the last block is the model's own output
    assert torch.equal(traj.top1[-1], traj.final)
    # earlier layers: the lens of output_hidden_states (block outputs before the final norm)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    lens = Lens.of(model)
    for layer in range(L - 1):
        p = torch.softmax(lens.logits(out.hidden_states[layer + 1]), -1).reshape(-1, V)
        assert torch.equal(traj.top1[layer], p.argmax(-1))
        torch.testing.assert_close(traj.prob[layer], p.max(-1).values)
    assert torch.equal(traj.final, out.logits.argmax(-1).reshape(-1))
    zero = apply_exit_rule(traj, 0.0)
    assert zero.mean_exit_layer == 1.0
    assert zero.agreement == pytest.approx(float((traj.top1[0] == traj.final).double().mean()))
    never = apply_exit_rule(traj, NEVER)
    assert never.agreement == 1.0 and never.layers_saved == 0.0
    assert traj.saturation().max() <= L


def test_min_layer_and_stable_rules():
    top1 = torch.tensor([[9, 9, 3], [4, 5, 3], [4, 5, 6]])
    prob = torch.tensor([[0.9, 0.9, 0.9], [0.9, 0.9, 0.1], [0.9, 0.9, 0.9]])
    traj = LensTrajectory(top1, prob, final=torch.tensor([4, 5, 6]))
    assert apply_exit_rule(traj, 0.5).agreement == 0.0  # everyone exits at layer 1, wrongly
    later = apply_exit_rule(traj, 0.5, min_layer=2)  # exits at 2, 2, 3
    assert later.agreement == 1.0 and later.mean_exit_layer == pytest.approx(7 / 3)
    stable = apply_exit_rule(traj, 0.5, stable=True)  # layer 1 is never stable: exits at 3, 3, 3
    assert stable.mean_exit_layer == 3.0 and stable.agreement == 1.0
    best = calibrate_threshold(traj, target=1.0, search_min_layer=True)
    assert best.min_layer == 2 and best.agreement == 1.0
    assert best.layers_saved == pytest.approx(later.layers_saved)


def test_early_exit_end_to_end():
    model = tiny_model("llama")
    res = early_exit(model, _ids(4, 8, 1), _ids(3, 8, 2), target=0.9)
    assert set(res.rules) == {"confidence", "confidence_min_layer", "confidence_min_layer_stable"}
    for rule in res.rules.values():
        assert rule.calibration.agreement >= 0.9
        assert 0.0 <= rule.evaluation.layers_saved <= (L - 1) / L
        assert rule.evaluation.threshold == rule.threshold
    # a wider search can only save as much or more on the calibration split
    saved = [res.rules[n].calibration.layers_saved for n in res.rules]
    assert saved == sorted(saved)
    dist = res.saturation.distribution
    assert sum(r["tokens"] for r in dist) == 24
    assert res.saturation.oracle_layers_saved >= 0
    # the JSON shape: nested results become plain dicts, strict JSON
    doc = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert list(doc) == ["target_agreement", "rules", "saturation", "saturation_calibration", "anchor"]
    rule = doc["rules"]["confidence"]
    assert list(rule) == ["description", "threshold", "min_layer", "stable", "calibration", "evaluation"]
    assert rule["evaluation"]["layers_saved"] == res.rules["confidence"].evaluation.layers_saved


def test_not_applicable_models_fail_clearly():
    with pytest.raises(InvalidArgumentError, match="encoder-decoder"):
        lens_trajectory(tiny_model("t5"), _ids())
    with pytest.raises(InvalidArgumentError, match="head"):
        lens_trajectory(tiny_model("bert"), _ids())
