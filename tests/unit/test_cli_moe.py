"""``ffnkit moe stats|contrast|steer`` on tiny MoE models saved to a folder: strict JSON, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def ffnkit(*args: str, root: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "FFNKIT_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", "moe", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _strict(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr

    def reject(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(run.stdout, parse_constant=reject)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-moe")
    for family in ("qwen2_moe", "olmoe", "llama"):
        tiny_model(family).save_pretrained(root / family)
        tiny_tokenizer().save_pretrained(root / family)
    (root / "corpus.txt").write_text(SAMPLE_TEXT)
    (root / "a.txt").write_text("the quick brown fox\nthe lazy dog\n")
    return {"root": root, "corpus": root / "corpus.txt", "a": root / "a.txt"}


def test_stats_json(saved):
    model = saved["root"] / "qwen2_moe"
    args = [
        str(model),
        "--corpus",
        str(saved["corpus"]),
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--neurons",
        "1",
    ]
    doc = _strict(ffnkit("stats", *args, "--top-k", "3", "--json", root=saved["root"]))
    assert doc["n_tokens"] == 32 and [r["layer"] for r in doc["layers"]] == [0, 1]
    for row in doc["layers"]:
        assert sum(row["load"]) == pytest.approx(row["top_k"])
        assert [row["coselection"][i][i] for i in range(row["experts"])] == pytest.approx(row["load"])
        assert 0 < row["shared_gate"] < 1 and 0 < row["entropy"]["mean_normalised"] <= 1
    experts = [(r["layer"], r["expert"]) for r in doc["vocab"]["experts"]]
    assert experts == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (0, "shared"),
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
        (1, "shared"),
    ]
    assert all(len(r["promoted"]) == 3 and len(r["neurons"]) == 1 for r in doc["vocab"]["experts"])


def test_contrast_and_steer_json(saved):
    model = str(saved["root"] / "olmoe")
    doc = _strict(
        ffnkit(
            "contrast",
            model,
            "--a",
            str(saved["a"]),
            "--b",
            "small birds sing || of tea",
            "--top",
            "2",
            "--json",
            root=saved["root"],
        )
    )
    assert doc["tokens"] == {"a": 7, "b": 5} and len(doc["toward_a"]) == 2
    for lay in doc["layers"]:
        assert lay["delta"] == pytest.approx([x - y for x, y in zip(lay["p_a"], lay["p_b"], strict=True)])
    doc = _strict(
        ffnkit(
            "steer",
            model,
            "--prompt",
            "the quick",
            "--on",
            "0:1,1:2",
            "--off",
            "0:3",
            "--weight",
            "0.7",
            "--max-new-tokens",
            "4",
            "--json",
            root=saved["root"],
        )
    )
    assert [(e["layer"], e["on"], e["off"], e["weight"]) for e in doc["edits"]] == [
        (0, [1], [3], 0.7),
        (1, [2], [], 0.7),
    ]
    assert isinstance(doc["plain"], str) and isinstance(doc["steered"], str)
    # experts picked by a contrast: towards A, one forced on and one off per layer at most
    doc = _strict(
        ffnkit(
            "steer",
            model,
            "--prompt",
            "the quick",
            "--a",
            str(saved["a"]),
            "--b",
            "small birds sing || of tea",
            "--activate",
            "1",
            "--deactivate",
            "1",
            "--per-layer",
            "--max-new-tokens",
            "3",
            "--json",
            root=saved["root"],
        )
    )
    assert doc["contrast"]["tokens"] == {"a": 7, "b": 5} and doc["edits"]
    assert all(len(e["on"]) <= 1 and len(e["off"]) <= 1 for e in doc["edits"])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["stats", "{llama}", "--corpus", "{corpus}"], "is not a mixture of experts"),
        (["steer", "{llama}", "--prompt", "x", "--on", "0:1"], "is not a mixture of experts"),
        # validated before the model is loaded: a missing model folder is never reached
        (["steer", "/nonexistent/model", "--prompt", "x", "--on", "0-1"], "LAYER:EXPERT"),
        (["steer", "/nonexistent/model", "--prompt", "x", "--off", "0:1", "--weight", "0.5"], "--weight"),
        (["contrast", "/nonexistent/model", "--a", "missing.txt", "--b", "x"], "not found"),
        (["steer", "/nonexistent/model", "--prompt", "x", "--activate", "2"], "give --a and --b"),
        (["steer", "/nonexistent/model", "--prompt", "x", "--a", "p || q", "--b", "r"], "--activate N"),
        (["steer", "{olmoe}", "--prompt", "x", "--on", "0:9"], "out of range"),
        (["convert", "/nonexistent/model", "--refit-ridge", "0", "-o", "{corpus}.out"], "refit_ridge"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(saved, args, fragment):
    names = {"llama": saved["root"] / "llama", "olmoe": saved["root"] / "olmoe", "corpus": saved["corpus"]}
    run = ffnkit(*[a.format(**names) for a in args], root=saved["root"])
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("ffnkit: error:") and fragment in lines[-1]
    assert "Traceback" not in run.stderr and run.stdout == ""
