"""Conversion quality tools: output-norm router targets, top-k overlap, oracle routing, healing a
converted model (router trains, save → load exact afterwards)."""

from __future__ import annotations

import copy

import pytest
import torch

from ffnkit import find_ffns, load, save
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.modules.moe import MoEBlock, MoERouter
from ffnkit.moe.cluster import split_neurons
from ffnkit.moe.convert import MoEfyConfig, moe_blocks, moefy_
from ffnkit.moe.oracle import oracle_routing
from ffnkit.moe.router import expert_output_norm, mass_recall, train_mlp_router
from ffnkit.train.heal import HealConfig, heal_, kl_to_reference
from tests.tiny_models import H, tiny_inputs, tiny_model, tiny_tokenizer

CALIB = torch.randint(3, 90, (8, 24), generator=torch.Generator().manual_seed(5))


def _norms_by_hand(ffn, x, groups):
    """Each expert's output norm from the dense weights, one expert at a time (independent of the code)."""
    w_in, w_gate, w_out = ffn.W_in.detach(), ffn.W_gate.detach(), ffn.W_out.detach()
    cols = []
    for g in groups:
        m = ffn.act_fn(x @ w_gate[g].T) * (x @ w_in[g].T)  # [N, f]
        cols.append((m @ w_out[:, g].T).norm(dim=-1))  # [N]
    return torch.stack(cols, dim=1)


def test_expert_output_norm_matches_a_loop_over_experts():
    ffn = find_ffns(tiny_model("llama"))[0]
    split = split_neurons(ffn, 4, "random")
    x = torch.randn(10, H)
    torch.testing.assert_close(
        expert_output_norm(ffn, x, split), _norms_by_hand(ffn, x, split.groups), atol=1e-5, rtol=1e-4
    )


def test_mass_recall_overlap_counts_the_shared_picks():
    mass = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    scores = torch.tensor([[9.0, 0.0, 8.0, 0.0], [0.0, 0.0, 9.0, 8.0]])  # token 0: 1 of 2 right, token 1: 2
    r = mass_recall(scores, mass, 2)
    assert r["overlap"] == pytest.approx(0.75)
    assert r["router"] == pytest.approx((6 / 10 + 7 / 10) / 2)
    assert r["oracle"] == pytest.approx(0.7)


def test_router_learns_to_rank_a_norm_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    w = torch.randn(4, 8, generator=g)
    target = torch.exp(x @ w.T)  # [N, 4]: a learnable per-token ranking
    state, info = train_mlp_router(x, target, hidden=32, steps=300, lr=1e-2)
    scores = torch.tanh(x @ state["fc1.weight"].T + state["fc1.bias"]) @ state["fc2.weight"].T
    assert info["loss"][1] < 0.5 * info["loss"][0]
    assert mass_recall(scores, target, 1)["overlap"] > 0.8


@pytest.mark.parametrize("target", ["norm", "mass"])
def test_router_target_is_a_config_choice_and_bad_ones_are_refused(target):
    model = tiny_model("llama")
    report = moefy_(
        model,
        MoEfyConfig(
            experts=4, split="kmeans", active=0.5, router_target=target, router_steps=30, router_hidden=8
        ),
        calibration=CALIB,
    )
    assert 0 < report.mass_recall["overlap"] <= 1
    with pytest.raises(InvalidArgumentError, match="router_target"):
        MoEfyConfig(router_target="loss")


def test_oracle_routing_picks_the_largest_output_norms_and_restores_the_router():
    model = tiny_model("llama")
    dense_ffn = find_ffns(model)[1]
    weights = copy.deepcopy(dense_ffn)  # keep the dense weights for the independent norms
    moefy_(model, MoEfyConfig(experts=4, split="random", router="centroid", active=0.5), calibration=CALIB)
    block = model.get_submodule(dense_ffn.name)
    # recover the split from the block: expert e's gate rows are W_gate rows of its neurons
    w_gate = weights.W_gate.detach()
    f = block.experts.intermediate_dim
    block_groups = [
        [int((w_gate == row).all(dim=1).nonzero()[0]) for row in block.experts.gate_up_proj[e, :f]]
        for e in range(block.num_experts)
    ]
    groups = torch.tensor(block_groups)
    x = torch.randn(16, H)
    want = _norms_by_hand(weights, x, groups).topk(2, dim=-1).indices.sort(-1).values
    before = block.gate.router_logits(x)
    with oracle_routing(model) as blocks:
        assert len(blocks) == 2
        _, _, idx = block.gate(x)
        assert torch.equal(idx.sort(-1).values, want)
        model(**tiny_inputs(model))  # the whole model runs with it
    assert "router_logits" not in block.gate.__dict__
    torch.testing.assert_close(block.gate.router_logits(x), before)


def test_oracle_routing_needs_moe_blocks():
    with pytest.raises(InvalidArgumentError, match="moefy_"):
        with oracle_routing(tiny_model("llama")):
            pass


def test_weight_one_routing_is_exactly_one_and_passes_gradients_to_the_router():
    r = MoERouter(8, 4, 2, kind="mlp", hidden=6, weighting="ones")
    x = torch.randn(5, 8)
    with torch.no_grad():
        _, w_eval, i_eval = r(x)
    _, w, i = r(x)
    assert torch.equal(w.detach(), torch.ones(5, 2)) and torch.equal(w_eval, torch.ones(5, 2))
    assert torch.equal(i, i_eval)
    (w * torch.arange(1.0, 3.0)).sum().backward()
    assert r.fc1.weight.grad is not None and r.fc1.weight.grad.abs().sum() > 0


def test_healing_a_converted_model_trains_the_router_and_reloads_exactly(tmp_path):
    reference = tiny_model("llama")
    model = copy.deepcopy(reference)
    moefy_(
        model,
        MoEfyConfig(
            experts=4,
            split="kmeans",
            active=0.5,
            shared=8,
            router_steps=20,
            router_hidden=8,
            router_target="mass",
        ),
        calibration=CALIB,
    )
    held_out = torch.randint(3, 90, (8, 24), generator=torch.Generator().manual_seed(9))
    router_before = moe_blocks(model)[0].gate.fc1.weight.detach().clone()
    attention = {n: p.detach().clone() for n, p in model.named_parameters() if "self_attn" in n}
    with torch.no_grad():
        kl_before = float(
            kl_to_reference(model(input_ids=held_out).logits, reference(input_ids=held_out).logits)
        )
    heal_(model, reference, HealConfig(steps=25, lr=3e-3, batch_size=4), calibration=CALIB, progress=False)
    with torch.no_grad():
        kl_after = float(
            kl_to_reference(model(input_ids=held_out).logits, reference(input_ids=held_out).logits)
        )
    assert kl_after < kl_before
    assert not torch.equal(moe_blocks(model)[0].gate.fc1.weight, router_before)
    for n, p in model.named_parameters():
        if n in attention:
            assert torch.equal(p, attention[n]), n
    inputs = tiny_inputs(model)
    with torch.no_grad():
        want = model(**inputs).logits
    save(model, tiny_tokenizer(), tmp_path / "healed")
    again, _ = load(tmp_path / "healed")
    assert all(isinstance(b, MoEBlock) for b in moe_blocks(again)) and len(moe_blocks(again)) == 2
    with torch.no_grad():
        got = again(**inputs).logits
        assert torch.equal(got, want), (got - want).abs().max()


def test_training_path_equals_the_reference_loop_in_values_and_gradients():
    from ffnkit.modules.moe import MoEExperts, experts_reference

    torch.manual_seed(0)
    ex = MoEExperts(6, 16, 5)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
    x = torch.randn(11, 16, requires_grad=True)
    index = torch.randint(0, 7, (11, 3))  # 6 = no expert (an MoE++ slot)
    index[0] = torch.tensor([2, 2, 6])  # the same expert twice: weights add
    weights = torch.rand(11, 3, requires_grad=True)
    got = ex(x, index, weights)  # grad enabled: the masked dense path
    want = experts_reference(x, ex.gate_up_proj, ex.down_proj, index, weights)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    g_got = torch.autograd.grad(got.square().sum(), (x, weights, ex.gate_up_proj))
    g_want = torch.autograd.grad(want.square().sum(), (x, weights, ex.gate_up_proj))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
