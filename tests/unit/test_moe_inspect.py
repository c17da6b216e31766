"""Routing statistics of MoE layers (ffnkit.inspect.moe) against independent computations from the
router logits captured by ``capture(..., "router")``."""

from __future__ import annotations

import math

import pytest
import torch

from ffnkit.core.archs import find_ffns
from ffnkit.core.capture import capture
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.inspect.moe import RoutingReducer, expert_vocab, moe_stats, routing_matrix
from tests.tiny_models import V, tiny_model, tiny_tokenizer

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in MOE_FAMILIES}


def _ids(n=4, t=12, seed=3):
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _oracle(model, ids):
    """Per MoE layer: load, co-selection, mean entropy from raw router logits (no ffnkit statistics)."""
    ffns = [f for f in find_ffns(model) if f.kind == "moe"]
    with torch.no_grad(), capture(model, "router", [f.index for f in ffns]) as cap:
        model(input_ids=ids)
    out = {}
    for f in ffns:
        logits = cap["router", f.index].double()  # [N, E]
        top = torch.topk(logits, f.router.top_k, dim=-1).indices  # softmax keeps the order
        chosen = torch.zeros_like(logits)
        for row, idx in enumerate(top.tolist()):
            for e in idx:
                chosen[row, e] = 1.0
        probs = torch.softmax(logits, -1)
        entropy = torch.distributions.Categorical(probs=probs).entropy()
        out[f.index] = {
            "load": chosen.mean(0),
            "cosel": torch.einsum("ni,nj->ij", chosen, chosen) / len(chosen),
            "entropy": entropy,
        }
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_stats_match_an_independent_computation(models, family):
    model, ids = models[family], _ids()
    res = moe_stats(model, ids, batch_size=3)
    oracle = _oracle(model, ids)
    assert [r.layer for r in res.layers] == sorted(oracle)
    assert res.n_tokens == ids.numel()
    for row in res.layers:
        o = oracle[row.layer]
        k = row.top_k
        assert row.tokens == ids.numel()
        torch.testing.assert_close(row.load, o["load"])
        assert row.load.sum().item() == pytest.approx(k)
        assert row.token_share.sum().item() == pytest.approx(1.0)
        assert row.weight_share.sum().item() == pytest.approx(1.0)
        assert row.mean_prob.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(row.coselection, o["cosel"])
        torch.testing.assert_close(row.coselection, row.coselection.T)
        torch.testing.assert_close(row.coselection.diagonal(), row.load)
        # every token has exactly k experts: a row of the co-selection sums to k × load
        torch.testing.assert_close(row.coselection.sum(1), k * row.load)
        assert row.entropy_mean == pytest.approx(o["entropy"].mean().item(), rel=1e-5)
        assert row.entropy_std == pytest.approx(o["entropy"].std(unbiased=False).item(), rel=1e-3, abs=1e-6)
        assert int(row.entropy_hist.sum()) == ids.numel()
        mean = o["load"].mean().item()
        assert row.imbalance["max_over_mean"] == pytest.approx(o["load"].max().item() / mean)
        assert row.imbalance["cv"] == pytest.approx(o["load"].std(unbiased=False).item() / mean)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_streaming_and_prompt_lists_equal_one_pass(models, family):
    model, ids = models[family], _ids(n=6, t=9)
    one = moe_stats(model, ids, batch_size=6)
    many = moe_stats(model, ids, batch_size=1)
    prompts = moe_stats(model, list(ids))  # a prompt set, one prompt at a time
    for a, b, c in zip(one.layers, many.layers, prompts.layers, strict=True):
        for other in (b, c):
            torch.testing.assert_close(a.load, other.load)
            torch.testing.assert_close(a.coselection, other.coselection)
            torch.testing.assert_close(a.weight_share, other.weight_share)
            assert a.entropy_mean == pytest.approx(other.entropy_mean, rel=1e-6)


def test_shared_gate_is_the_mean_sigmoid_gate(models):
    model, ids = models["qwen2_moe"], _ids()
    ffn = next(f for f in find_ffns(model) if f.kind == "moe")
    with torch.no_grad(), capture(model, "in", [ffn.index]) as cap:
        model(input_ids=ids)
        expected = torch.sigmoid(ffn.shared_gate(cap["in", ffn.index])).mean().item()
    row = moe_stats(model, ids).layer(ffn.index)
    assert row.shared_gate == pytest.approx(expected, rel=1e-5)
    assert moe_stats(models["olmoe"], ids).layers[0].shared_gate is None


def test_reducer_on_constructed_routing():
    """4 experts, top-2: every token routed to experts 0 and 1 with weights 0.75 / 0.25, uniform logits."""
    n, e = 10, 4
    logits = torch.zeros(n, e)
    weights = torch.tensor([[0.75, 0.25]]).repeat(n, 1)
    indices = torch.tensor([[0, 1]]).repeat(n, 1)
    red = RoutingReducer(e, bins=4)
    red.update(routing_matrix((logits, weights, indices), e, 2, True))
    r = red.result()
    assert r["load"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert r["weight_share"].tolist() == [0.75, 0.25, 0.0, 0.0]  # of all routing weight
    assert r["coselection"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert r["entropy_mean"] == pytest.approx(math.log(4))
    assert r["entropy_hist"].tolist() == [0, 0, 0, n]  # H / ln E = 1: the last bin
    # an index equal to E means "no expert" (transformers v5 convention): it counts nowhere
    red2 = RoutingReducer(e).update(
        routing_matrix((logits, weights, torch.tensor([[0, e]]).repeat(n, 1)), e, 2, True)
    )
    assert red2.result()["load"].tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(InvalidArgumentError):
        RoutingReducer(e).update(torch.zeros(3, 5))


def test_dense_model_is_refused():
    with pytest.raises(InvalidArgumentError, match="not a mixture of experts"):
        moe_stats(tiny_model("llama"), _ids())
    with pytest.raises(InvalidArgumentError, match="no tokens"):
        moe_stats(tiny_model("olmoe"), [torch.tensor([], dtype=torch.long)])


def test_expert_vocab_matches_a_direct_projection(models):
    model, tok = models["qwen2_moe"], tiny_tokenizer()
    res = expert_vocab(model, tok, layers=[1], top_k=5, neurons=2)
    ffn = find_ffns(model)[1]
    assert [r["expert"] for r in res.experts] == [0, 1, 2, 3, "shared"]
    gain = model.model.norm.weight.detach().float()  # RMSNorm gain
    E = model.lm_head.weight.detach().float()  # [V, d]
    for row in res.experts:
        unit = ffn.shared if row["expert"] == "shared" else ffn.experts[row["expert"]]
        W = unit.W_out.detach().float()  # [d, d_ff]
        logits = E @ (gain * W.mean(1))  # [V]
        assert [t["id"] for t in row["promoted"]] == logits.topk(5).indices.tolist()
        assert [t["id"] for t in row["suppressed"]] == logits.topk(5, largest=False).indices.tolist()
        biggest = W.norm(dim=0).topk(2).indices.tolist()
        assert [n["neuron"] for n in row["neurons"]] == biggest
        top0 = (E @ (gain * W[:, biggest[0]])).topk(5).indices.tolist()
        assert [t["id"] for t in row["neurons"][0]["promoted"]] == top0
    with pytest.raises(InvalidArgumentError):
        expert_vocab(model, tok, top_k=0)


def test_bare_router_logits_are_routed_with_the_usual_rule():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, -2.0, 2.5]])  # [N=2, E=4]
    m = routing_matrix(logits, 4, 2, True)  # [2, 12]
    assert m[:, 8:].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    p = torch.softmax(logits, -1)
    w0 = p[0, [0, 2]] / p[0, [0, 2]].sum()
    torch.testing.assert_close(m[0, 4:8], torch.stack([w0[0], torch.tensor(0.0), w0[1], torch.tensor(0.0)]))
    torch.testing.assert_close(m[:, :4], logits)
