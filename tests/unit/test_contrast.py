"""Contrast two prompt sets: a neuron (or expert) forced differently in one set ranks first."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from ffnkit import capture, find_ffns
from ffnkit.core.capture import site_hooks
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.inspect.contrast import contrast, contrast_stats, read_prompts, set_stats
from tests.tiny_models import V, tiny_model

DENSE = ["llama", "gpt2", "opt", "phi3", "t5", "bert"]


def _prompts(n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, V, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g) for _ in range(n)
    ]


@contextmanager
def _force_neuron(ffn, neuron: int, value: float):
    """Set m_neuron to ``value`` at every token, at the post site (the input of W_out)."""
    module, where, _ = site_hooks(ffn, "post")
    assert where == "pre"

    def hook(mod, args):
        m = args[0].clone()
        m[..., neuron] = value
        return (m, *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("family", DENSE)
@pytest.mark.parametrize("rank_by", ["delta", "cohens_d"])
def test_forced_neuron_ranks_first(family, rank_by):
    model = tiny_model(family)
    prompts = _prompts()
    ffn = find_ffns(model)[-1]  # the last FFN: nothing downstream changes, only this neuron differs
    neuron = 11
    with _force_neuron(ffn, neuron, 0.0):  # never active
        a = set_stats(model, prompts)
    with _force_neuron(ffn, neuron, 5.0):  # always active: far above 0.1 × the layer's mean |m|
        b = set_stats(model, prompts)
    res = contrast_stats(a, b, top=5, rank_by=rank_by)
    first = res.neurons[0]
    assert (first["layer"], first["neuron"]) == (ffn.index, neuron)
    assert first["p_a"] == 0.0 and first["p_b"] == 1.0 and first["delta"] == -1.0
    assert first["mean_a"] == 0.0 and first["mean_b"] == pytest.approx(5.0)
    assert first["cohens_d"] == pytest.approx(-5.0 / 1e-6)  # constant in both sets: floored s_pooled
    # the other neurons' m is the same in both sets (their active share may move with the layer's mean)
    assert all(r["cohens_d"] == 0.0 and r["mean_a"] == r["mean_b"] for r in res.neurons[1:])
    assert len(res.neurons) <= 5 * len(a.neurons)
    assert res.tokens["a"] == res.tokens["b"] == sum(p.numel() for p in prompts)


def test_scores_by_hand():
    model = tiny_model("llama")
    pa, pb = _prompts(4, 1), _prompts(5, 2)
    res = contrast_stats(set_stats(model, pa), set_stats(model, pb), top=3)

    def raw(prompts):
        with torch.no_grad(), capture(model, sites="post", layers=[0, 1]) as cap:
            for p in prompts:
                model(input_ids=p[None])
        return {i: cap["post", i].double() for i in (0, 1)}

    def rate(m, i):  # the active-neuron rule written out: |m_i| > 0.1 × mean_j |m_j| on each token
        return float((m[:, i].abs() > 0.1 * m.abs().mean(1)).double().mean())

    ra, rb = raw(pa), raw(pb)
    for row in res.neurons:
        xa, xb = ra[row["layer"]][:, row["neuron"]], rb[row["layer"]][:, row["neuron"]]
        assert row["delta"] == pytest.approx(
            rate(ra[row["layer"]], row["neuron"]) - rate(rb[row["layer"]], row["neuron"])
        )
        na, nb = xa.numel(), xb.numel()
        pooled = ((na * xa.var(unbiased=False) + nb * xb.var(unbiased=False)) / (na + nb)).sqrt()
        assert row["cohens_d"] == pytest.approx(float((xa.mean() - xb.mean()) / pooled), rel=1e-6)
    deltas = [abs(r["delta"]) for r in res.neurons]
    assert deltas == sorted(deltas, reverse=True)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_forced_expert_ranks_first(family):
    model = tiny_model(family)
    prompts = _prompts()
    ffn = next(f for f in find_ffns(model) if f.kind == "moe")
    expert = 2

    @contextmanager
    def force(sign: float):
        # push the expert's router logit up (a) or down (b) so it is / is never among the top k
        def hook(mod, args, out):
            logits = out[0].clone()
            logits[..., expert] += sign * 100.0
            return (logits, *out[1:])

        handle = ffn.router_module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    with force(+1):
        a = set_stats(model, prompts)
    with force(-1):
        b = set_stats(model, prompts)
    res = contrast_stats(a, b, top=3)
    first = res.experts[0]
    assert (first["layer"], first["expert"]) == (ffn.index, expert)
    assert first["p_a"] == 1.0 and first["p_b"] == 0.0 and first["delta"] == 1.0
    shares = a.experts[ffn.index]
    assert float(shares.sum()) == pytest.approx(ffn.router.top_k)  # each token picks k experts


class _Tok:
    def __call__(self, text):
        return {"input_ids": [3 + ord(c) % (V - 3) for c in text]}


def test_contrast_from_files(tmp_path):
    fa, fb = tmp_path / "a.txt", tmp_path / "b.txt"
    fa.write_text("hello world\n\nthe cat sat\n")
    fb.write_text("quantum flux\nzebra\n")
    assert read_prompts(fa) == ["hello world", "the cat sat"]
    res = contrast(tiny_model("gpt2"), _Tok(), fa, fb, top=4, threshold=0.1)
    assert res.prompts == {"a": 2, "b": 2}
    assert res.tokens == {
        "a": len("hello world") + len("the cat sat"),
        "b": len("quantum flux") + len("zebra"),
    }
    assert len(res.neurons) == 4 and res.threshold == 0.1
    assert res.experts == []
    doc = res.to_dict()  # the CLI's JSON shape
    keys = ["rank_by", "scores", "tokens", "prompts", "neurons", "experts", "threshold"]
    assert list(doc) == keys and doc["neurons"] == res.neurons


def test_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InvalidArgumentError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    model = tiny_model("llama")
    s = set_stats(model, _prompts(2))
    with pytest.raises(InvalidArgumentError, match="rank_by"):
        contrast_stats(s, s, rank_by="magic")
    with pytest.raises(InvalidArgumentError, match="same"):
        contrast_stats(s, set_stats(model, _prompts(2), threshold=0.5))
