"""core/transaction: every transform commits through it, and a failure at any point of the commit leaves
the model (parameters, module types, config, change log) and the handles exactly as they were."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from ffnkit import find_ffns
from ffnkit.core import structure, transaction
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.transaction import Transaction
from ffnkit.modules.zero import ZeroFFN
from tests.tiny_models import H, tiny_inputs, tiny_model

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def _snapshot(model: nn.Module) -> dict:
    inputs = tiny_inputs(model)
    with torch.no_grad():
        logits = model(**inputs).logits
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "config": copy.deepcopy(model.config.to_dict()),
        "logits": logits,
        "inputs": inputs,
    }


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in snap["state"].items())
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == snap["grad"]
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == snap["types"]
    assert model.config.to_dict() == snap["config"]
    with torch.no_grad():
        assert torch.equal(model(**snap["inputs"]).logits, snap["logits"])


# ----- one entry per transform kind: (model family, run it) -----------------------------------------
def _keep(model):
    from ffnkit.core.edit import edit_ffns_

    ffns = find_ffns(model)
    keep = {f: torch.arange(f.d_ff // 2) for f in ffns}
    dense = ffns[0].shared if ffns[0].kind == "moe" else ffns[0]  # a MoE layer: its shared expert
    keep[dense] = torch.arange(dense.d_ff // 2)
    edit_ffns_(model, keep, {dense: torch.ones(H)})


def _set_weights(model):
    from ffnkit.core.edit import set_ffn_weights_

    f = find_ffns(model)[0]
    w = {k: getattr(f, k).detach().clone() for k in ("W_in", "W_gate", "W_out")}
    set_ffn_weights_(
        f, torch.cat([w["W_in"]] * 2), torch.cat([w["W_out"]] * 2, 1) / 2, torch.cat([w["W_gate"]] * 2)
    )


def _lowrank(model):
    from ffnkit.compress.lowrank import LowRankConfig, lowrank_

    lowrank_(model, LowRankConfig("svd", ratio=0.3))


def _quantize(model):
    from ffnkit.compress.quantize import QuantizeConfig, quantize_

    quantize_(model, QuantizeConfig(bits=4, group_size=8))


def _sublayers(model):
    from ffnkit.compress.sublayers import SublayerConfig, remove_sublayers_

    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0.attn", "layers.1.ffn"]))


def _blocks(model):
    from ffnkit.compress.sublayers import SublayerConfig, remove_sublayers_

    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.0"]))


def _fusion(model):
    from ffnkit.compress.fusion import FusionConfig, fuse_ffns_

    fuse_ffns_(model, FusionConfig(runs=[[0, 1]]))


def _nest(model):
    from ffnkit.compress.nest import NestConfig, nest_

    nest_(model, NestConfig("magnitude"))


def _prune(model):
    from ffnkit.compress.prune import PruneConfig, prune_

    prune_(model, PruneConfig("magnitude", 0.3))


TRANSFORMS = {
    "keep": ("llama", _keep),
    "keep-moe": ("qwen2_moe", _keep),
    "keep-gpt2": ("gpt2", _keep),
    "set-weights": ("phi3", _set_weights),
    "lowrank": ("gpt2", _lowrank),
    "quantize": ("phi3", _quantize),
    "quantize-experts": ("mixtral", _quantize),
    "sublayers": ("llama", _sublayers),
    "blocks": ("llama", _blocks),
    "fusion": ("llama", _fusion),
    "nest": ("llama", _nest),
    "prune": ("llama", _prune),
}
NEEDS_TORCHAO = {"quantize", "quantize-experts"}


def _count_swaps(family: str, run) -> int:
    """How many attribute swaps the transform makes (run on a copy, counted at the transaction)."""
    model = tiny_model(family)
    calls = {"n": 0}
    real = transaction._apply_swap

    def counting(swap):
        calls["n"] += 1
        return real(swap)

    transaction._apply_swap = counting
    try:
        run(model)
    finally:
        transaction._apply_swap = real
    return calls["n"]


@pytest.mark.parametrize("point", ["first swap", "last swap", "record"])
@pytest.mark.parametrize("kind", list(TRANSFORMS))
def test_a_failure_mid_commit_leaves_the_model_as_it_was(kind, point, monkeypatch):
    if kind in NEEDS_TORCHAO and not HAS_TORCHAO:
        pytest.skip("needs torchao")
    family, run = TRANSFORMS[kind]
    n_swaps = _count_swaps(family, run)
    if point != "record" and n_swaps == 0:
        pytest.skip("this transform swaps no attribute (its steps are tested below)")
    if point == "record" and kind == "set-weights":
        pytest.skip("set_ffn_weights_ records nothing")
    model = tiny_model(family)
    handles = find_ffns(model)
    snap = _snapshot(model)
    # a KeyboardInterrupt must roll back as well as an error
    error = KeyboardInterrupt if point == "last swap" else RuntimeError
    if point == "record":  # writing the change log (records, or a rewritten history) fails
        boom = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected"))  # noqa: E731
        monkeypatch.setattr(structure, "record_change", boom)
        monkeypatch.setattr(Transaction, "set_meta", boom)
    else:
        fail_at, calls, real = (1 if point == "first swap" else n_swaps), {"n": 0}, transaction._apply_swap

        def flaky(swap):
            calls["n"] += 1
            if calls["n"] == fail_at:
                real(swap)  # the swap happens, then the failure: the undo must cover it too
                raise error("injected")
            return real(swap)

        monkeypatch.setattr(transaction, "_apply_swap", flaky)
    with pytest.raises(error, match="injected"):
        run(model)
    monkeypatch.undo()
    _assert_unchanged(model, snap)
    for f in handles:  # nothing committed: handles taken before stay current
        f.check_current()
    run(model)  # and the transform still works afterwards


@pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao")
def test_a_failure_between_expert_parametrizations_undoes_the_first(monkeypatch):
    from ffnkit.modules.quantized import PackedExperts

    model = tiny_model("mixtral")
    snap = _snapshot(model)
    real, calls = PackedExperts.attach, {"n": 0}

    def flaky(self, module, name):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(self, module, name)

    monkeypatch.setattr(PackedExperts, "attach", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        _quantize(model)
    assert calls["n"] == 3
    _assert_unchanged(model, snap)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


# ----- the API -----------------------------------------------------------------------------------
def test_swap_replace_record_commit_and_rollback():
    model = tiny_model("llama")
    snap = _snapshot(model)
    mlp = model.model.layers[1].mlp
    with pytest.raises(RuntimeError, match="boom"), Transaction(model) as tx:
        old = tx.replace("model.layers.1.mlp", ZeroFFN(1))
        assert old is mlp and isinstance(model.model.layers[1].mlp, ZeroFFN)
        tx.swap(model.config, "intermediate_size", 7)
        tx.record({"kind": "sublayers_removed", "removed": [ZeroFFN(1).to_record("model.layers.1.mlp")]})
        tx.set_meta("note", "x")
        assert model.config.ffnkit["changes"][-1]["kind"] == "sublayers_removed"
        raise RuntimeError("boom")
    _assert_unchanged(model, snap)
    assert not hasattr(model.config, "ffnkit") and model.model.layers[1].mlp is mlp
    with Transaction(model) as tx:
        tx.replace("model.layers.1.mlp", ZeroFFN(1))
        tx.record({"kind": "sublayers_removed", "removed": []})
    assert isinstance(model.model.layers[1].mlp, ZeroFFN)
    assert model.config.ffnkit["changes"] == [{"kind": "sublayers_removed", "removed": []}]
    with pytest.raises(InvalidArgumentError, match="no module"), Transaction(model) as tx:
        tx.replace("model.layers.9.mlp", ZeroFFN(9))


def test_nested_transactions_roll_back_to_their_savepoint():
    model = tiny_model("llama")
    lin = model.model.layers[0].mlp.up_proj
    with Transaction(model) as outer:
        outer.swap(lin, "out_features", 1)
        with pytest.raises(RuntimeError), Transaction(model) as inner:
            inner.swap(lin, "in_features", 2)
            inner.record({"kind": "x"})
            raise RuntimeError
        assert (lin.out_features, lin.in_features) == (1, 32)  # only the inner steps were undone
        assert not hasattr(model.config, "ffnkit")
    assert lin.out_features == 1  # the outer one committed
    with pytest.raises(RuntimeError), Transaction(model) as outer:
        with Transaction(model) as inner:
            inner.swap(lin, "in_features", 2)
        raise RuntimeError  # the outer failure undoes the committed inner steps too
    assert lin.in_features == 32


def test_generations_move_on_commit_only():
    from ffnkit.core.views import generation

    model = tiny_model("llama")
    lin = model.model.layers[0].mlp.up_proj
    with pytest.raises(RuntimeError), Transaction(model) as tx:
        tx.swap(lin, "out_features", 1)
        raise RuntimeError
    assert generation(lin) == 0
    with Transaction(model) as tx:
        tx.replace("model.layers.0.mlp.up_proj", nn.Linear(32, 48, bias=False))
    assert generation(lin) == 1 and generation(model.model.layers[0].mlp) == 1
