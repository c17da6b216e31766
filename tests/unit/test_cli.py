"""The command line end to end on a tiny saved model: JSON output, the report, one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def ffnkit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FFNKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    return {"root": root, "model": model_dir, "corpus": corpus, "cache": root / "cache"}


def test_models_json_lists_every_ffn(saved):
    run = ffnkit("models", str(saved["model"]), "--json", cache=saved["cache"])
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [f["kind"] for f in doc["ffns"]] == ["gated", "gated"]
    assert doc["ffns"][0]["d_ff"] == 48 and doc["family"] == "llama"
    assert 0 < doc["parameters"]["ffn_share"] < 1


def test_eval_json_has_perplexity_and_protocol(saved):
    run = ffnkit(
        "eval",
        str(saved["model"]),
        "--corpus",
        str(saved["corpus"]),
        "--window",
        "64",
        "--json",
        cache=saved["cache"],
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["perplexity"] > 1 and doc["protocol"]["window"] == 64
    assert doc["split"]["evaluation_docs"] and doc["split"]["calibration_docs"]


def test_report_writes_html_and_json(saved):
    out = saved["root"] / "report"
    run = ffnkit(
        "report",
        str(saved["model"]),
        "-o",
        str(out),
        "--corpus",
        str(saved["corpus"]),
        "--samples",
        "2",
        "--seq-len",
        "16",
        cache=saved["cache"],
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads((out / "report.json").read_text())
    assert len(doc["activations"]["layers"]) == 2 and doc["perplexity"]["perplexity"] > 1
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Perplexity" in page
    assert doc["spectral"]["layers"] and doc["importance"]["shortgpt"]["layers"]
    assert "concept_neurons" in doc and "Spectral utilisation" in page


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("models", "no-such-model-anywhere"), "smollm2-135m"),  # lists the built-in names
        (("eval", "{model}", "--corpus", "no-such-corpus"), "shakespeare"),
        (("eval", "{model}", "--corpus", "{empty}"), "empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(saved, args, fragment):
    empty = saved["root"] / "empty.txt"
    empty.write_text("")
    args = [a.format(model=saved["model"], empty=empty) for a in args]
    run = ffnkit(*args, cache=saved["cache"])
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("ffnkit: error: ") and fragment in lines[-1]
    assert "Traceback" not in run.stderr


def test_compress_with_heal_reports_the_distillation_and_saves(saved):
    out = saved["root"] / "healed"
    args = ["compress", str(saved["model"]), "--method", "wanda-sp", "--ratio", "0.3", "-o", str(out)]
    args += ["--corpus", str(saved["corpus"]), "--samples", "4", "--seq-len", "16", "--heal"]
    run = ffnkit(*args, "--heal-minutes", "0.05", "--heal-lr", "1e-3", "--json", cache=saved["cache"])
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["heal"]["steps"] >= 1 and doc["heal"]["config"]["lr"] == 1e-3
    assert doc["heal"]["config"]["max_minutes"] == 0.05 and (out / "config.json").exists()
    bad = ffnkit(*args, "--heal-minutes", "0", "--json", cache=saved["cache"])
    assert bad.returncode == 2 and "max_minutes" in bad.stderr.strip().splitlines()[-1]


def test_svd_llm_global_allocation_reaches_the_method(saved):
    """Regression: `--method svd-llm --allocation global` ran `uniform` (the adapter dropped allocation)."""
    out = saved["root"] / "svdllm-global"
    args = [
        "compress",
        str(saved["model"]),
        "--method",
        "svd-llm",
        "--ratio",
        "0.4",
        "--allocation",
        "global",
    ]
    args += [
        "-o",
        str(out),
        "--corpus",
        str(saved["corpus"]),
        "--samples",
        "4",
        "--seq-len",
        "16",
        "--no-eval",
    ]
    run = ffnkit(*args, cache=saved["cache"])
    assert run.returncode == 0, run.stderr[-2000:]
    reports = json.loads((out / "ffnkit.json").read_text())["reports"]
    report = next(r for r in reports if r.get("transform") == "lowrank")
    assert report["config"]["allocation"] == "global" and report["config"]["method"] == "svd-llm"
    mats = [mat for layer in report["layers"] for mat in layer["matrices"].values()]
    # uniform allocation: every matrix keeps rank floor(0.6·m·n/(m+n)) (the module docstring's formula)
    uniform = [int(0.6 * m * n / (m + n)) for m, n in (mat["shape"] for mat in mats)]
    assert [mat["rank"] for mat in mats] != uniform
    assert abs(report["ffn_ratio_removed"] - 0.4) < 0.05  # one shared budget, about the same total
    record = json.loads((out / "run.json").read_text())  # the pipeline's run record sits beside it
    assert record["steps"][0]["config"]["allocation"] == "global"
