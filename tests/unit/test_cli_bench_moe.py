"""``ffnkit bench moe``: strict JSON with the comparison and floors; bad options exit 2 and write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ffnkit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FFNKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_bench_moe_json_and_output_folder(tmp_path):
    out = tmp_path / "bench"
    run = ffnkit(
        "bench", "moe", "--tokens", "1,8", "--rounds", "1", "-o", str(out), "--json", cache=tmp_path / "cache"
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [r["tokens"] for r in doc["results"]] == [1, 8, 1, 8]  # uniform, then skewed routing
    for r in doc["results"]:
        assert set(r["us"]) == {"eager", "grouped_mm", "ffnkit"}
        assert all(s.startswith("ok") for s in r["status"].values())
        assert r["roofline_us"] > 0 and r["speedup_vs_best_transformers"] > 0
    assert json.loads((out / "moe_kernel.json").read_text())["shape"]["experts"] == 16
    again = ffnkit("bench", "moe", "--tokens", "1", "--rounds", "1", "-o", str(out), cache=tmp_path / "cache")
    assert again.returncode == 2 and "overwrite" in again.stderr.lower()  # non-empty folder refused


@pytest.mark.parametrize(
    "args",
    [["--device", "gpu"], ["--tokens", "0"], ["--tokens", "a,b"], ["--rounds", "0"]],
)
def test_bench_moe_bad_options(tmp_path, args):
    out = tmp_path / "never"
    run = ffnkit("bench", "moe", *args, "-o", str(out), cache=tmp_path / "cache")
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not out.exists()
