"""`ffnkit compress` builds each method's config from the method registry: every option reaches every
method whose config has the field, an option a method lacks is a one-line error, help comes from the
registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ffnkit.cli.main import app
from ffnkit.compress.registry import METHODS, Method, methods_with_field
from ffnkit.core.errors import InvalidArgumentError
from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
# CLI option -> (flag, command-line value, the value the config must hold)
OPTIONS = {
    "ratio": ("--ratio", "0.35", 0.35),
    "allocation": ("--allocation", "global", "global"),
    "samples": ("--samples", "3", 3),
    "seq_len": ("--seq-len", "17", 17),
    "bits": ("--bits", "3", 3),
    "align": ("--align", "16", 16),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-compress")
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    return {"root": root, "model": model_dir, "corpus": corpus}


def ffnkit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FFNKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", *args], capture_output=True, text=True, env=env, timeout=300
    )


class _Stop(Exception):
    """Raised by the stand-in of Method.__call__ once the config has been built."""


@pytest.mark.parametrize("method", METHODS.names())
def test_every_option_reaches_every_method_that_has_the_field(saved, method, monkeypatch):
    seen = {}

    def capture(self, model, config, **kwargs):
        seen.update(name=self.name, config=config)
        raise _Stop

    monkeypatch.setattr(Method, "__call__", capture)
    fields = METHODS.get(method).fields()
    applicable = {k: v for k, v in OPTIONS.items() if k in fields}
    args = ["compress", str(saved["model"]), "--method", method, "-o", str(saved["root"] / "x")]
    args += ["--corpus", str(saved["corpus"]), "--no-eval"]
    for flag, value, _ in applicable.values():
        args += [flag, value]
    if "experts" in fields:  # the default 32 experts do not divide the tiny d_ff 48: checked before any work
        args += ["--set", "experts=8"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, _Stop), result.output
    config = seen["config"]
    assert seen["name"] == method
    for name, (_, _, expected) in applicable.items():
        assert getattr(config, name) == expected, name
    if "corpus" in fields:
        assert config.corpus == str(saved["corpus"])  # --corpus is the calibration text of every step


@pytest.mark.parametrize(
    ("method", "option"),
    [(m, o) for m in METHODS.names() for o in OPTIONS if o not in METHODS.get(m).fields()],
)
def test_an_option_the_method_lacks_is_an_error_naming_where_it_applies(saved, method, option):
    flag, value, _ = OPTIONS[option]
    args = ["compress", str(saved["model"]), "--method", method, flag, value, "-o", str(saved["root"] / "y")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, InvalidArgumentError), result.output
    message = str(result.exception)
    assert "\n" not in message and flag in message
    assert all(m in message for m in methods_with_field(option)) and methods_with_field(option)


def test_errors_are_one_line_with_exit_status_2(saved):
    cache = saved["root"] / "cache"
    bits = ffnkit("compress", str(saved["model"]), "--method", "flap", "--bits", "3", "-o", "z", cache=cache)
    assert bits.returncode == 2 and "Traceback" not in bits.stderr
    line = bits.stderr.strip().splitlines()[-1]
    assert line.startswith("ffnkit: error: --bits") and "quantize" in line
    fixed = ffnkit("compress", str(saved["model"]), "--allocation", "global", "-o", "z", cache=cache)
    assert fixed.returncode == 2 and "fixes allocation='sensitivity'" in fixed.stderr  # method best
    heal = ffnkit("compress", str(saved["model"]), "--heal-lr", "1e-3", "-o", "z", cache=cache)
    assert heal.returncode == 2 and "--heal" in heal.stderr.strip().splitlines()[-1]


def test_set_reaches_any_field_and_unknown_fields_list_the_settings(saved, monkeypatch):
    seen = {}

    def capture(self, model, config, **kwargs):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr(Method, "__call__", capture)
    base = ["compress", str(saved["model"]), "-o", str(saved["root"] / "s"), "--no-eval"]
    result = CliRunner().invoke(
        app,
        [*base, "--method", "flap", "--set", "reconstruct=true", "--set", "layers=[0]", "--set", "ridge=0.5"],
    )
    assert isinstance(result.exception, _Stop), result.output
    assert seen["config"].reconstruct is True and seen["config"].layers == [0] and seen["config"].ridge == 0.5
    result = CliRunner().invoke(app, [*base, "--method", "quantize", "--set", "mapping=symmetric"])
    assert isinstance(result.exception, _Stop) and seen["config"].mapping == "symmetric"
    result = CliRunner().invoke(app, [*base, "--method", "svd", "--set", "bogus=1"])
    assert isinstance(result.exception, InvalidArgumentError)
    assert "bogus" in str(result.exception) and "allocation" in str(result.exception)


def test_method_help_and_unknown_method_come_from_the_registry():
    help_text = CliRunner().invoke(app, ["compress", "--help"]).output
    flat = " ".join(help_text.replace("│", " ").split())
    assert all(name in flat for name in METHODS.names())
    result = CliRunner().invoke(app, ["compress", "tiny", "--method", "bogus", "-o", "x"])
    assert isinstance(result.exception, InvalidArgumentError)
    assert str(result.exception).endswith(", ".join(METHODS.names()))
    listed = CliRunner().invoke(app, ["compress", "--list", "--json"])
    rows = json.loads(listed.stdout)["methods"]
    assert [r["name"] for r in rows] == METHODS.names() and all(r["help"] for r in rows)
