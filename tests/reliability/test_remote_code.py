"""No model code runs unless the user says --trust-remote-code, and nothing is asked on stdout.

Issue 11, item 3: a local folder whose config has auto_map made transformers ask "Do you wish to run the
custom code? [y/N]" on stdout (breaking --json); answering y ran the folder's Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ffnkit.core.errors import RemoteCodeError
from ffnkit.sources.models import load_model
from tests.reliability.cli import ffnkit, one_line_error

_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil_tiny"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _with_code(folder: Path, marker: Path, model_type: str) -> Path:
    """Give a tiny model folder an auto_map pointing at a Python file that leaves ``marker`` when run."""
    (folder / "evil.py").write_text(_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type=model_type,
        architectures=["EvilForCausalLM"],
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_custom_code_folder_is_refused_without_the_flag(tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    folder = _with_code(tiny_folder, marker, "evil_tiny")
    run = ffnkit("models", str(folder), "--json")
    line = one_line_error(run)
    assert "--trust-remote-code" in line and "auto_map" in line
    assert run.stdout == ""  # no prompt, nothing that would break --json
    assert not marker.exists()
    with pytest.raises(RemoteCodeError, match="trust-remote-code"):
        load_model(str(folder))
    assert not marker.exists()


def test_the_flag_runs_the_code(tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    folder = _with_code(tiny_folder, marker, "evil_tiny")
    run = ffnkit("models", str(folder), "--trust-remote-code", "--json")
    assert marker.exists(), run.stderr[-2000:]  # the user asked for it: the folder's code was used
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["ffns"]


def test_known_model_type_uses_the_builtin_code_and_says_so(tiny_folder, tmp_path):
    # (a guard, as transformers does the same) auto_map beside a model type transformers knows
    marker = tmp_path / "ran"
    folder = _with_code(tiny_folder, marker, "llama")
    run = ffnkit("models", str(folder), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["family"] == "llama"
    assert "not run" in run.stderr and not marker.exists()


def test_custom_tokenizer_code_is_refused_without_the_flag(tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    tok_config = json.loads((tiny_folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (tiny_folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (tiny_folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    with pytest.raises(RemoteCodeError, match="tokenizer_config.json"):
        load_model(str(tiny_folder))
    assert not marker.exists()
