"""The conversion-quality path on CUDA (what benchmarks/moe_frontier.py --device cuda runs): router trained
on the GPU, oracle routing, healing, save → load of the healed model.

Skipped without CUDA; run on the accelerator machine:
    python -m pytest -q tests/gpu/test_moe_quality_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from ffnkit import load, save
from ffnkit.moe.convert import MoEfyConfig, moe_blocks, moefy_
from ffnkit.moe.oracle import oracle_routing
from ffnkit.train.heal import HealConfig, heal_, kl_to_reference
from tests.tiny_models import tiny_inputs, tiny_model, tiny_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CALIB = torch.randint(3, 90, (8, 24), generator=torch.Generator().manual_seed(5))


def test_convert_oracle_heal_and_reload_on_cuda(tmp_path):
    reference = tiny_model("llama").cuda()
    model = copy.deepcopy(reference)
    report = moefy_(
        model,
        MoEfyConfig(
            experts=4,
            split="kmeans",
            active=0.5,
            shared=8,
            router_steps=30,
            router_hidden=8,
            router_target="norm",
        ),
        calibration=CALIB,
    )
    assert report.mass_recall["overlap"] is not None
    assert all(p.is_cuda for p in model.parameters())
    inputs = {k: v.cuda() for k, v in tiny_inputs(model).items()}
    with torch.no_grad():
        routed = model(**inputs).logits
        with oracle_routing(model):
            oracle = model(**inputs).logits
    assert not torch.equal(routed, oracle) or report.mass_recall["overlap"] == 1.0
    held_out = torch.randint(3, 90, (8, 24), generator=torch.Generator().manual_seed(9)).cuda()
    with torch.no_grad():
        before = float(
            kl_to_reference(model(input_ids=held_out).logits, reference(input_ids=held_out).logits)
        )
    router = moe_blocks(model)[0].gate.fc1.weight.detach().clone()
    heal_(model, reference, HealConfig(steps=25, lr=3e-3, batch_size=4), calibration=CALIB, progress=False)
    with torch.no_grad():
        after = float(kl_to_reference(model(input_ids=held_out).logits, reference(input_ids=held_out).logits))
        want = model(**inputs).logits
    assert after < before
    assert not torch.equal(moe_blocks(model)[0].gate.fc1.weight, router)
    save(model, tiny_tokenizer(), tmp_path / "healed")
    again, _ = load(tmp_path / "healed")
    again.cuda()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, want)
