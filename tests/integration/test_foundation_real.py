"""The foundation on the real default model and corpus: FFNs found, recomputed exactly, sane perplexity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffnkit import capture, evaluation_tokens, find_ffns, load_corpus, load_model, perplexity

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_thirty_gated_ffns(smollm):
    model, _ = smollm
    ffns = find_ffns(model)
    assert len(ffns) == 30
    assert {(f.kind, f.d_model, f.d_ff, f.activation) for f in ffns} == {("gated", 576, 1536, "silu")}


def test_real_ffns_recompute_exactly(smollm):
    model, tok = smollm
    ffns = find_ffns(model)
    ids = tok("Now is the winter of our discontent made glorious summer", return_tensors="pt").input_ids
    with torch.no_grad(), capture(model, sites=["in", "post", "out"], ffns=ffns) as cap:
        model(ids)
    for ffn in ffns:
        y = cap["out", ffn.index]
        assert (ffn(cap["in", ffn.index]) - y).abs().max().item() < 1e-4 * max(1.0, y.abs().max().item())
        assert (cap["post", ffn.index] @ ffn.W_out.T - y).abs().max().item() < 1e-4 * max(
            1.0, y.abs().max().item()
        )


def test_perplexity_on_default_corpus_is_sane(smollm):
    model, tok = smollm
    tokens = evaluation_tokens(load_corpus("shakespeare"), tok)
    result = perplexity(model, tokens, progress=False)
    assert result.protocol["n_tokens"] == 4096 and result.protocol["window"] == 512
    # a 135M instruct model on early-modern English verse: well above 1, far below the vocabulary size
    assert 8 < result.perplexity < 80, result.perplexity


def test_cli_models_json_lists_thirty_gated_ffns():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(
        [sys.executable, "-m", "ffnkit", "models", "smollm2-135m", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert len(doc["ffns"]) == 30
    assert all(f["kind"] == "gated" and f["d_model"] == 576 and f["d_ff"] == 1536 for f in doc["ffns"])
