"""Saving is atomic: a kill or a full disk leaves the old complete folder or none, never a mix.

Issue 11, items 1-2: killed while re-saving, the new weights loaded under the old manifest; a killed save
left a 474 MB hidden temporary file inside the target; a full disk left half a folder.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ffnkit import find_ffns, io
from ffnkit.core.edit import keep_neurons_
from ffnkit.core.errors import OutputFolderError
from tests.reliability.cli import ROOT
from tests.tiny_models import tiny_inputs, tiny_model

# Runs a save in a fresh process and SIGKILLs it at a chosen point: no cleanup code can run, as in a
# real kill (Ctrl-C would unwind; SIGKILL, the OOM killer or a power cut do not).
_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import transformers.modeling_utils as mu
    from tests.reliability.test_atomic_saves import changed_model
    from ffnkit import io

    point, target, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "after-weights":
        write = mu.safe_save_file
        mu.safe_save_file = lambda *a, **k: (write(*a, **k), die())
    elif point == "between-renames":  # the old folder is aside, the new one not yet in place
        rename = os.rename
        def rename_then_die(src, dst):
            rename(src, dst)
            if ".ffnkit-old-" in str(dst):
                die()
        os.rename = rename_then_die
    io.save(changed_model(seed), None, target, overwrite=True)
    """
)


def changed_model(seed: int) -> torch.nn.Module:
    """A tiny Llama with per-layer FFN widths (a folder only ffnkit can rebuild); seed picks the weights."""
    model = tiny_model("llama", seed=seed)
    keep_neurons_(find_ffns(model)[0], torch.arange(10 + seed), model=model)
    return model


def _logits(model):
    with torch.no_grad():
        return model(**tiny_inputs(model)).logits


def _killed_save(point: str, target: Path, seed: int) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, point, str(target), str(seed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == -9, run.stderr[-2000:]  # it was killed, not finished or failed


def _hidden_beside(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_killed_first_save_leaves_no_folder_and_is_cleaned_up(tmp_path):
    target = tmp_path / "model"
    _killed_save("after-weights", target, seed=1)
    assert not target.exists()  # not a folder of weights without ffnkit.json
    assert _hidden_beside(target)  # the temporary lives beside the target, not inside it
    io.save(changed_model(1), None, target)  # the next save removes it
    assert _hidden_beside(target) == []
    assert torch.equal(_logits(io.load(target)[0]), _logits(changed_model(1)))


def test_killed_resave_keeps_the_old_folder_intact(tmp_path):
    target = tmp_path / "model"
    io.save(changed_model(0), None, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    _killed_save("after-weights", target, seed=1)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # no new file, no hidden temp
    loaded, _ = io.load(target)  # the old model, exactly; the load also removes the leftover
    assert torch.equal(_logits(loaded), _logits(changed_model(0)))
    assert _hidden_beside(target) == []


def test_kill_between_the_renames_is_finished_by_the_next_load(tmp_path):
    target = tmp_path / "model"
    io.save(changed_model(0), None, target)
    _killed_save("between-renames", target, seed=1)
    assert not target.exists() and len(_hidden_beside(target)) == 2  # old aside, new complete
    loaded, _ = io.load(target)  # the complete new folder is put in place
    assert torch.equal(_logits(loaded), _logits(changed_model(1)))
    assert _hidden_beside(target) == []


def _disk_full(monkeypatch):
    import transformers.modeling_utils as mu

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)  # some bytes made it to the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mu, "safe_save_file", half_then_full)


def test_full_disk_leaves_no_half_folder(tmp_path, monkeypatch):
    target = tmp_path / "model"
    _disk_full(monkeypatch)
    with pytest.raises(OutputFolderError, match="disk is full") as err:
        io.save(changed_model(0), None, target)
    assert "\n" not in str(err.value)
    assert not target.exists() and _hidden_beside(target) == []


def test_full_disk_during_resave_keeps_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "model"
    io.save(changed_model(0), None, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    _disk_full(monkeypatch)
    with pytest.raises(OutputFolderError, match="disk is full"):
        io.save(changed_model(1), None, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _hidden_beside(target) == []


def test_overwrite_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "model"
    io.save(changed_model(0), None, target)
    (target / "pytorch_model.bin").write_bytes(b"stale weights of another model")
    with pytest.raises(OutputFolderError, match="not empty"):
        io.save(changed_model(1), None, target)
    io.save(changed_model(1), None, target, overwrite=True)
    assert not (target / "pytorch_model.bin").exists()  # nothing of the old folder is mixed in
    assert torch.equal(_logits(io.load(target)[0]), _logits(changed_model(1)))
