"""use_fast_experts on tiny random mixtral / qwen2_moe / qwen3_moe / olmoe models: logits equal eager."""

from __future__ import annotations

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError, UnsupportedArchitectureError
from ffnkit.kernels.moe_hf import use_fast_experts
from tests.tiny_models import tiny_inputs, tiny_model

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# float32 end to end: the fast paths sum the experts in another order than eager (~1e-6 relative)
TOL = 1e-5


def _impls(model) -> set:
    return {m.config._experts_implementation for m in model.modules() if hasattr(m, "gate_up_proj")}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_eager(family, backend, monkeypatch):
    import ffnkit.kernels.moe_hf as hf

    calls = []
    real = hf.experts_forward
    monkeypatch.setattr(hf, "experts_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model(family)
    model.set_experts_implementation("eager")
    inputs = tiny_inputs(model, batch=2, seq=9)
    with torch.no_grad():
        eager = model(**inputs).logits
        handle = use_fast_experts(model, backend=backend)
        assert _impls(model) == {"ffnkit"} and handle.modules
        fast = model(**inputs).logits
        one = model(**{"input_ids": inputs["input_ids"][:1, :1]}).logits  # decode-sized call (gather path)
        handle.restore()
        assert _impls(model) == {"eager"}
        again = model(**inputs).logits
        eager_one = model(**{"input_ids": inputs["input_ids"][:1, :1]}).logits
    scale = eager.abs().max()
    assert (fast - eager).abs().max() / scale < TOL
    assert (one - eager_one).abs().max() / eager_one.abs().max() < TOL
    assert torch.equal(again, eager)
    assert len(calls) == 2 * 2  # two calls through ffnkit's executor per layer, none after restore


def test_context_manager_generate_and_grad_fallback():
    model = tiny_model("olmoe")
    ids = tiny_inputs(model, batch=1, seq=5)["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    before = _impls(model)
    with use_fast_experts(model), torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref) and _impls(model) == before
    with use_fast_experts(model, backend="cpu"):
        loss = model(ids, labels=ids).loss  # autograd on: the eager path runs, gradients flow
        loss.backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad is not None


def test_bad_input():
    dense = tiny_model("llama")
    with pytest.raises(UnsupportedArchitectureError):
        use_fast_experts(dense)
    with pytest.raises(InvalidArgumentError):
        use_fast_experts(tiny_model("olmoe"), backend="gpu")
