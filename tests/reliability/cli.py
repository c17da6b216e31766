"""Run the ffnkit command line in a subprocess, the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ffnkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m ffnkit ARGS`` with this checkout's sources, offline, no stdin (a prompt cannot wait)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The error line of a run that must fail cleanly: exit 2, no traceback; returns the message."""
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("ffnkit: error: "), run.stderr[-2000:]
    return lines[-1]
