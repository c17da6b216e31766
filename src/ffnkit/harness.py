"""lm-eval (EleutherAI's evaluation harness) on any ffnkit model, through its ``HFLM`` wrapper.

``run_harness(model, tok, ["ffnkit:austen", "hellaswag"])`` hands the loaded model (pruned, low-rank,
quantised: whatever ``ffnkit.load`` rebuilt) to ``lm_eval.models.huggingface.HFLM`` and runs
``lm_eval.simple_evaluate``. Two kinds of task:

- ``ffnkit:CORPUS`` (any name ``load_corpus`` takes: ``shakespeare``, ``austen``, a text file): rolling
  log-likelihood over the corpus' *evaluation split* (the tail ``max_chars`` characters, cut into
  documents of about ``doc_chars`` at paragraph breaks), with lm-eval's ``word_perplexity``,
  ``byte_perplexity`` and ``bits_per_byte``, wikitext's metrics. These run offline.
- any lm-eval task name (``wikitext``, ``hellaswag``, ``arc_easy``…): lm-eval fetches its dataset from
  the Hugging Face hub; where the hub cannot be reached the task fails with a one-line error naming the
  offline tasks.

Needs the optional extra ``eval`` (``pip install ffnkit[eval]``: lm-eval).

Example:
    >>> out = run_harness(model, tok, ["ffnkit:austen"], limit=4)
    >>> out["results"]["ffnkit_austen"]["word_perplexity,none"]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ffnkit.core.errors import FetchError, InvalidArgumentError

__all__ = ["LOCAL_PREFIX", "check_harness", "local_task", "run_harness", "split_documents"]

LOCAL_PREFIX = "ffnkit:"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InvalidArgumentError(
            "--tasks needs lm-eval: pip install 'ffnkit[eval]' (or pip install lm-eval)"
        ) from None
    return lm_eval, HFLM, TaskManager


def check_harness(tasks: list[str]) -> None:
    """Refuse what cannot run before a model loads: no tasks, lm-eval missing, an unreadable corpus.

    Example:
        >>> check_harness(["ffnkit:austen"])
    """
    if not tasks:
        raise InvalidArgumentError(
            "give at least one task: --tasks ffnkit:austen (offline) or an lm-eval task"
        )
    _lm_eval()
    from ffnkit.data import load_corpus

    for task in tasks:
        if task.startswith(LOCAL_PREFIX):
            load_corpus(task[len(LOCAL_PREFIX) :], progress=False)  # a CorpusError names the fix


def split_documents(text: str, max_chars: int, doc_chars: int) -> list[str]:
    """The last ``max_chars`` characters, cut at paragraph breaks into documents of ≥ ``doc_chars``.

    Example:
        >>> split_documents("a\n\nb\n\nc", 100, 1)
        ['a', 'b', 'c']
    """
    tail = text[-max_chars:] if max_chars > 0 else text
    cut = tail.find("\n\n")
    if 0 <= cut < len(tail) // 4:  # start at a paragraph, not mid-sentence
        tail = tail[cut + 2 :]
    docs, current = [], ""
    for para in tail.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= doc_chars:
            docs.append(current)
            current = ""
    if current.strip():
        docs.append(current)
    return [d for d in docs if d.strip()]


def local_task(corpus: str, folder: Path, max_chars: int = 20000, doc_chars: int = 2000) -> dict[str, Any]:
    """An lm-eval task config (a dict) for rolling perplexity on ffnkit corpus ``corpus``'s evaluation split.

    Example:
        >>> local_task("austen", Path("/tmp/t"))["output_type"]
        'loglikelihood_rolling'
    """
    from ffnkit.data import load_corpus

    text = load_corpus(corpus, progress=False)
    docs = split_documents(text.evaluation_text, max_chars, doc_chars)
    name = "ffnkit_" + "".join(c if c.isalnum() else "_" for c in Path(corpus).stem or corpus)
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        "metadata": {
            "version": 1.0,
            "corpus": text.name,
            "split": "evaluation",
            "documents": len(docs),
            "characters": sum(len(d) for d in docs),
        },
    }


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    max_chars: int = 20000,
    doc_chars: int = 2000,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on a loaded model; returns ``{"results": {task: metrics}, "tasks": {...}}``.

    Example:
        >>> run_harness(model, tok, ["ffnkit:shakespeare"], limit=2)["results"].keys()
        dict_keys(['ffnkit_shakespeare'])
    """
    if not tasks:
        raise InvalidArgumentError(
            "give at least one task: --tasks ffnkit:austen (offline) or an lm-eval task"
        )
    lm_eval, HFLM, TaskManager = _lm_eval()
    with tempfile.TemporaryDirectory(prefix="ffnkit-lmeval-") as tmp:
        configs: list[Any] = []
        described: dict[str, Any] = {}
        for task in tasks:
            if task.startswith(LOCAL_PREFIX):
                cfg = local_task(task[len(LOCAL_PREFIX) :], Path(tmp), max_chars, doc_chars)
                configs.append(cfg)
                described[cfg["task"]] = cfg["metadata"]
            else:
                configs.append(task)
                described[task] = {"source": "lm-eval task (dataset from the Hugging Face hub)"}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=configs,
                limit=limit,
                task_manager=TaskManager(),
                log_samples=False,
                bootstrap_iters=0,
            )
        except (ConnectionError, OSError, ValueError, KeyError) as exc:
            offline = "ffnkit:shakespeare, ffnkit:austen, ffnkit:PATH.txt"
            what = " ".join(str(exc).split())[:200]
            raise FetchError(
                f"lm-eval could not run {', '.join(t for t in tasks if not t.startswith(LOCAL_PREFIX)) or tasks}: "
                f"{type(exc).__name__}: {what}; a hub task needs its dataset from the Hugging Face hub "
                f"(unreachable here?) — offline tasks: {offline}"
            ) from None
    results = {k: {m: v for m, v in r.items() if m != "alias"} for k, r in out["results"].items()}
    return {
        "results": results,
        "tasks": described,
        "limit": limit,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
