"""``ffnkit bench sparsity``: strict JSON with every variant side by side; bad options exit 2 before work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ffnkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_bench_sparsity_json_has_every_variant_and_passes_the_reference_check():
    res = ffnkit(
        "bench", "sparsity", "--shape", "48,136", "--levels", "0,0.5", "--batch", "1,3", "--rounds", "2",
        "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    rows = [r for r in doc["rows"] if "error" not in r]
    assert len(rows) == len(doc["rows"])
    curve = {(r["variant"], r["batch"], r["level"]) for r in rows if r["section"] == "curve"}
    for v in ("dense", "gather", "torch_gather", "threshold", "teal"):
        assert {(v, 1, 0.0), (v, 3, 0.5)} <= curve
    assert {r["variant"] for r in rows if r["section"] == "union"} == {"dense", "gather_union"}
    for r in rows:  # each kernel matched the masked dense reference before it was timed
        assert r["rel_err_vs_reference"] < 1e-4, r
        assert r["median_us"] > 0
    gather_half = next(r for r in rows if r["variant"] == "gather" and r["level"] == 0.5)
    assert abs(gather_half["bytes_skipped"] - 0.5) < 0.01
    assert doc["shape"] == {
        "d_model": 48, "d_ff": 136, "dtype": "torch.float32", "ffn_weight_bytes": 3 * 48 * 136 * 4,
        "copies": doc["shape"]["copies"],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--levels", "1.0"], "[0, 1)"),
        (["--levels", "a,b"], "comma-separated numbers"),
        (["--batch", "0"], ">= 1"),
        (["--shape", "12"], "D,F"),
        (["--dtype", "int8"], "--dtype"),
        (["--device", "tpu"], "--device takes one of"),
    ],
)
def test_bench_sparsity_bad_options_exit_2(args, message):
    res = ffnkit("bench", "sparsity", *args, "--json")
    assert res.returncode == 2
    assert message in res.stderr and res.stdout == ""
