"""Two ffnkit processes started together convert a built-in model once: the second waits for the first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from ffnkit.sources import models
    from ffnkit.sources.fetch import MARKER

    log = Path(sys.argv[1])

    def fake_convert(final, progress):  # stands in for the 15 s GGUF dequantisation
        with log.open("a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        final.mkdir(parents=True, exist_ok=True)
        (final / MARKER).write_text("ok\\n")

    models._convert_smollm2 = fake_convert
    print(models._ensure_smollm2(False))
    """
)


def test_concurrent_processes_convert_once(tmp_path: Path) -> None:
    env = {**os.environ, "FFNKIT_CACHE": str(tmp_path / "cache")}
    log = tmp_path / "conversions.log"
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(log)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and outs[0].endswith("smollm2-135m")
    assert len(log.read_text().split()) == 1  # without the lock both processes see no marker and convert


def test_lock_is_exclusive_across_processes(tmp_path: Path, monkeypatch) -> None:
    from filelock import Timeout

    env = {**os.environ, "FFNKIT_CACHE": str(tmp_path / "cache")}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ffnkit.sources.fetch import cache_lock\n"
            "with cache_lock('x'):\n    print('held', flush=True); time.sleep(5)",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("FFNKIT_CACHE", env["FFNKIT_CACHE"])
        from ffnkit.sources.fetch import cache_lock

        try:
            cache_lock("x").acquire(timeout=0.2)
        except Timeout:
            pass
        else:
            raise AssertionError("a second process took a held cache lock")
    finally:
        holder.kill()
        holder.wait()
