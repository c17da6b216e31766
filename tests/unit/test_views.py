"""Honest views: handles write through to the model, or refuse in one line; stale handles refuse too.

Regressions (both silently did nothing before issue 8): an edit through a handle taken before
``lowrank_``, and an edit through a fresh handle on a factorised or quantised matrix.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ffnkit import find_ffns
from ffnkit.compress.lowrank import LowRankConfig, lowrank_
from ffnkit.core.edit import keep_neurons_, set_bias_out_
from ffnkit.core.errors import InvalidArgumentError
from tests.tiny_models import tiny_inputs, tiny_model

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
STALE = "find_ffns"  # the stale-handle error says what to do
READ_ONLY = "not a view of stored parameters"


def _out(model, inputs):
    with torch.no_grad():
        o = model(**inputs)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


# ----- regression (a): a handle taken before a structural change ----------------------------------
def test_edit_through_a_handle_taken_before_lowrank_raises():
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    old = find_ffns(model)[0]
    lowrank_(model, LowRankConfig("svd", ratio=0.3))
    ref = _out(model, inputs)
    with pytest.raises(InvalidArgumentError, match=STALE), torch.no_grad():
        old.W_out[:, 0] = 0.0  # used to write into the detached nn.Linear
    with pytest.raises(InvalidArgumentError, match=STALE):
        keep_neurons_(old, torch.arange(4), model=model)  # used to shrink the detached modules
    with pytest.raises(InvalidArgumentError, match=STALE):
        old.forward(torch.zeros(1, old.d_model))
    assert torch.equal(_out(model, inputs), ref)
    assert find_ffns(model)[0].d_ff == 48


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_the_handle_passed_to_an_edit_stays_valid_and_others_go_stale(family):
    model = tiny_model(family)
    ffns = find_ffns(model)
    other_view, other_layer = find_ffns(model)[0], ffns[1]
    keep_neurons_(ffns[0], torch.arange(0, 48, 2), model=model)
    assert ffns[0].W_in.shape[0] == 24  # updated in place: still current
    with pytest.raises(InvalidArgumentError, match=STALE):
        _ = other_view.W_in  # a second handle on the edited FFN: its d_ff is wrong now
    assert other_layer.W_in.shape[0] == 48  # another layer's handle is untouched
    set_bias_out_(other_layer, torch.zeros(other_layer.d_model), model=model)
    assert other_layer.b_out is not None


def test_handles_go_stale_after_removing_blocks_but_not_after_a_failed_transform(monkeypatch):
    from ffnkit.compress.sublayers import SublayerConfig, remove_sublayers_
    from ffnkit.core import structure

    model = tiny_model("llama")
    ffns = find_ffns(model)
    with monkeypatch.context() as m:
        m.setattr(structure, "record_change", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
        with pytest.raises(RuntimeError, match="injected"):
            lowrank_(model, LowRankConfig("svd", ratio=0.3))  # modules swapped in, then rolled back
    assert ffns[0].W_in.shape == (48, 32)  # nothing changed: still current
    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0"]))
    for f in ffns:  # the stack was renumbered: every old handle names the wrong layer
        with pytest.raises(InvalidArgumentError, match=STALE):
            _ = f.W_in


# ----- regression (b): a fresh handle on a matrix that is not stored as such ----------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_writes_onto_a_factorised_matrix_raise(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    lowrank_(model, LowRankConfig("svd", ratio=0.3))
    ref = _out(model, inputs)
    ffn = find_ffns(model)[0]
    writes = [
        lambda: ffn.W_out.__setitem__((slice(None), 0), 0.0),
        lambda: ffn.W_in.mul_(0.0),
        lambda: ffn.W_in[3].zero_(),  # a view of the product stays read-only
        lambda: ffn.W_out.T.copy_(torch.zeros_like(ffn.W_out.T)),
        lambda: ffn.w_out.set(torch.zeros_like(ffn.W_out)),
    ]
    for write in writes:
        with pytest.raises(InvalidArgumentError, match=READ_ONLY), torch.no_grad():
            write()
    assert torch.equal(_out(model, inputs), ref)
    # reading and computing still work, and results are the caller's to change
    w = ffn.W_in * 1.0
    w[0] = 0.0
    assert not ffn.w_in.writable and not ffn.w_out.writable
    assert ffn.bias_out is None or ffn.bias_out.writable  # the bias is a real parameter (B's)


@needs_torchao
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_writes_onto_a_quantised_matrix_raise(family):
    from ffnkit.compress.quantize import QuantizeConfig, quantize_

    model = tiny_model(family)
    inputs = tiny_inputs(model)
    quantize_(model, QuantizeConfig(bits=4, group_size=8))
    ref = _out(model, inputs)
    ffn = find_ffns(model)[0]
    unit = ffn.experts[1] if ffn.kind == "moe" else ffn
    with pytest.raises(InvalidArgumentError, match=READ_ONLY), torch.no_grad():
        unit.W_out[:, 0] = 0.0
    with pytest.raises(InvalidArgumentError, match=READ_ONLY), torch.no_grad():
        unit.W_gate.add_(1.0)
    assert torch.equal(_out(model, inputs), ref)


# ----- writable layouts still write through ---------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "mixtral"])
def test_writes_through_writable_views_reach_the_model(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    ffn = find_ffns(model)[0]
    unit = ffn.experts[0] if ffn.kind == "moe" else ffn
    assert unit.w_out.writable and unit.w_in.writable
    with torch.no_grad():
        unit.W_out.mul_(0.0)  # this FFN (or expert) now adds nothing
    assert not torch.equal(_out(model, inputs), ref)
    unit.w_out.set(torch.ones_like(unit.W_out))
    assert torch.equal(unit.W_out, torch.ones_like(unit.W_out))


def test_read_only_tensor_semantics():
    from ffnkit.core.views import ReadOnlyTensor, read_only

    base = torch.arange(6.0).reshape(2, 3)
    w = read_only(base, "a test matrix")
    assert isinstance(w[0], ReadOnlyTensor) and isinstance(w.T, ReadOnlyTensor)
    assert type(w + 1) is torch.Tensor and type(w.clone()) is torch.Tensor
    assert all(isinstance(c, ReadOnlyTensor) for c in w.chunk(2))
    x = torch.zeros(2, 3)
    x.copy_(w)  # writing *from* it is fine
    assert torch.equal(x, base)
    for write in (lambda: w.fill_(1), lambda: torch.add(w, 1, out=w), lambda: setattr(w, "data", x)):
        with pytest.raises(InvalidArgumentError, match="a test matrix"):
            write()

    def iadd():
        v = w
        v += 1

    with pytest.raises(InvalidArgumentError):
        iadd()
    assert torch.equal(base, torch.arange(6.0).reshape(2, 3))
