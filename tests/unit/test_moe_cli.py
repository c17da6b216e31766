"""`ffnkit moe convert|upcycle`: saved folders that `ffnkit eval` runs; bad input is one line, exit 2,
nothing written."""

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
    root = tmp_path_factory.mktemp("cli-moe")
    for family in ("llama", "mixtral"):
        tiny_model(family).save_pretrained(root / family)
        tiny_tokenizer().save_pretrained(root / family)
    (root / "corpus.txt").write_text(SAMPLE_TEXT)
    return {"root": root, "llama": root / "llama", "mixtral": root / "mixtral", "corpus": root / "corpus.txt"}


def ffnkit(*args: str, root: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "FFNKIT_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_convert_then_eval(saved):
    out = saved["root"] / "moe"
    args = ["moe", "convert", str(saved["llama"]), "--experts", "4", "--active", "0.5", "--router", "mlp"]
    args += ["--router-target", "norm", "--router-steps", "20"]
    args += [
        "--samples",
        "4",
        "--seq-len",
        "16",
        "--corpus",
        str(saved["corpus"]),
        "--no-eval",
        "-o",
        str(out),
        "--json",
    ]
    done = ffnkit(*args, root=saved["root"])
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["report"]["active_fraction"] == pytest.approx(0.5)
    assert doc["report"]["config"]["router_target"] == "norm"
    assert [row["top_k"] for row in doc["report"]["layers"]] == [2, 2]
    assert doc["report"]["config"]["refit"] is True  # the default: an mlp router reads calibration text
    assert all(row["refit"] for row in doc["report"]["layers"])
    run = ffnkit(
        "eval", str(out), "--corpus", str(saved["corpus"]), "--window", "16", "--json", root=saved["root"]
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)


def test_convert_with_the_defaults_reports_the_auto_sizes(saved):
    out = saved["root"] / "moe-auto"
    args = ["moe", "convert", str(saved["llama"]), "--active", "0.5", "--router-steps", "20"]
    args += ["--samples", "4", "--seq-len", "16", "--corpus", str(saved["corpus"]), "--no-eval"]
    done = ffnkit(*args, "-o", str(out), "--json", root=saved["root"])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    # d_ff 48 by hand: shared 48 // 6 = 8, the other 40 in experts of ceil(40 / 80) = 1 neuron; k = 24 - 8
    assert report["sizes"] == {"experts": 40, "expert_size": 1, "shared": 8, "top_k": 16}
    assert [(r["experts"], r["shared"]) for r in report["layers"]] == [(40, 8), (40, 8)]
    assert report["config"]["experts"] is None and report["config"]["split"] == "coact"
    assert report["config"]["router_target"] == "norm" and report["config"]["refit_ridge"] == 0.3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["convert", "{llama}", "--experts", "5"], "divide"),
        (["convert", "{llama}", "--active", "0"], "(0, 1]"),
        (["convert", "{llama}", "--active", "1.2"], "(0, 1]"),
        (["convert", "{llama}", "--experts", "4", "--top-k", "6"], "top_k"),
        (["convert", "{llama}", "--split", "spectral"], "kmeans"),
        (["convert", "{llama}", "--experts", "4", "--router-target", "loss"], "mass, norm"),
        (["convert", "{llama}", "--experts", "4", "--router-steps", "0"], "router_steps"),
        (["convert", "{llama}", "--active", "0.1"], "give shared=0 (--shared 0)"),  # auto shared: 8 of 48
        (["convert", "{llama}", "--shared", "-1"], "shared must be"),
        (["convert", "{mixtral}", "--experts", "4", "--router", "centroid"], "already mixtures of experts"),
        (["upcycle", "{llama}", "--experts", "6", "--top-k", "4", "--granular"], "divid"),
        (["upcycle", "{mixtral}", "--experts", "4"], "already mixtures of experts"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(saved, args, needle):
    out = saved["root"] / "never"
    argv = [
        "moe",
        *[a.format(**{k: str(v) for k, v in saved.items()}) for a in args],
        "--no-eval",
        "-o",
        str(out),
    ]
    done = ffnkit(*argv, "--corpus", str(saved["corpus"]), root=saved["root"])
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("ffnkit: error:") and needle in line and "Traceback" not in done.stderr
    assert not out.exists()


def test_convert_recipe_reaches_fields_without_options_and_options_override(saved, tmp_path):
    recipe = tmp_path / "moe.json"
    recipe.write_text(json.dumps({"experts": 4, "active": 0.75, "router_hidden": 16, "router_steps": 10}))
    out = saved["root"] / "moe-recipe"
    args = ["moe", "convert", str(saved["llama"]), "--config", str(recipe), "--active", "0.5"]
    args += ["--samples", "4", "--seq-len", "16", "--corpus", str(saved["corpus"]), "--no-eval"]
    done = ffnkit(*args, "-o", str(out), "--json", root=saved["root"])
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)["report"]["config"]
    assert config["router_hidden"] == 16 and config["router_steps"] == 10  # from the recipe
    assert config["active"] == 0.5  # typed: wins over the recipe's 0.75
    assert (out / "README.md").is_file()


def test_convert_recipe_unknown_key_is_one_line_and_writes_nothing(saved, tmp_path):
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps({"expertz": 4}))
    out = saved["root"] / "moe-bad-recipe"
    done = ffnkit(
        "moe", "convert", str(saved["llama"]), "--config", str(recipe), "-o", str(out), root=saved["root"]
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("ffnkit: error:")]
    assert len(lines) == 1 and "unknown key expertz" in lines[0] and "router_hidden" in lines[0]
    assert not out.exists()
