"""``ffnkit inspect ... --json`` on a tiny saved model: strict JSON with the same fields as before the
inspect functions returned result objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
BASE = ["model", "corpus", "calibration", "split", "environment"]  # _base() of cli/inspect_corpus.py


def _reject_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def ffnkit_json(*args: str, root: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "FFNKIT_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "ffnkit", "inspect", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout, parse_constant=_reject_constant)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-inspect")
    tiny_model("llama").save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "corpus.txt").write_text(SAMPLE_TEXT)
    (root / "a.txt").write_text("the quick brown fox\nthe lazy dog\n")
    (root / "b.txt").write_text("small birds sing\nof tea and bread\n")
    return {"root": root, "model": root / "tiny", "corpus": root / "corpus.txt"}


def _corpus_args(saved) -> list[str]:
    return [str(saved["model"]), "--corpus", str(saved["corpus"]), "--samples", "2", "--seq-len", "16"]


def test_importance_and_spectral_fields(saved):
    doc = ffnkit_json("importance", *_corpus_args(saved), "--method", "shortgpt", root=saved["root"])
    assert list(doc) == [*BASE, "method", "metric", "layers", "ranking"]  # "calibration" merges into BASE
    assert [r["layer"] for r in doc["layers"]] == [0, 1] and sorted(doc["ranking"]) == [0, 1]
    doc = ffnkit_json("importance", *_corpus_args(saved), "--steps", "2", root=saved["root"])
    assert list(doc)[5:] == [
        "method",
        "metric",
        "removal",
        "n_candidates",
        "steps",
        "js_nothing_removed",
        "order",
        "attn_removed",
        "ffn_removed",
    ]
    assert [r["step"] for r in doc["order"]] == [1, 2]
    doc = ffnkit_json("spectral", *_corpus_args(saved), root=saved["root"])
    assert list(doc)[5:] == ["formulas", "site", "layers"] and doc["layers"][0]["d_ff"] == 48


def test_stats_and_early_exit_fields(saved):
    doc = ffnkit_json("stats", *_corpus_args(saved), "--layer", "1", "--neurons", "3", root=saved["root"])
    assert list(doc) == [*BASE, "site", "threshold", "tokens", "layers", "neurons", "per_neuron"]
    assert doc["threshold"] == 0.1 and doc["tokens"] == 32
    assert list(doc["neurons"][0]["contexts"][0]) == [
        "value",
        "sequence",
        "position",
        "token",
        "token_id",
        "text",
    ]
    doc = ffnkit_json("early-exit", *_corpus_args(saved), root=saved["root"])
    assert list(doc)[5:] == [
        "evaluation_tokens",
        "target_agreement",
        "rules",
        "saturation",
        "saturation_calibration",
        "anchor",
    ]
    rule = doc["rules"]["confidence"]
    assert list(rule) == ["description", "threshold", "min_layer", "stable", "calibration", "evaluation"]
    assert list(rule["evaluation"]) == [
        "threshold",
        "min_layer",
        "stable",
        "agreement",
        "layers_saved",
        "mean_exit_layer",
        "tokens",
    ]


def test_contrast_fields(saved):
    a, b = saved["root"] / "a.txt", saved["root"] / "b.txt"
    doc = ffnkit_json(
        "contrast", str(saved["model"]), "--a", str(a), "--b", str(b), "--top", "3", root=saved["root"]
    )
    assert list(doc) == [
        "model",
        "a",
        "b",
        "rank_by",
        "scores",
        "tokens",
        "prompts",
        "neurons",
        "experts",
        "threshold",
        "environment",
    ]
    assert doc["prompts"] == {"a": 2, "b": 2} and len(doc["neurons"]) == 3 and doc["experts"] == []
