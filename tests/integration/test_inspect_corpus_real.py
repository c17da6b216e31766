"""Corpus-level inspection on the real default model (SmolLM2-135M) and the real corpus.

Kept small (a few sequences of 64–128 tokens, a few layers) so each test stays well under a minute on
2 shared CPU cores.
"""

from __future__ import annotations

import json

import pytest
import torch

from ffnkit.data import calibration_batches, evaluation_tokens, load_corpus
from ffnkit.inspect.early_exit import early_exit
from ffnkit.inspect.importance import block_influence
from ffnkit.inspect.spectral import spectral_utilisation
from ffnkit.inspect.stats import MARK_CLOSE, MARK_OPEN, neuron_stats
from ffnkit.sources.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real():
    model, tok = load_model("smollm2-135m")
    corpus = load_corpus("shakespeare")
    return model, tok, corpus


def test_spectral_ranks_are_sane(real):
    model, tok, corpus = real
    batches = calibration_batches(corpus, tok, n_samples=4, seq_len=128)
    res = spectral_utilisation(model, batches, layers=[3, 15, 24])
    n_tokens = batches.numel()
    for row in res.layers:
        assert row["d_ff"] == 1536 and row["tokens"] == n_tokens
        # 1 ≤ hard ≤ soft ≤ min(d_ff, tokens − 1): a covariance of N centred tokens has rank ≤ N − 1
        assert 1.0 <= row["hard_rank"] <= row["soft_rank"] <= n_tokens - 1
        # real middle layers spread their variance: far more than a handful of directions
        assert row["soft_rank"] > 20
        assert 0 < row["utilisation"] < 1 and 0 < row["top1pct_share"] < 1


def test_shortgpt_block_influence_first_and_last(real):
    model, tok, corpus = real
    batches = calibration_batches(corpus, tok, n_samples=2, seq_len=128)
    res = block_influence(model, batches)
    bi = [r["bi"] for r in res.layers]
    assert len(bi) == 30 and all(0 <= b <= 2 for b in bi)
    middle = sorted(bi[5:25])[len(bi[5:25]) // 2]
    # ShortGPT's observation: the first block (and the last) turn the residual stream far more than
    # a typical middle block, which is why middle blocks are the ones that get dropped
    assert bi[0] > middle and bi[-1] > middle
    assert res.ranking[0] not in (0, 29)


def test_early_exit_on_real_model(real):
    model, tok, corpus = real
    cal = calibration_batches(corpus, tok, n_samples=2, seq_len=128)
    ev = evaluation_tokens(corpus, tok, max_tokens=256).reshape(2, 128)
    res = early_exit(model, cal, ev, target=0.9)
    best = res.rules["confidence_min_layer_stable"]
    e = best.evaluation
    assert best.calibration.agreement >= 0.9
    # held-out agreement stays near the target, and the rule saves something real
    assert e.agreement >= 0.75 and e.tokens == 256
    assert 0.01 < e.layers_saved < 1
    sat = res.saturation
    assert sum(r["tokens"] for r in sat.distribution) == 256
    assert 1 <= sat.mean_saturation_layer <= 30
    # a perfect rule could save something: some tokens settle before the last layer
    assert sat.oracle_layers_saved > 0.02


def test_top_contexts_are_text(real):
    model, tok, corpus = real
    batches = calibration_batches(corpus, tok, n_samples=4, seq_len=64)
    res = neuron_stats(model, batches, layers=[5], contexts={5: [0, 100]}, k=3)
    rows = res.contexts(tok, batches, window=6)
    assert [(r["layer"], r["neuron"]) for r in rows] == [(5, 0), (5, 100)]
    for row in rows:
        assert len(row["contexts"]) == 3
        for c in row["contexts"]:
            assert MARK_OPEN in c["text"] and MARK_CLOSE in c["text"]
            assert c["token"] in c["text"] and any(ch.isalpha() for ch in c["text"])
            assert c["token_id"] == int(batches[c["sequence"], c["position"]])
        values = [c["value"] for c in row["contexts"]]
        assert values == sorted(values, reverse=True)
    fr = res.layers[5]["firing_rate"]
    assert fr.shape == (1536,) and 0 < float(fr.mean()) < 1


def test_cli_stats_json(real, capsys):
    from typer.testing import CliRunner

    from ffnkit.cli.main import app

    result = CliRunner().invoke(
        app,
        [
            "inspect",
            "stats",
            "--layer",
            "2",
            "--neurons",
            "7",
            "--top-contexts",
            "2",
            "--samples",
            "2",
            "--seq-len",
            "64",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tokens"] == 128 and doc["layers"][0]["layer"] == 2
    assert len(doc["neurons"][0]["contexts"]) == 2 and len(doc["per_neuron"]["firing_rate"]) == 1536
    assert torch.tensor(doc["per_neuron"]["var"]).min() >= 0


def test_cli_contrast_json(real, tmp_path):
    from typer.testing import CliRunner

    from ffnkit.cli.main import app

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("I am so happy today!\nWhat a wonderful, joyful day.\n")
    b.write_text("The function returns a list of integers.\nCompile the code with gcc -O2.\n")
    result = CliRunner().invoke(
        app, ["inspect", "contrast", "--a", str(a), "--b", str(b), "--top", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = doc["neurons"]
    assert len(rows) == 5 and doc["experts"] == []
    deltas = [abs(r["delta"]) for r in rows]
    assert deltas == sorted(deltas, reverse=True) and deltas[0] > 0.5  # two very different prompt sets
    assert all(0 <= r["p_a"] <= 1 and 0 <= r["p_b"] <= 1 for r in rows)
