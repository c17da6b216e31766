"""The real default model: projections that mean something, an exact trace, a concept that moves."""

from __future__ import annotations

import pytest
import torch

from ffnkit.inspect.lens import Lens
from ffnkit.inspect.tracing import trace
from ffnkit.inspect.vocab import project_neurons, search_neurons
from ffnkit.steering import ConceptConfig, NeuronEdit, generate_pair, steer, steer_concept, word_mass

pytestmark = pytest.mark.integration

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@pytest.fixture(scope="module")
def model_tok():
    from ffnkit.sources.models import load_model

    return load_model("smollm2-135m")


def _words_in(tokens: list[dict], words: list[str]) -> set[str]:
    wanted = {w.lower() for w in words}
    return {t["token"].strip().lower() for t in tokens} & wanted


def test_search_finds_a_number_neuron(model_tok):
    """The best neuron for number words promotes several of them among its top-10 tokens."""
    model, tok = model_tok
    res = search_neurons(model, tok, NUMBERS, top_n=3, top_k=10)
    best = res.hits[0]
    found = _words_in(best["promoted"], NUMBERS)
    assert len(found) >= 3, (best["layer"], best["neuron"], [t["token"] for t in best["promoted"]])
    # the projection command shows the same tokens for that neuron
    proj = project_neurons(model, layers=[best["layer"]], neurons=[best["neuron"]], top_k=10, tokenizer=tok)
    row = next(proj.rows())
    assert [t["id"] for t in row["promoted"]] == [t["id"] for t in best["promoted"]]


def test_search_finds_a_weekday_neuron(model_tok):
    model, tok = model_tok
    res = search_neurons(model, tok, DAYS, top_n=5, top_k=10)
    assert max(len(_words_in(h["promoted"], DAYS)) for h in res.hits) >= 3


def test_trace_is_exact_and_ends_at_the_prediction(model_tok):
    model, tok = model_tok
    t = trace(model, tok, "Monday, Tuesday, Wednesday, Thursday, Friday,", target="Saturday", top_k=5)
    assert "Saturday" in [p["token"].strip() for p in t.prediction]  # among the model's top 5
    lens = Lens.of(model)
    assert torch.allclose(lens.logits(t.layers[-1].resid_after), t.logits, atol=1e-3)
    for lt in t.layers:
        recon = lt.contributions().sum(0)
        assert (recon - lt.out).abs().max().item() < 1e-3 * max(1.0, lt.out.abs().max().item())
    # by the last layer the logit lens agrees with the model; the target's total FFN push is positive
    assert t.to_dict()["layers"][-1]["after"][0]["id"] == t.prediction[0]["id"]
    assert sum(lt.target["ffn_total"] for lt in t.layers) > 0


def test_concept_steering_moves_mass(model_tok):
    """Setting the weekday neurons raises the probability of weekday tokens, at a perplexity cost."""
    from ffnkit.data import evaluation_tokens, load_corpus

    model, tok = model_tok
    tokens = evaluation_tokens(load_corpus("shakespeare"), tok, max_tokens=256)
    cfg = dict(words=DAYS, n_neurons=10, value=3.0, window=128, ppl_window=256)
    rep = steer_concept(model, tok, tokens, ConceptConfig(**cfg))
    assert rep.mass_steered > 5 * rep.mass_plain
    assert rep.ppl_steered > rep.ppl_plain
    # the same neurons, negated: less mass than without steering
    down = [NeuronEdit(e.layer, e.neurons, "set", -3.0) for e in rep.edits]
    with steer(model, down):
        mass_down, _ = word_mass(model, tokens, rep.word_token_ids, window=128)
    assert mass_down < rep.mass_plain
    gen = generate_pair(model, tok, "The meeting is on", rep.edits, max_new_tokens=6)
    assert gen.steered != gen.plain
    n_days = {k: sum(getattr(gen, k).count(d) for d in DAYS) for k in ("plain", "steered")}
    assert n_days["steered"] >= 2 and n_days["steered"] > n_days["plain"]


def test_steer_zero_changes_then_restores(model_tok):
    model, tok = model_tok
    ids = tok("Monday, Tuesday, Wednesday,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, NeuronEdit(20, [1337], "scale", 1.0)):
            same = model(ids).logits
        after = model(ids).logits
    assert torch.equal(base, same) and torch.equal(base, after)
