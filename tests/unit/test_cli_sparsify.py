"""`ffnkit sparsify`: bad input is one line and exit status 2 with nothing written; a tiny model is
sparsified, saved, and runs again through `ffnkit eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-sparsify")
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    return {"root": root, "model": model_dir, "corpus": corpus}


def ffnkit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FFNKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--sparsity", "1.0"], "[0, 1)"),
        (["--sparsity", "-0.2"], "[0, 1)"),
        (["--rule", "nope"], "best, teal, cats, chess, stat-topk, predictor"),
        (["--rule", "cats", "--sparsity", "0.7"], "at most 67%"),
        (["--heal-minutes", "-1"], "heal_minutes"),
        (["--refit-ridge", "0"], "refit_ridge"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(saved, args, words):
    out = saved["root"] / "out-bad"
    r = ffnkit("sparsify", str(saved["model"]), *args, "-o", str(out), cache=saved["root"] / "cache")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("ffnkit: error:")]
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert not out.exists()


def test_sparsify_saves_a_model_that_eval_runs(saved):
    out = saved["root"] / "sparse"
    cache = saved["root"] / "cache"
    common = ["--corpus", str(saved["corpus"])]
    r = ffnkit(
        "sparsify",
        str(saved["model"]),
        "--rule",
        "teal",
        "--sparsity",
        "0.3",
        "-o",
        str(out),
        "--samples",
        "4",
        "--seq-len",
        "16",
        "--no-eval",
        "--refit",  # off by default for teal: the option turns it on
        "--json",
        *common,
        cache=cache,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["rule"] == "teal" and doc["result"]["target"] == 0.3
    assert all(row["refit"]["error_after"] <= row["refit"]["error_before"] for row in doc["result"]["layers"])
    assert abs(doc["result"]["measured"]["bytes_skipped"] - 0.3) < 0.05
    assert (out / "ffnkit.json").exists()
    r = ffnkit("eval", str(out), "--max-tokens", "64", "--window", "16", "--json", *common, cache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["perplexity"] > 1
    r = ffnkit("sparsify", str(saved["model"]), "--sparsity", "0.3", "-o", str(out), *common, cache=cache)
    assert r.returncode == 2 and "overwrite" in r.stderr  # a non-empty folder needs --overwrite


def test_recipe_sets_every_config_field_options_override_and_a_card_is_written(saved, tmp_path):
    recipe = tmp_path / "sparse.json"
    # fields the command has no option for (allocation, tokens, path_tokens, probe_windows) come from it
    recipe.write_text(
        json.dumps(
            {
                "rule": "teal",
                "sparsity": 0.2,
                "allocation": "uniform",
                "tokens": 128,
                "path_tokens": 32,
                "probe_windows": 1,
                "samples": 4,
                "seq_len": 16,
            }
        )
    )
    out = saved["root"] / "sparse-recipe"
    r = ffnkit(
        "sparsify",
        str(saved["model"]),
        "--config",
        str(recipe),
        "--sparsity",
        "0.35",
        "-o",
        str(out),
        "--no-eval",
        "--json",
        "--corpus",
        str(saved["corpus"]),
        cache=saved["root"] / "cache",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    config = doc["result"]["config"]
    assert config["rule"] == "teal" and config["allocation"] == "uniform" and config["tokens"] == 128
    assert config["sparsity"] == 0.35  # typed on the command line: wins over the recipe's 0.2
    card = (out / "README.md").read_text()
    assert "teal activation sparsity" in card and "35%" in card
    record = json.loads((out / "run.json").read_text())
    assert record["steps"][0]["config"]["allocation"] == "uniform"


def test_recipe_with_an_unknown_key_is_one_line_and_writes_nothing(saved, tmp_path):
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps({"sparsty": 0.3}))
    out = saved["root"] / "sparse-bad-recipe"
    r = ffnkit(
        "sparsify",
        str(saved["model"]),
        "--config",
        str(recipe),
        "-o",
        str(out),
        cache=saved["root"] / "cache",
    )
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("ffnkit: error:")]
    assert len(lines) == 1 and "unknown key sparsty" in lines[0] and "probe_windows" in lines[0]
    assert not out.exists()
