"""Output folders: nothing overwritten without --overwrite; never the input or the cache; checked first.

Issue 11, item 2: `compress -o DIR` into another model's folder deleted its shards and left stale files;
`compress DIR -o DIR` replaced its own input; `-o ~/.cache/ffnkit/models/smollm2-135m` replaced the
cached built-in model for every later command.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from ffnkit.core.errors import OutputFolderError
from ffnkit.folders import check_output_dir
from tests.reliability.cli import ffnkit, one_line_error


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _compress(model: Path | str, out: Path, *extra: str):
    return ffnkit(
        "compress", str(model), "--method", "magnitude", "--ratio", "0.3", "-o", str(out), "--no-eval", *extra
    )


@pytest.fixture()
def other_model(tiny_folder: Path, tmp_path: Path) -> Path:
    """A folder holding another model: shards, an index and a stale .bin, as hub downloads have."""
    other = tmp_path / "other-model"
    shutil.copytree(tiny_folder, other)
    (other / "model.safetensors").rename(other / "model-00001-of-00002.safetensors")
    (other / "model-00002-of-00002.safetensors").write_bytes(b"second shard")
    (other / "model.safetensors.index.json").write_text("{}")
    (other / "pytorch_model.bin").write_bytes(b"old weights")
    return other


def test_compress_into_another_model_is_refused_and_leaves_it_untouched(tiny_folder, other_model):
    before = _snapshot(other_model)
    line = one_line_error(_compress(tiny_folder, other_model))
    assert "not empty" in line and "--overwrite" in line
    assert _snapshot(other_model) == before


def test_compress_with_overwrite_replaces_the_whole_folder(tiny_folder, other_model):
    run = _compress(tiny_folder, other_model, "--overwrite")
    assert run.returncode == 0, run.stderr[-2000:]
    names = {p.name for p in other_model.iterdir()}
    assert "pytorch_model.bin" not in names and "model-00002-of-00002.safetensors" not in names
    assert "ffnkit.json" in names and "model.safetensors" in names


@pytest.mark.parametrize("where", ["same", "inside"])
def test_compress_never_writes_into_its_input(tiny_folder, where):
    # the same folder even with --overwrite; a new folder inside it even though it is empty
    out, extra = (tiny_folder, ["--overwrite"]) if where == "same" else (tiny_folder / "sub", [])
    before = _snapshot(tiny_folder)
    line = one_line_error(_compress(tiny_folder, out, *extra))
    assert "input" in line
    assert _snapshot(tiny_folder) == before


def test_compress_never_writes_into_the_cache(tiny_folder, _own_cache):
    cached = _own_cache / "models" / "smollm2-135m"  # where the built-in model is converted to
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    before = _snapshot(_own_cache)
    line = one_line_error(_compress(tiny_folder, cached, "--overwrite"))
    assert "cache" in line
    assert _snapshot(_own_cache) == before
    assert "cache" in one_line_error(_compress(tiny_folder, _own_cache / "models" / "new"))  # new, empty
    one_line_error(_compress(tiny_folder, _own_cache.parent, "--overwrite"))  # a folder holding the cache
    assert _snapshot(_own_cache) == before


def test_a_bad_output_folder_fails_before_the_model_is_loaded(other_model):
    # the model does not even exist: the error is about -o, so the folder was checked first
    line = one_line_error(_compress("no-such-model-anywhere", other_model))
    assert "not empty" in line


def test_report_into_a_non_empty_folder_needs_overwrite(tiny_folder, corpus, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["report", str(tiny_folder), "-o", str(out), "--corpus", str(corpus), "--samples", "2"]
    line = one_line_error(ffnkit(*args, "--seq-len", "16"))
    assert "not empty" in line and (out / "notes.txt").read_text() == "mine"


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="not a folder"):
        check_output_dir(tmp_path / "file")


def test_overwrite_never_replaces_a_folder_without_a_model(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputFolderError, match="no model or report"):
        check_output_dir(tmp_path / "docs", overwrite=True)


def test_unwritable_place_is_refused_before_work(tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputFolderError, match="not writable.*Read-only"):
        check_output_dir(tmp_path / "new" / "out")


def test_too_little_space_is_refused_before_work(tmp_path, monkeypatch, tiny_folder):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(OutputFolderError, match="needs about"):
        check_output_dir(tmp_path / "out", model_source=str(tiny_folder))  # estimated from its weights
    check_output_dir(tmp_path / "out", needed_bytes=500)  # 500 bytes fit
