"""core/layouts: one adapter per weight layout, ordered dispatch, canonical [out, in] reads checked against
each module's own forward, and plans that keep rows / columns exactly."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ffnkit import find_ffns
from ffnkit.core.errors import InvalidArgumentError, UnsupportedArchitectureError
from ffnkit.core.layouts import (
    EXPERTS,
    LAYOUTS,
    Layout,
    LinearLayout,
    find_layout,
    layout_of,
    register_layout,
)
from ffnkit.core.transaction import Transaction
from ffnkit.modules.lowrank import LowRankLinear
from ffnkit.modules.quantized import QuantizedLinear
from tests.tiny_models import tiny_model

N_IN, N_OUT = 8, 6


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(N_IN, N_OUT)


def _conv1d() -> nn.Module:
    torch.manual_seed(0)
    m = Conv1D(N_OUT, N_IN)  # nf outputs, nx inputs: weight [in, out]
    nn.init.normal_(m.weight)
    nn.init.normal_(m.bias)
    return m


def _lowrank() -> nn.Module:
    torch.manual_seed(0)
    m = LowRankLinear(N_IN, N_OUT, rank=3, bias=True)
    nn.init.normal_(m.B.bias)
    return m


def _quantized() -> nn.Module:
    torch.manual_seed(0)
    m = QuantizedLinear(N_IN, N_OUT, bits=4, group_size=4, bias=True)
    m.qweight.copy_(torch.randint(0, 255, m.qweight.shape, dtype=torch.uint8))
    m.scale.copy_(torch.rand(m.scale.shape))
    return m


MODULES = {"linear": _linear, "conv1d": _conv1d, "lowrank": _lowrank, "quantized": _quantized}


@pytest.mark.parametrize("name", list(MODULES))
def test_canonical_weight_reproduces_the_module(name):
    """W [out, in] and b read through the layout give what the module itself computes."""
    module = MODULES[name]()
    layout = layout_of(module)
    assert layout.name == name and layout.dims(module) == (N_OUT, N_IN)
    x = torch.randn(5, N_IN)
    with torch.no_grad():
        expected = module(x)
        got = x @ layout.weight(module).T + layout.bias(module)
    torch.testing.assert_close(got, expected)
    assert layout.writable == (name in ("linear", "conv1d")) == layout.dense


@pytest.mark.parametrize("name", ["linear", "conv1d"])
def test_keep_rows_and_cols_plans_are_exact(name):
    module = MODULES[name]()
    layout = layout_of(module)
    x = torch.randn(5, N_IN)
    with torch.no_grad():
        full = module(x)  # [5, out]
    rows, cols = torch.tensor([4, 0, 2]), torch.tensor([1, 5, 6, 7])
    with Transaction() as tx:
        tx.apply(layout.plan_keep_rows(module, rows))
    assert layout.dims(module) == (3, N_IN)
    with torch.no_grad():
        torch.testing.assert_close(module(x), full[:, rows])
        masked = torch.zeros_like(x)
        masked[:, cols] = x[:, cols]
        expected = module(masked)  # dropping inputs = zeroing them
    with Transaction() as tx:
        tx.apply(layout.plan_keep_cols(module, cols))
    assert layout.dims(module) == (3, 4)
    with torch.no_grad():
        torch.testing.assert_close(module(x[:, cols]), expected)


@pytest.mark.parametrize("name", ["lowrank", "quantized"])
def test_read_only_layouts_refuse_every_plan_in_one_line(name):
    module = MODULES[name]()
    layout = layout_of(module)
    idx = torch.arange(2)
    for plan in (
        lambda: layout.plan_keep_rows(module, idx),
        lambda: layout.plan_keep_cols(module, idx),
        lambda: layout.plan_set(module, torch.zeros(2, 2), None),
        lambda: layout.parameter(module),
    ):
        with pytest.raises(InvalidArgumentError, match="cannot be edited") as err:
            plan()
        assert "\n" not in str(err.value)


def test_experts_layout_and_unknown_modules():
    moe = find_ffns(tiny_model("mixtral"))[0]
    experts = moe.experts[0].module
    assert find_layout(experts) is EXPERTS and EXPERTS.num_experts(experts) == moe.num_experts
    w = EXPERTS.expert_weight(experts, EXPERTS.down, 2, moe.experts[2].w_out.transpose)
    assert w.shape == (moe.d_model, moe.d_ff) and torch.equal(w, moe.experts[2].W_out)
    assert find_layout(nn.LayerNorm(4)) is None
    with pytest.raises(UnsupportedArchitectureError, match="register_layout"):
        layout_of(nn.LayerNorm(4))


def test_register_layout_goes_first():
    class Scaled(nn.Linear):
        """A Linear whose effective weight is twice what it stores."""

        def forward(self, x):
            return nn.functional.linear(x, 2 * self.weight, self.bias)

    class ScaledLayout(Layout):
        name, writable, dense = "scaled", False, False

        def matches(self, module):
            return isinstance(module, Scaled)

        def weight(self, module):
            return 2 * module.weight

    assert layout_of(Scaled(3, 2)).name == "linear"  # an nn.Linear to the built-in table
    layout = ScaledLayout()
    register_layout(layout)
    try:
        m = Scaled(3, 2)
        assert layout_of(m) is layout and layout_of(nn.Linear(3, 2)).name == "linear"
        x = torch.randn(4, 3)
        with torch.no_grad():
            torch.testing.assert_close(x @ layout.weight(m).T + m.bias, m(x))
        with pytest.raises(InvalidArgumentError, match="cannot be edited"):
            layout.plan_keep_rows(m, torch.arange(1))
    finally:
        LAYOUTS.remove(layout)
    assert isinstance(layout_of(Scaled(3, 2)), LinearLayout)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
def test_dequantised_expert_slices_are_read_only():
    from ffnkit.compress.quantize import QuantizeConfig, quantize_

    model = tiny_model("olmoe")
    quantize_(model, QuantizeConfig(bits=8, group_size=8))
    expert = find_ffns(model)[0].experts[1]
    assert not expert.w_in.writable
    with pytest.raises(InvalidArgumentError, match="quantised"):
        expert.w_in.parameter()
