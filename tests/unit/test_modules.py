"""modules/: the runtime-module protocol (stored size, records, writability) and HookPoint capture sites."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffnkit import capture, find_ffns, steer
from ffnkit.compress.lowrank import LowRankConfig, lowrank_
from ffnkit.modules.base import HookPoint, RuntimeModule, packed_numel, tensor_bytes
from ffnkit.modules.lowrank import LowRankLinear
from ffnkit.modules.quantized import QuantizedLinear, packed_len
from ffnkit.modules.zero import ZeroAttention, ZeroFFN
from ffnkit.steering import NeuronEdit
from tests.tiny_models import tiny_inputs, tiny_model

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")


def test_stored_size():
    lr = LowRankLinear(8, 6, rank=2, bias=True)
    assert lr.stored_numel() == 2 * 8 + 6 * 2 + 6 and lr.packed_numel() == 0
    q = QuantizedLinear(8, 6, bits=4, group_size=4, bias=True, zero_point=True)
    assert q.packed_numel() == 48 and q.stored_numel() == 48 + 6
    stored = packed_len(48, 4) + 6 * 2 * 4 + packed_len(12, 4) + 6 * 4  # values, scales, zero points, bias
    assert q.stored_bytes() == stored == tensor_bytes(q)
    assert ZeroFFN(1).stored_numel() == 0 == ZeroAttention(0).stored_bytes()
    model = nn.Sequential(nn.Linear(8, 8), q, lr)
    assert packed_numel(model) == 48
    assert not lr.weights_writable and not q.weights_writable


@pytest.mark.parametrize(
    "module",
    [
        LowRankLinear(8, 6, rank=2, bias=True),
        QuantizedLinear(8, 6, bits=3, group_size=4, bias=False, zero_point=True),
        ZeroFFN(3),
        ZeroAttention(1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_records_rebuild_the_same_module(module):
    record = module.to_record("model.layers.0.mlp.up_proj")
    assert record["path"] == "model.layers.0.mlp.up_proj"
    rebuilt = type(module).from_record(record, nn.Linear(8, 6))
    assert type(rebuilt) is type(module) and rebuilt.to_record(record["path"]) == record
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }
    assert module.change_kind in ("ffn_lowrank", "ffn_quantized", "sublayers_removed")


@needs_torchao
def test_parameter_counts_see_quantised_low_rank_factors():
    """A low-rank matrix whose factors were quantised still counts the weights they stand for."""
    from ffnkit.compress.quantize import QuantizeConfig, quantize_

    model = tiny_model("llama")
    lowrank_(model, LowRankConfig("svd", ratio=0.3))
    before = [f.num_parameters() for f in find_ffns(model)]
    quantize_(model, QuantizeConfig(bits=8, group_size=None))
    assert [f.num_parameters() for f in find_ffns(model)] == before


# ----- HookPoint: a fused module keeps capture and steer working --------------------------------------
class FusedMLP(RuntimeModule):
    """A Llama MLP computed in one function (its projections are never called), with hook points."""

    sites = ("pre", "gate", "post")

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
            mlp.act_fn,
        )
        self.hook_pre, self.hook_gate, self.hook_post = HookPoint("pre"), HookPoint("gate"), HookPoint("post")

    def forward(self, x):
        gate = self.hook_gate(F.linear(x, self.gate_proj.weight))  # [B, T, d_ff]
        up = self.hook_pre(F.linear(x, self.up_proj.weight))
        m = self.hook_post(self.act_fn(gate) * up)
        return F.linear(m, self.down_proj.weight)  # [B, T, d]


def test_capture_and_steer_find_the_hook_points_of_a_fused_module():
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    with capture(model, sites=["pre", "gate", "post"], layers=[0]) as ref:
        model(**inputs)
    edit = NeuronEdit(layer=0, neurons=[3, 7], op="scale", value=4.0)
    with torch.no_grad(), steer(model, edit):
        steered = model(**inputs).logits
    mlp = model.model.layers[0].mlp
    model.model.layers[0].mlp = FusedMLP(mlp)
    assert set(model.model.layers[0].mlp.hook_points()) == {"pre", "gate", "post"}
    with capture(model, sites=["pre", "gate", "post"], layers=[0]) as cap:
        model(**inputs)
    for site in ("pre", "gate", "post"):
        torch.testing.assert_close(cap[site, 0], ref[site, 0])
    with torch.no_grad(), steer(model, edit):
        torch.testing.assert_close(model(**inputs).logits, steered)
