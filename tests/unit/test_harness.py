"""`ffnkit eval --tasks` through lm-eval's HFLM: an offline corpus task whose byte perplexity is checked
against log-probabilities computed here with plain torch."""

from __future__ import annotations

import math

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError
from tests.tiny_models import SAMPLE_TEXT
from tests.unit.test_export import bpe_tokenizer, tiny_llama

pytest.importorskip("lm_eval")


def test_local_task_byte_perplexity_matches_torch(tmp_path) -> None:
    from ffnkit.harness import run_harness

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT.replace("\n", "\n\n"))
    model, tok = tiny_llama(), bpe_tokenizer()
    out = run_harness(model, tok, [f"ffnkit:{corpus}"], limit=2, max_chars=3000, doc_chars=600)
    metrics = out["results"]["ffnkit_corpus"]
    assert out["tasks"]["ffnkit_corpus"]["documents"] >= 2
    # the oracle: the same documents scored with plain torch after lm-eval's prefix token (BOS)
    from ffnkit.data import load_corpus
    from ffnkit.harness import split_documents

    texts = split_documents(load_corpus(str(corpus), progress=False).evaluation_text, 3000, 600)[:2]
    nll, nbytes = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # [T-1, V]
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            nbytes += len(text.encode("utf-8"))
    assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(nll / nbytes), rel=1e-4)
    assert metrics["bits_per_byte,none"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-4)


def test_harness_refuses_before_loading() -> None:
    from ffnkit.harness import check_harness

    with pytest.raises(InvalidArgumentError, match="at least one task"):
        check_harness([])
    from ffnkit.core.errors import CorpusError

    with pytest.raises(CorpusError):
        check_harness(["ffnkit:/no/such/corpus.txt"])
