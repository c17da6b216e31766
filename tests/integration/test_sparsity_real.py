"""The real default model: activation sparsity at 40% of FFN weight bytes keeps perplexity in a sane band,
hits its target on held-out text, and reloads exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from ffnkit.data import calibration_batches, evaluation_tokens, load_corpus
from ffnkit.evaluate import perplexity
from ffnkit.sources.models import load_model
from ffnkit.sparsity import SparsityConfig, sparsify_

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup():
    model, tok = load_model("smollm2-135m")
    calib = calibration_batches(load_corpus("shakespeare"), tok, n_samples=8, seq_len=256, seed=0)
    tokens = evaluation_tokens(load_corpus("austen"), tok, max_tokens=1024)  # 2 windows of 512
    return model, tok, calib, tokens


@pytest.mark.parametrize("rule", ["teal", "best"])
def test_forty_percent_keeps_perplexity_sane(setup, rule, tmp_path):
    from ffnkit.io import load, save

    dense, tok, calib, tokens = setup
    base = perplexity(dense, tokens, window=512).perplexity
    model = copy.deepcopy(dense)
    config = SparsityConfig(
        rule, 0.4, samples=8, tokens=2048, path_tokens=128, probe_windows=1, probe_tokens=128
    )
    result = sparsify_(model, config, calibration=calib, tokenizer=tok)
    assert abs(result.measured["bytes_skipped"] - 0.4) <= 0.02
    ppl = perplexity(model, tokens, window=512).perplexity
    assert base < ppl < 1.3 * base, (rule, base, ppl)
    save(model, tok, tmp_path / rule, report=result)
    loaded, _ = load(tmp_path / rule)
    ids = tokens[None, :128]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
