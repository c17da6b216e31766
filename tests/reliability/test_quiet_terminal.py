"""Issue 11 item 10: with torchao installed, commands that do not quantise write nothing about it (or
about its kernels and enum registrations) to stderr."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.reliability.cli import ffnkit

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")

NOISE = ("torchao", "Failed to load", "Enum subclass")


@pytest.mark.parametrize(
    "args", [["models", "--help"], ["models", "{tiny}", "--json"]], ids=["help", "models"]
)
def test_non_quantise_command_keeps_stderr_clean(args: list[str], tiny_folder: Path) -> None:
    run = ffnkit(*[a.format(tiny=tiny_folder) for a in args])
    assert run.returncode == 0, run.stderr[-2000:]
    for noise in NOISE:
        assert noise not in run.stderr, run.stderr[-2000:]
