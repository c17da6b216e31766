"""The real default model: the best pruning recipe beats uniform Wanda-sp at 30% of FFN parameters removed,
the pruned model saves, reloads exactly, and evaluates through the CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffnkit.compress import PruneConfig, collect_stats, prune_
from ffnkit.compress.prune import BEST
from ffnkit.data import calibration_batches, evaluation_tokens, load_corpus
from ffnkit.evaluate import perplexity
from ffnkit.sources.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup():
    model, tok = load_model("smollm2-135m")
    calib = calibration_batches(load_corpus("shakespeare"), tok, n_samples=16, seq_len=128, seed=0)
    tokens = evaluation_tokens(load_corpus("austen"), tok, max_tokens=1024)  # 2 windows of 512
    stats = collect_stats(model, calib, covariance=True)
    return model, tok, calib, tokens, stats


def test_best_recipe_beats_uniform_wanda_sp_at_30_percent(setup):
    model, _, calib, tokens, stats = setup
    ppl = {}
    for name, cfg in {
        "wanda-sp": PruneConfig("wanda-sp", 0.3),
        "best": PruneConfig(**BEST, ratio=0.3),
    }.items():
        m = copy.deepcopy(model)
        report = prune_(m, cfg, calibration=calib, stats=stats)
        assert abs(report.ffn_ratio_removed - 0.3) < 0.01
        ppl[name] = perplexity(m, tokens, progress=False).perplexity
    dense = perplexity(model, tokens, progress=False).perplexity
    assert dense < ppl["best"] < ppl["wanda-sp"], ppl


def test_save_reload_exact_and_cli_eval(setup, tmp_path):
    from ffnkit import io

    model, tok, calib, tokens, stats = setup
    m = copy.deepcopy(model)
    prune_(m, PruneConfig("flap", 0.3, allocation="global"), calibration=calib, stats=stats)
    io.save(m, tok, tmp_path / "flap30")
    loaded, tok2 = io.load(tmp_path / "flap30")
    ids = tokens[None, :256]
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert tok2 is not None and tok2("hello").input_ids == tok("hello").input_ids
    import ffnkit

    src = str(Path(ffnkit.__file__).resolve().parents[1])  # the CLI runs from this checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "ffnkit", "eval", str(tmp_path / "flap30"), "--max-tokens", "600", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    doc = json.loads(out.stdout)
    assert doc["parameters"]["ffn"] < 0.72 * 30 * 3 * 576 * 1536
    assert 5 < doc["perplexity"] < 200
