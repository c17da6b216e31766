"""Steering: exact invariants on every family, positions under cached generation, MoE expert forcing."""

from __future__ import annotations

import copy

import pytest
import torch

from ffnkit import capture, find_ffns
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError
from ffnkit.steering import ExpertEdit, NeuronEdit, steer
from tests.tiny_models import FAMILIES, tiny_inputs, tiny_model

MOE = {"mixtral", "qwen2_moe", "olmoe", "qwen3_moe"}
DENSE = [f for f in FAMILIES if f not in MOE]
NEURONS = [1, 5, 17]


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", params=DENSE)
def dense(request):
    model = tiny_model(request.param)
    inputs = tiny_inputs(model)
    return request.param, model, inputs, _out(model, inputs)


def test_scale_one_is_identity(dense):
    family, model, inputs, base = dense
    for layer in range(len(find_ffns(model))):
        for site in ("post", "pre"):
            with steer(model, NeuronEdit(layer=layer, neurons=NEURONS, op="scale", value=1.0, site=site)):
                assert torch.equal(_out(model, inputs), base), (family, layer, site)


def test_zero_equals_removing_value_vectors(dense):
    """Zeroing m_i = deleting column i of W_out (in a copy); reversible: logits are back after exit."""
    family, model, inputs, base = dense
    layer = len(find_ffns(model)) - 1
    with steer(model, NeuronEdit(layer=layer, neurons=NEURONS, op="zero")):
        zeroed = _out(model, inputs)
    assert not torch.allclose(zeroed, base)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        find_ffns(ref)[layer].W_out[:, NEURONS] = 0.0
    assert torch.allclose(zeroed, _out(ref, inputs), atol=1e-6), family
    assert torch.equal(_out(model, inputs), base), f"{family}: steering left a trace"


def test_set_value_is_what_W_out_reads(dense):
    family, model, inputs, _ = dense
    with (
        steer(model, NeuronEdit(layer=0, neurons=NEURONS, op="set", value=3.0)),
        capture(model, sites=["post"], layers=[0]) as cap,
    ):
        _out(model, inputs)
    m = cap["post", 0]  # [N, d_ff], read after the steering hook
    assert torch.all(m[:, NEURONS] == 3.0)
    assert not torch.all(m[:, 0] == 3.0)


def test_positions_last_and_list():
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    base = _out(model, inputs)
    with steer(model, NeuronEdit(layer=1, neurons=NEURONS, op="set", value=4.0, positions="last")):
        last = _out(model, inputs)
    assert torch.equal(last[:, :-1], base[:, :-1]) and not torch.allclose(last[:, -1], base[:, -1])
    with steer(model, NeuronEdit(layer=1, neurons=NEURONS, op="set", value=4.0, positions=[2, 4])):
        some = _out(model, inputs)
    # causal: positions before the first edited one are untouched, edited ones change
    assert torch.equal(some[:, :2], base[:, :2]) and not torch.allclose(some[:, 2], base[:, 2])
    assert not torch.allclose(some[:, 4], base[:, 4])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "t5"])
def test_absolute_positions_under_cached_generation(family):
    """With a KV cache each forward sees only new tokens; positions stay absolute: same scores as
    generating without a cache (every forward sees the whole sequence)."""
    model = tiny_model(family)
    ids = tiny_inputs(model)["input_ids"][:1]  # 7 prompt tokens
    layer = len(find_ffns(model)) - 1
    edit = NeuronEdit(
        layer=layer, neurons=NEURONS, op="set", value=5.0, positions=[2, 9]
    )  # prompt + generated
    scores = []
    for use_cache in (True, False):
        with torch.no_grad(), steer(model, edit):
            out = model.generate(
                ids,
                max_new_tokens=5,
                do_sample=False,
                use_cache=use_cache,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        scores.append(torch.stack(out.scores))
    with torch.no_grad():
        plain = model.generate(
            ids,
            max_new_tokens=5,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    assert not torch.allclose(scores[0], torch.stack(plain.scores), atol=1e-5)


def test_last_under_generate_edits_every_new_token():
    """'last' = the newest token of each forward: in cached decoding every generated token is edited."""
    model = tiny_model("llama")
    ids = tiny_inputs(model)["input_ids"][:1]
    seen = []
    ffn = find_ffns(model)[0]
    edit = NeuronEdit(layer=0, neurons=[3], op="set", value=7.0, positions="last")
    with torch.no_grad(), steer(model, edit):
        h = ffn.out_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0, :, 3].clone()))
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        h.remove()
    assert seen[0].shape[0] == 7 and seen[0][-1] == 7.0 and torch.all(seen[0][:-1] != 7.0)
    assert all(s.shape[0] == 1 and s[0] == 7.0 for s in seen[1:])


# ----- MoE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(MOE))
def test_expert_forcing(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    base = _out(model, inputs)
    ffn = find_ffns(model)[0]
    routed = []
    with steer(model, ExpertEdit(layer=0, on=[3], off=[0])):
        h = ffn.router_module.register_forward_hook(lambda m, a, o: routed.append(o[2].clone()))
        steered = _out(model, inputs)
        h.remove()
    idx = routed[0]  # [N, k]
    assert torch.all((idx == 3).any(-1)), "a forced-on expert is in every token's top-k"
    assert not torch.any(idx == 0), "a forced-off expert is never routed to"
    assert not torch.allclose(steered, base)
    assert torch.equal(_out(model, inputs), base)  # reversible


def test_expert_forcing_matches_manual_routing():
    """The steered layer equals FFN.forward with the router logits edited by SteerMoE's rule."""
    model = tiny_model("mixtral")
    inputs = tiny_inputs(model)
    ffn = find_ffns(model)[0]
    with (
        torch.no_grad(),
        steer(model, ExpertEdit(layer=0, on=[2], off=[1])),
        capture(model, ["in", "out"], 0) as cap,
    ):
        model(**inputs)
    x, y = cap["in", 0], cap["out", 0]
    logits = x @ ffn.router.weight.T
    logits[:, 2] = logits.amax(-1) + 0.01
    logits[:, 1] = logits.amin(-1) - 0.01
    probs = torch.softmax(logits, -1)
    w, i = probs.topk(ffn.router.top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for e, expert in enumerate(ffn.experts):
        tok, slot = torch.where(i == e)
        expected.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
    assert torch.allclose(expected, y.reshape(expected.shape), atol=1e-5)


def test_shared_expert_neurons():
    model = tiny_model("qwen2_moe")
    inputs = tiny_inputs(model)
    with steer(model, NeuronEdit(layer=0, neurons=[2, 9], op="zero", expert="shared")):
        zeroed = _out(model, inputs)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        find_ffns(ref)[0].shared.W_out[:, [2, 9]] = 0.0
    assert torch.allclose(zeroed, _out(ref, inputs), atol=1e-6)


# ----- errors ------------------------------------------------------------------------------------------
def test_errors():
    dense_model, moe_model = tiny_model("llama"), tiny_model("mixtral")
    cases = [
        (dense_model, NeuronEdit(layer=2, neurons=[0]), LayerIndexError),
        (dense_model, NeuronEdit(layer=0, neurons=[48]), LayerIndexError),
        (dense_model, NeuronEdit(layer=0, neurons=[1], op="double"), InvalidArgumentError),
        (dense_model, NeuronEdit(layer=0, neurons=[1], positions="first"), InvalidArgumentError),
        (dense_model, NeuronEdit(layer=0, neurons=[1], site="out"), InvalidArgumentError),
        (dense_model, ExpertEdit(layer=0, on=[1]), InvalidArgumentError),
        (moe_model, NeuronEdit(layer=0, neurons=[1]), InvalidArgumentError),
        (moe_model, ExpertEdit(layer=0, on=[4]), LayerIndexError),
        (moe_model, ExpertEdit(layer=0, on=[1], off=[1]), InvalidArgumentError),
        (moe_model, ExpertEdit(layer=0, on=[0, 1, 2]), InvalidArgumentError),
    ]
    for model, edit, err in cases:
        with pytest.raises(err), steer(model, edit):
            pass
    # a failing edit leaves no hook behind
    inputs = tiny_inputs(dense_model)
    base = _out(dense_model, inputs)
    with (
        pytest.raises(LayerIndexError),
        steer(dense_model, [NeuronEdit(0, [1], "zero"), NeuronEdit(0, [99])]),
    ):
        pass
    assert torch.equal(_out(dense_model, inputs), base)


def test_cli_int_lists():
    from ffnkit.cli.inspect import parse_ints

    assert parse_ints("1,3-5, 9") == [1, 3, 4, 5, 9]
    assert parse_ints(None) is None
    with pytest.raises(InvalidArgumentError):
        parse_ints("a,b")


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_last_position_per_row_of_a_batch(family):
    """OPT flattens [B, T] before its FFN; 'last' still means the last token of every row."""
    model = tiny_model(family)
    inputs = tiny_inputs(model)  # batch 2
    base = _out(model, inputs)
    with steer(model, NeuronEdit(layer=1, neurons=NEURONS, op="set", value=4.0, positions="last")):
        last = _out(model, inputs)
    assert torch.equal(last[:, :-1], base[:, :-1])
    assert not torch.allclose(last[0, -1], base[0, -1]) and not torch.allclose(last[1, -1], base[1, -1])


def test_expert_forcing_at_the_last_position_only():
    model = tiny_model("olmoe")
    inputs = tiny_inputs(model)  # batch 2, 7 tokens
    ffn = find_ffns(model)[1]
    routed = []
    with steer(model, ExpertEdit(layer=1, on=[3], off=[0], positions="last")):
        h = ffn.router_module.register_forward_hook(lambda m, a, o: routed.append(o[2].clone()))
        _out(model, inputs)
        h.remove()
    idx = routed[0].view(2, 7, -1)
    assert torch.all((idx[:, -1] == 3).any(-1)) and not torch.any(idx[:, -1] == 0)
    plain = []
    h = ffn.router_module.register_forward_hook(lambda m, a, o: plain.append(o[2].clone()))
    _out(model, inputs)
    h.remove()
    assert torch.equal(idx[:, :-1], plain[0].view(2, 7, -1)[:, :-1])


def test_concept_steering_on_a_tiny_model():
    """Neurons picked by the word search, set high: more mass on the words; negated: less; model restored."""
    from ffnkit.steering import ConceptConfig, steer_concept
    from tests.unit.test_vocab import FakeTokenizer

    model = tiny_model("llama")
    tokens = torch.randint(3, 96, (256,), generator=torch.Generator().manual_seed(0))
    base = _out(model, {"input_ids": tokens[None, :16]})
    cfg = dict(words=["w10", "w11"], n_neurons=4, value=30.0, window=64, ppl_window=128)
    up = steer_concept(model, FakeTokenizer(), tokens, ConceptConfig(**cfg))
    down = steer_concept(model, FakeTokenizer(), tokens, ConceptConfig(**cfg, suppress=True))
    assert up.word_token_ids == [10, 11] and len(up.neurons) == 4
    assert up.mass_steered > up.mass_plain > down.mass_steered
    assert up.ppl_plain == down.ppl_plain and up.to_dict()["word_mass"]["ratio"] > 1
    assert torch.equal(_out(model, {"input_ids": tokens[None, :16]}), base)
