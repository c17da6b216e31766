"""Weight-only FFN quantisation through torchao (skipped when torchao is absent); save/load: test_quantize_save.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ffnkit.compress.lowrank import LowRankConfig, lowrank_
from ffnkit.compress.quantize import QuantizeConfig, quantize_
from ffnkit.core.archs import find_ffns
from ffnkit.core.errors import FFNKitError, InvalidArgumentError
from ffnkit.modules.base import tensor_bytes
from ffnkit.modules.lowrank import LowRankLinear
from ffnkit.modules.quantized import QuantizedLinear
from tests.tiny_models import tiny_inputs, tiny_model

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(
    not HAS_TORCHAO, reason="torchao is not installed (pip install ffnkit[quantize])"
)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@needs_torchao
@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2_moe"])
def test_quantize_round_trip_error_and_storage(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _logits(model, inputs)
    other = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp" not in n}
    dense = [f if f.kind != "moe" else f.shared for f in find_ffns(model)]
    w_before = [f.W_out.detach().clone() for f in dense]
    g = 8 if family == "qwen2_moe" else 16  # the tiny shared expert has 40 neurons
    report8 = quantize_(model, QuantizeConfig(bits=8, group_size=g, mapping="symmetric"))
    assert report8.ffn_weights > 0
    # int8 with a float32 scale per g weights (symmetric: no zero point); 32 bits per weight before
    assert report8.stored_bits_per_weight == pytest.approx(8 + 32 / g, rel=0.01)
    assert report8.ffn_bytes_after == pytest.approx(report8.ffn_bytes_before * (8 + 32 / g) / 32, rel=0.01)
    for f, w in zip([f if f.kind != "moe" else f.shared for f in find_ffns(model)], w_before, strict=True):
        deq = f.out_proj.weight
        assert _rel(deq, w) < 0.01  # symmetric int8: error ≤ half a step of max|w|/127 per group
    assert _rel(_logits(model, inputs), ref) < 0.02
    # nothing outside the FFNs changed
    for n, p in model.named_parameters():
        if n in other:
            assert torch.equal(p, other[n])


@needs_torchao
def test_four_bits_error_bounded_and_worse_than_eight():
    errs = {}
    for bits in (8, 4):
        model = tiny_model("llama")
        inputs = tiny_inputs(model)
        ref = _logits(model, inputs)
        w = find_ffns(model)[0].W_in.detach().clone()
        quantize_(model, QuantizeConfig(bits=bits, group_size=16))
        deq = find_ffns(model)[0].in_proj.weight
        # symmetric: every weight within half a quantisation step of its group's max / (2^(b-1) - 1)
        step = w.abs().reshape(w.shape[0], -1, 16).amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert ((deq - w).abs().reshape(w.shape[0], -1, 16) <= 0.5 * step + 1e-6).all()
        errs[bits] = _rel(_logits(model, inputs), ref)
    assert errs[8] < errs[4] < 0.2


@needs_torchao
def test_quantize_lowrank_factors_and_errors():
    model = tiny_model("llama")
    lowrank_(model, LowRankConfig("svd", ratio=0.3))
    report = quantize_(model, QuantizeConfig(bits=8, group_size=None))
    assert set(report.layers[0]["matrices"]) == {"in.A", "in.B", "gate.A", "gate.B", "out.A", "out.B"}
    assert isinstance(find_ffns(model)[0].in_proj, LowRankLinear)
    with pytest.raises(InvalidArgumentError, match="already quantised"):
        quantize_(model, QuantizeConfig(bits=8))


@needs_torchao
def test_clear_errors_leave_the_model_unchanged(tmp_path):
    with pytest.raises(InvalidArgumentError, match="together"):
        quantize_(tiny_model("mixtral"), QuantizeConfig(bits=8, group_size=8, matrices=["in", "out"]))
    model = tiny_model("llama")
    with pytest.raises(InvalidArgumentError, match="group_size"):
        quantize_(model, QuantizeConfig(bits=4, group_size=5))
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert "ffnkit" not in model.config.to_dict() or not model.config.ffnkit.get("changes")


def test_config_validation():
    with pytest.raises(InvalidArgumentError):
        QuantizeConfig(bits=1)
    with pytest.raises(InvalidArgumentError):
        QuantizeConfig(bits=4, group_size=0)
    assert tensor_bytes(torch.zeros(10, 10)) == 400


@pytest.mark.skipif(HAS_TORCHAO, reason="torchao is installed")
def test_missing_torchao_is_a_clear_error():
    with pytest.raises(FFNKitError, match=r"ffnkit\[quantize\]"):
        quantize_(tiny_model("llama"), QuantizeConfig(bits=8))
