"""Folders saved before issue 8 (tests/fixtures/saved_v1, written by main at dd2e044) still load with the
same logits (to float32 rounding), and today's code saves the same transforms in the same format
(state-dict keys, dtypes, shapes and change records)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ffnkit import io
from ffnkit.kernels import use_backend

FIXTURES = Path(__file__).parents[1] / "fixtures" / "saved_v1"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
make_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixtures)
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")


def _format(folder: Path) -> tuple[dict, list]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    changes = json.loads((folder / "ffnkit.json").read_text())["changes"]
    return tensors, changes


@pytest.mark.parametrize("case", list(make_fixtures.CASES))
def test_folders_saved_before_issue_8_load_with_the_same_logits(case):
    folder = FIXTURES / case
    expected = load_file(str(folder / "expected.safetensors"))
    model, _ = io.load(folder)
    # the fixtures' logits were computed by dequantise-then-matmul: the reference kernel backend
    with torch.no_grad(), use_backend("reference"):
        logits = model(input_ids=expected["input_ids"]).logits
    # equal to float32 rounding, not bit for bit: the fixtures were computed with 2 BLAS threads, and another
    # thread count or CPU sums the matmuls in another order (1 thread: 6e-8 on logits of 0.46). A wrong or
    # missing weight moves the logits by orders of magnitude more.
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the default (quantised-matmul kernel) path: equal up to float32 rounding
        fast = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(fast, expected["logits"], rtol=1e-4, atol=1e-4)
    assert model.config.ffnkit["changes"] == _format(folder)[1]


@needs_torchao
@pytest.mark.parametrize("case", list(make_fixtures.CASES))
def test_todays_code_saves_the_same_format(case, tmp_path):
    model = make_fixtures.CASES[case]()
    io.save(model, None, tmp_path / case)
    assert _format(tmp_path / case) == _format(FIXTURES / case)
