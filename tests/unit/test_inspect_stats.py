"""Neuron statistics and streaming top-k contexts against brute force over raw captured tensors."""

from __future__ import annotations

import pytest
import torch

from ffnkit import capture, find_ffns
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.inspect.stats import MARK_CLOSE, MARK_OPEN, StreamingTopK, decode_context, neuron_stats
from tests.tiny_models import V, tiny_model

FAMILIES = ["llama", "gpt2", "opt", "phi3", "t5", "bert"]
N_SEQ, T = 5, 9


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (N_SEQ, T), generator=torch.Generator().manual_seed(seed))


def _raw_post(model, ids, layer):
    """All m of one layer over the whole batch in one forward: [N_SEQ * T, d_ff], sequence-major."""
    kwargs = {"input_ids": ids}
    if model.config.model_type == "t5":
        kwargs["decoder_input_ids"] = ids
    with torch.no_grad(), capture(model, sites="post", layers=[layer]) as cap:
        model(**kwargs)
    return cap["post", layer].double()


@pytest.mark.parametrize("family", FAMILIES)
def test_top_contexts_equal_brute_force(family):
    model = tiny_model(family)
    ids = _ids()
    layer, neurons, k = 1, [0, 3, 7, 20], 4
    res = neuron_stats(model, ids, layers=[layer], contexts={layer: neurons}, k=k, batch_size=2)
    raw = _raw_post(model, ids, layer)  # [N*T, d_ff]
    vals, idx = torch.topk(raw[:, neurons].T, k, dim=1)  # [n, k]
    chosen, top = res.top[layer]
    assert chosen == neurons and top.values.shape == (len(neurons), k)
    torch.testing.assert_close(top.values.double(), vals, atol=1e-5, rtol=1e-5)
    assert torch.equal(top.sequence, idx // T)
    assert torch.equal(top.position, idx % T)


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_equal_raw(family):
    model = tiny_model(family)
    ids = _ids(1)
    res = neuron_stats(model, ids, threshold=0.5, batch_size=3)
    ffns = [f for f in find_ffns(model) if f.kind != "moe"]
    assert sorted(res.layers) == [f.index for f in ffns]
    for f in ffns:
        raw = _raw_post(model, ids, f.index)
        s = res.layers[f.index]
        torch.testing.assert_close(s["mean"], raw.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s["var"], raw.var(0, unbiased=False), atol=1e-6, rtol=1e-4)
        # the active-neuron rule written out: |m_i| > 0.5 × mean_j |m_j| on each token
        active = raw.abs() > 0.5 * raw.abs().mean(1, keepdim=True)  # [N, d_ff]
        torch.testing.assert_close(s["firing_rate"], active.double().mean(0))
    assert res.n_tokens == N_SEQ * T
    assert len(res.summary()) == len(ffns)
    doc = res.to_dict()  # the CLI's JSON fields
    assert list(doc) == ["site", "threshold", "tokens", "layers"] and doc["threshold"] == 0.5
    assert doc["layers"] == res.summary()


def test_streaming_topk_many_chunks_and_bounded_memory():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, 6, generator=g)  # [seqs, T, n]
    top = StreamingTopK(n=6, k=5)
    sizes = []
    for s in range(0, 40, 3):
        top.update(x[s : s + 3], seq_offset=s)
        sizes.append(top.state_numel())
    vals, idx = torch.topk(x.reshape(-1, 6).T, 5, dim=1)
    torch.testing.assert_close(top.values, vals)
    assert torch.equal(top.sequence, idx // 16) and torch.equal(top.position, idx % 16)
    assert max(sizes) == 3 * 6 * 5  # bounded by k, not by tokens seen
    absolute = StreamingTopK(n=6, k=2, absolute=True)
    absolute.update(x, 0)
    assert torch.equal(absolute.values.abs(), torch.topk(x.reshape(-1, 6).abs().T, 2, dim=1).values)


class _Tok:
    """A fake tokenizer: token id i decodes to 'w<i> '."""

    def decode(self, ids):
        return "".join(f"w{i} " for i in ids)


def test_decode_context_marks_token():
    ids = torch.arange(10, 30)
    ctx = decode_context(_Tok(), ids, position=5, window=2)
    assert ctx.token_id == 15 and ctx.token == "w15 "
    assert ctx.text == f"w13 w14 {MARK_OPEN}w15 {MARK_CLOSE}w16 w17 "
    assert ctx.to_dict() == {"token": "w15 ", "token_id": 15, "text": ctx.text}
    edge = decode_context(_Tok(), ids, position=0, window=3)
    assert edge.text.startswith(MARK_OPEN + "w10 ")


def test_contexts_rows_are_decoded():
    model = tiny_model("llama")
    ids = _ids(2)
    res = neuron_stats(model, ids, layers=[0], contexts={0: [4]}, k=3)
    rows = res.contexts(_Tok(), ids, window=2)
    assert [(r["layer"], r["neuron"]) for r in rows] == [(0, 4)]
    for c in rows[0]["contexts"]:
        assert f"{MARK_OPEN}w{int(ids[c['sequence'], c['position']])} {MARK_CLOSE}" in c["text"]
    values = [c["value"] for c in rows[0]["contexts"]]
    assert values == sorted(values, reverse=True)


def test_errors():
    with pytest.raises(InvalidArgumentError, match="mixture of experts"):
        neuron_stats(tiny_model("mixtral"), _ids())
    model = tiny_model("llama")
    with pytest.raises(InvalidArgumentError, match="outside"):
        neuron_stats(model, _ids(), contexts={0: [10_000]})
    with pytest.raises(InvalidArgumentError, match="k >= 1"):
        StreamingTopK(3, 0)


def test_cli_commands_registered_and_neurons_need_one_layer():
    from typer.testing import CliRunner

    from ffnkit.cli.main import app

    runner = CliRunner()
    listing = runner.invoke(app, ["inspect", "--help"])
    for command in ("stats", "spectral", "importance", "contrast", "early-exit"):
        assert command in listing.output
    result = runner.invoke(app, ["inspect", "stats", "--neurons", "3,4", "--json"])
    assert isinstance(result.exception, InvalidArgumentError)  # raised before any model is loaded
    assert "--layer" in str(result.exception)
