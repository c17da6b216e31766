"""Every sparsity rule calibrates, runs and saves on a CUDA device (the frontier's ``--device cuda`` path).

Skipped without CUDA; run on the accelerator machine: ``python -m pytest -q tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

from ffnkit.core.archs import find_ffns
from ffnkit.modules.sparse_ffn import SparseFFN
from ffnkit.sparsity import SparsityConfig, sparsify_
from tests.tiny_models import V, tiny_inputs, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RULES = ["teal", "best", "cats", "chess", "stat-topk", "predictor"]


def _ids(seed: int, n: int = 16, t: int = 32) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _config(rule: str, sparsity: float, **kw) -> SparsityConfig:
    small = dict(samples=16, seq_len=32, tokens=512, path_tokens=128, probe_windows=2, predictor_rank=4)
    return SparsityConfig(rule, sparsity, **{**small, "predictor_steps": 30, **kw})


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_calibrates_on_the_gpu_to_its_target(rule):
    model = tiny_model("llama").cuda()
    result = sparsify_(model, _config(rule, 0.4), calibration=_ids(0), heldout=_ids(1, n=8))
    assert all(isinstance(f.module, SparseFFN) for f in find_ffns(model))
    assert abs(result.measured["bytes_skipped"] - 0.4) <= 0.02, result.measured["bytes_skipped"]


def test_best_heal_on_the_gpu_saves_and_reloads(tmp_path):
    from ffnkit.io import load, save

    model = tiny_model("llama").cuda()
    config = _config("best", 0.5, heal_minutes=1.0, heal_steps=5, heal_lr=1e-3)
    result = sparsify_(model, config, calibration=_ids(0))
    assert result.heal["steps"] == 5 and result.heal["loss_curve"][0] > 1e-6
    inputs = {k: v.cuda() for k, v in tiny_inputs(model).items()}
    with torch.no_grad():
        want = model(**inputs).logits
    save(model, None, tmp_path / "healed", report=result)
    loaded, _ = load(tmp_path / "healed")
    loaded = loaded.cuda()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, atol=0, rtol=0)
