"""Forcing experts (SteerMoE) and contrastive experts between prompt sets."""

from __future__ import annotations

import pytest
import torch

from ffnkit.core.archs import find_ffns
from ffnkit.core.capture import capture
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.inspect.moe import moe_stats
from ffnkit.inspect.moe_contrast import ExpertContrast, expert_contrast
from ffnkit.steering import ExpertEdit, generate_pair, steer
from tests.tiny_models import V, tiny_model, tiny_tokenizer

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in MOE_FAMILIES}


def _ids(n=3, t=10, seed=5):
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _router_outputs(model, ids, layer):
    """(weights [N, k], indices [N, k]) the router of FFN ``layer`` returned, read by a plain hook."""
    ffn = find_ffns(model)[layer]
    seen = []
    handle = ffn.router_module.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    (_, w, i) = seen[0]
    return w.detach(), i.detach()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_forcing_no_expert_changes_nothing(models, family):
    model, ids = models[family], _ids()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steer(model, [ExpertEdit(layer=0, on=[], off=[]), ExpertEdit(layer=1)]):
            steered = model(input_ids=ids).logits
    assert torch.equal(plain, steered)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_forcing_changes_routing_exactly_as_asked(models, family):
    model, ids = models[family], _ids()
    plain = moe_stats(model, ids)
    with steer(model, [ExpertEdit(layer=0, on=[2], off=[1])]):
        forced = moe_stats(model, ids)
    assert forced.layer(0).load[2].item() == 1.0  # in every token's top-k
    assert forced.layer(0).load[1].item() == 0.0  # in none
    assert forced.layer(0).load.sum().item() == pytest.approx(forced.layer(0).top_k)
    # the other experts of layer 0 share what is left; layer 1 changes only through its input
    assert not torch.equal(plain.layer(0).load, forced.layer(0).load)
    with steer(model, [ExpertEdit(layer=1, off=[0, 3])]):
        off = moe_stats(model, ids)
    torch.testing.assert_close(off.layer(0).load, plain.layer(0).load)  # layer 0 runs before the edit
    assert off.layer(1).load[[0, 3]].tolist() == [0.0, 0.0]
    assert off.layer(1).load[[1, 2]].tolist() == [1.0, 1.0]  # top-2 of the remaining two


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_forced_weight_is_exact_and_keeps_the_total(models, family):
    model, ids = models[family], _ids()
    with steer(model, ExpertEdit(layer=0, on=[3])):  # the total the edited logits give (1 for mixtral)
        w0, _ = _router_outputs(model, ids, 0)
    with steer(model, ExpertEdit(layer=0, on=[3], weight=0.4)):
        w, i = _router_outputs(model, ids, 0)
    forced = i == 3  # [N, k]
    assert forced.sum(-1).tolist() == [1] * len(i)  # expert 3 in every top-k, once
    assert torch.all(w[forced] == 0.4)
    torch.testing.assert_close(w.sum(-1), w0.sum(-1))  # the others share the rest of the original total
    # a weight of 0 routes the token to the forced expert with nothing: the others take it all
    with steer(model, ExpertEdit(layer=0, on=[3], weight=0.0)):
        w, i = _router_outputs(model, ids, 0)
    assert torch.all(w[i == 3] == 0.0)
    torch.testing.assert_close(w.sum(-1), w0.sum(-1))


def test_forced_weight_only_at_chosen_positions(models):
    model, ids = models["olmoe"], _ids(n=1, t=6)
    w0, i0 = _router_outputs(model, ids, 0)
    with steer(model, ExpertEdit(layer=0, on=[0], weight=0.9, positions=[2])):
        w, i = _router_outputs(model, ids, 0)
    others = [t for t in range(6) if t != 2]
    assert torch.equal(w[others], w0[others]) and torch.equal(i[others], i0[others])
    assert w[2][i[2] == 0].tolist() == [pytest.approx(0.9)]


def test_expert_steering_under_generate(models):
    model, tok = models["qwen2_moe"], tiny_tokenizer()
    pair = generate_pair(
        model, tok, "the quick brown fox", [ExpertEdit(0, on=[1], off=[0, 2], weight=1.0)], 6
    )
    assert pair.plain and pair.steered
    same = generate_pair(model, tok, "the quick brown fox", [ExpertEdit(0)], 6)
    assert same.plain == same.steered


def test_bad_expert_edits():
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        ExpertEdit(0, on=[1], weight=-0.5)
    with pytest.raises(InvalidArgumentError):
        ExpertEdit(0, on=[1], weight=float("nan"))
    model = tiny_model("olmoe")
    with pytest.raises(InvalidArgumentError, match="forced on"):
        with steer(model, ExpertEdit(0, off=[1], weight=0.5)):
            pass


# ----- SteerMoE's risk difference --------------------------------------------------------------------
def _counted_share(model, tok, prompts, layer):
    """P(expert among top-k) over the prompts' tokens, from raw router logits (independent oracle)."""
    ffn = find_ffns(model)[layer]
    counts, n = torch.zeros(ffn.num_experts, dtype=torch.float64), 0
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad(), capture(model, "router", [layer]) as cap:
            model(input_ids=ids)
        for row in torch.topk(cap["router", layer], ffn.router.top_k, dim=-1).indices.tolist():
            for e in row:
                counts[e] += 1
        n += ids.shape[1]
    return counts / n


def test_risk_difference_on_constructed_sets(models):
    model, tok = models["mixtral"], tiny_tokenizer()
    a = ["the quick brown fox", "jumps over the lazy dog"]
    b = ["small birds sing", "of tea and bread", "while 3 small birds sing"]
    res = expert_contrast(model, tok, a, b)
    for lay in res.layers:
        pa, pb = _counted_share(model, tok, a, lay["layer"]), _counted_share(model, tok, b, lay["layer"])
        torch.testing.assert_close(torch.tensor(lay["p_a"], dtype=torch.float64), pa)
        torch.testing.assert_close(torch.tensor(lay["delta"], dtype=torch.float64), pa - pb)
    assert res.tokens == {"a": 9, "b": 12}
    # swapping the sets negates the difference; a set against itself (or its duplicate) gives zero
    swapped = expert_contrast(model, tok, b, a)
    for x, y in zip(res.layers, swapped.layers, strict=True):
        assert x["delta"] == pytest.approx([-d for d in y["delta"]])
    same = expert_contrast(model, tok, a, a + a)
    assert all(d == pytest.approx(0.0) for lay in same.layers for d in lay["delta"])


def _contrast(deltas: dict[int, list[float]], top_k: int = 2) -> ExpertContrast:
    return ExpertContrast(
        layers=[
            {
                "layer": k,
                "name": f"l{k}",
                "experts": len(d),
                "top_k": top_k,
                "p_a": [0.5] * len(d),
                "p_b": [0.5 - x for x in d],
                "delta": d,
            }
            for k, d in deltas.items()
        ]
    )


def test_edits_from_a_contrast():
    res = _contrast({0: [0.5, -0.4, 0.1, 0.0], 1: [-0.1, 0.3, 0.2, -0.6]})
    # over the whole model: activate the 2 largest Δ, deactivate the 2 most negative
    edits = res.edits("a", activate=2, deactivate=2)
    assert [(e.layer, e.on, e.off) for e in edits] == [(0, [0], [1]), (1, [1], [3])]
    per_layer = res.edits("a", activate=1, deactivate=1, per_layer=True)
    assert [(e.layer, e.on, e.off) for e in per_layer] == [(0, [0], [1]), (1, [1], [3])]
    toward_b = res.edits("b", activate=1, deactivate=3)
    assert [(e.layer, e.on, e.off) for e in toward_b] == [(0, [], [0]), (1, [3], [1, 2])]
    # never more experts on than a token's top-k slots; Δ = 0 is nobody's expert
    capped = _contrast({0: [0.5, 0.4, 0.3, 0.0]}, top_k=2).edits("a", activate=4)
    assert [(e.layer, e.on, e.off) for e in capped] == [(0, [0, 1], [])]
    with pytest.raises(InvalidArgumentError):
        res.edits("c", activate=1)
    with pytest.raises(InvalidArgumentError):
        res.edits("a")


def test_contrast_edits_steer_routing_towards_a(models):
    model, tok = models["olmoe"], tiny_tokenizer()
    a, b = ["the quick brown fox"], ["small birds sing"]
    res = expert_contrast(model, tok, a, b)
    edits = res.edits("a", activate=1, deactivate=1, per_layer=True)
    ids = torch.tensor([tok(b[0])["input_ids"]])
    with steer(model, edits):
        forced = moe_stats(model, ids)
    for e in edits:
        row = forced.layer(e.layer)
        assert all(row.load[x] == 1.0 for x in e.on) and all(row.load[x] == 0.0 for x in e.off)
