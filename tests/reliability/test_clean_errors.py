"""Issue 11 item 8: damaged inputs give one-line errors (exit 2, no traceback) that name the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ffnkit.sources.fetch import MARKER
from tests.reliability.cli import ffnkit, one_line_error
from tests.tiny_models import tiny_model, tiny_tokenizer


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _drop_model_type(folder: Path) -> None:
    doc = json.loads((folder / "config.json").read_text())
    doc.pop("model_type")
    (folder / "config.json").write_text(json.dumps(doc))


DAMAGE = {
    "truncated-weights": lambda f: _cut(f / "model.safetensors", 0.5),
    "empty-weights": lambda f: (f / "model.safetensors").write_bytes(b""),
    "random-weights": lambda f: (f / "model.safetensors").write_bytes(bytes(range(256)) * 300),
    "cut-config": lambda f: _cut(f / "config.json", 0.3),
    "cut-tokenizer": lambda f: _cut(f / "tokenizer.json", 0.1),
    "no-weights": lambda f: (f / "model.safetensors").unlink(),
    "no-model-type": _drop_model_type,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_plain_folder_is_one_line(damage: str, tiny_folder: Path) -> None:
    DAMAGE[damage](tiny_folder)
    message = one_line_error(ffnkit("models", str(tiny_folder)))
    assert str(tiny_folder) in message


def test_damaged_cached_builtin_names_the_folder_to_delete(tiny_folder: Path, _own_cache: Path) -> None:
    cached = _own_cache / "models" / "smollm2-135m"
    shutil.copytree(tiny_folder, cached)
    (cached / MARKER).write_text("")
    _cut(cached / "model.safetensors", 0.5)
    message = one_line_error(ffnkit("models", "smollm2-135m"))
    assert "delete" in message and str(cached) in message


def test_report_into_a_file_is_one_line(tiny_folder: Path, tmp_path: Path, corpus: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    one_line_error(ffnkit("report", str(tiny_folder), "-o", str(target), "--corpus", str(corpus)))
    assert target.read_text() == "keep me"


def test_plot_into_a_missing_folder_creates_it(tiny_folder: Path, tmp_path: Path, corpus: Path) -> None:
    plot = tmp_path / "new" / "deeper" / "spectral.png"
    run = ffnkit("inspect", "spectral", str(tiny_folder), "--corpus", str(corpus),
                 "--samples", "2", "--seq-len", "16", "--plot", str(plot))  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_binary_prompt_argument_is_one_line(tiny_folder: Path) -> None:
    prompt = b"\xff\xfe binary".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    message = one_line_error(ffnkit("steer", "neurons", str(tiny_folder), "-p", prompt, "-n", "1", "--zero"))
    assert "--prompt" in message and "UTF-8" in message


def test_non_utf8_prompt_file_is_one_line(tiny_folder: Path, tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.txt", tmp_path / "good.txt"
    bad.write_bytes(b"\xff\xfe latin-1 \xe9t\xe9\n")
    good.write_text("plain text\n")
    message = one_line_error(
        ffnkit("inspect", "contrast", str(tiny_folder), "--a", str(bad), "--b", str(good))
    )
    assert "UTF-8" in message


def test_steer_on_an_encoder_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bert"
    tiny_model("bert").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    message = one_line_error(ffnkit("steer", "neurons", str(folder), "-p", "hi", "-n", "1", "--zero"))
    assert "causal LM" in message


@pytest.mark.parametrize("model_class", [None, "NoSuchModelClass", "AutoModelForCausalLM"])
def test_manifest_model_class_is_resolved_from_config(model_class, tiny_folder: Path, tmp_path: Path) -> None:
    import ffnkit as fk
    from ffnkit.compress.prune import PruneConfig, prune_
    from ffnkit.sources.models import load_model

    model, tok = load_model(str(tiny_folder), progress=False)
    report = prune_(model, PruneConfig("magnitude", 0.25))
    out = fk.save(model, tok, tmp_path / "pruned", report)
    doc = json.loads((out / "ffnkit.json").read_text())
    if model_class is None:
        doc.pop("model_class")
    else:
        doc["model_class"] = model_class
    (out / "ffnkit.json").write_text(json.dumps(doc))
    run = ffnkit("models", str(out), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert [f["d_ff"] for f in json.loads(run.stdout)["ffns"]] == [36, 36]
