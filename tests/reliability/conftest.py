"""Fixtures of the hostile-input suite: a tiny saved model, a corpus, and an isolated ffnkit cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own ffnkit cache (and Hugging Face module cache): the user's is never touched."""
    monkeypatch.setenv("FFNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    return tmp_path / "cache"


@pytest.fixture()
def tiny_folder(tmp_path: Path) -> Path:
    """A plain transformers folder: tiny Llama weights and its tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT)
    return path
