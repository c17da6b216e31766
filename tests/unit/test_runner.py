"""The one forward pass (core.runner): device, seq2seq decoder ids, log-probs, layer states, eval mode,
batching, and the one causal-LM check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.runner import (
    check_causal_lm,
    device_of,
    evaluating,
    forward,
    is_causal_lm,
    iter_batches,
    layer_states,
    log_probs,
    logits,
    run,
)
from tests.tiny_models import L, V, tiny_model


def _ids(n: int = 3, t: int = 6) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "mixtral"])
def test_forward_and_log_probs_equal_the_model_called_by_hand(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits  # [B, T, V]
        torch.testing.assert_close(logits(model, ids), want, atol=0, rtol=0)
        lp = log_probs(model, ids)
    assert lp.dtype == torch.float32 and lp.shape == (3, 6, V)
    torch.testing.assert_close(lp, torch.log_softmax(want.float(), -1))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 6))


def test_seq2seq_gets_the_ids_as_decoder_input():
    model = tiny_model("t5")
    ids = _ids()
    with torch.no_grad():
        out = forward(model, ids, hidden_states=True)
        want = model(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(out.logits, want, atol=0, rtol=0)
    states = layer_states(model, out)  # the decoder's, without the embedding output
    assert len(states) == L and torch.equal(states[-1], out.decoder_hidden_states[-1])


def test_layer_states_drop_the_embeddings_and_keep_gradients():
    model = tiny_model("llama")
    out = forward(model, _ids(), hidden_states=True)
    states = layer_states(model, out)
    assert len(states) == L and all(s.shape == (3, 6, 32) for s in states)
    assert states[0].requires_grad  # forward changes no mode: healing trains through it
    assert layer_states(model, forward(model, _ids())) == ()


def test_labels_give_the_lm_loss():
    model = tiny_model("llama")
    ids = _ids()
    out = forward(model, ids, labels=True)
    lp = log_probs(model, ids)[:, :-1]  # position t predicts token t + 1
    nll = -lp.gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(out.loss, nll, atol=1e-5, rtol=1e-5)


def test_causal_lm_check_is_one_line_naming_the_fix():
    assert is_causal_lm(tiny_model("llama")) and is_causal_lm(tiny_model("gpt2"))
    for family, why in (("t5", "encoder-decoder"), ("bert", "language-modelling head")):
        model = tiny_model(family)
        assert not is_causal_lm(model)
        with pytest.raises(InvalidArgumentError, match=why) as err:
            check_causal_lm(model, "perplexity")
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("perplexity needs a causal LM") and "load a" in msg
    check_causal_lm(tiny_model("llama"), "perplexity")  # no error


def test_evaluating_restores_training_and_grad_even_after_an_error():
    model = tiny_model("llama").train()
    with evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="boom"), evaluating(model):
        raise RuntimeError("boom")
    assert model.training and torch.is_grad_enabled()


def test_run_batches_every_row_once_and_restores_the_mode():
    model = tiny_model("llama").train()
    ids = _ids(5, 4)
    seen: list[torch.Tensor] = []
    handle = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        outs = [(s, chunk, out) for s, chunk, out in run(model, ids, batch_size=2)]
    finally:
        handle.remove()
    assert [s for s, _, _ in outs] == [0, 2, 4] and seen == [2, 2, 1]
    assert torch.equal(torch.cat([c for _, c, _ in outs]), ids)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(torch.cat([o.logits for _, _, o in outs]), want, atol=1e-6, rtol=1e-5)


def test_run_is_in_eval_mode_without_gradients_while_it_runs():
    model = tiny_model("llama").train()
    for _, _, out in run(model, _ids(2, 4), batch_size=1):
        assert not model.training and not out.logits.requires_grad
    assert model.training


def test_iter_batches_errors_and_device():
    with pytest.raises(InvalidArgumentError, match="n_samples, seq_len"):
        list(iter_batches(torch.zeros(4, dtype=torch.long), 2))
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        list(iter_batches(torch.zeros(4, 3, dtype=torch.long), 0))
    assert device_of(nn.ReLU()) == torch.device("cpu")
    assert device_of(tiny_model("llama")) == torch.device("cpu")
