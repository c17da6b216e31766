"""A changed model never loads as garbage: no manifest, no load; missing or unexpected weights are errors.

Issue 11, item 1: a quantised or low-rank output without its ffnkit.json loaded with random FFN weights
(perplexity 58.7 -> 4.9e14), through ffnkit and through plain transformers.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ffnkit import find_ffns, io
from ffnkit.compress.lowrank import LowRankConfig, lowrank_
from ffnkit.core.edit import keep_neurons_
from ffnkit.core.errors import SavedModelError
from ffnkit.sources.models import load_model
from tests.reliability.cli import ffnkit, one_line_error
from tests.tiny_models import tiny_inputs, tiny_model, tiny_tokenizer

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    "method", [pytest.param("quantize", marks=needs_torchao), "svd"], ids=["quantised", "low-rank"]
)
def test_output_without_its_manifest_is_refused_by_eval(method, tiny_folder, tmp_path):
    out = tmp_path / "out"
    ratio = [] if method == "quantize" else ["--ratio", "0.3"]  # quantize has no ratio (a CLI error)
    run = ffnkit("compress", str(tiny_folder), "--method", method, *ratio, "-o", str(out), "--no-eval")
    assert run.returncode == 0, run.stderr[-2000:]
    (out / "ffnkit.json").unlink()  # what a kill just before the manifest used to leave
    line = one_line_error(ffnkit("eval", str(out), "--window", "16"))
    assert "ffnkit.json" in line and "missing" in line
    with pytest.raises(SavedModelError, match="ffnkit.json is missing"):
        load_model(str(out))
    with pytest.raises(SavedModelError, match="ffnkit.json is missing"):
        io.load(out)


def test_plain_transformers_refuses_a_folder_only_ffnkit_can_rebuild(tmp_path):
    model = tiny_model("llama")
    lowrank_(model, LowRankConfig("svd", 0.3))
    io.save(model, None, tmp_path / "lr")
    with pytest.raises(ValueError, match="ffnkit"):  # not random FFN weights with a warning
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lr")
    with pytest.raises(ValueError, match="ffnkit"):
        transformers.AutoConfig.from_pretrained(tmp_path / "lr")
    # ffnkit itself loads it exactly, with the original model type
    inputs = tiny_inputs(model)
    loaded, _ = io.load(tmp_path / "lr")
    assert loaded.config.model_type == "llama"
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))


def test_per_layer_widths_are_not_plain_loadable_but_uniform_widths_are(tmp_path):
    uneven = tiny_model("llama")
    keep_neurons_(find_ffns(uneven)[0], torch.arange(10), model=uneven)
    io.save(uneven, None, tmp_path / "uneven")
    assert json.loads((tmp_path / "uneven" / "config.json").read_text())["model_type"] == "ffnkit"
    even = tiny_model("llama")
    for f in find_ffns(even):
        keep_neurons_(f, torch.arange(12), model=even)
    io.save(even, None, tmp_path / "even")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "even")
    inputs = tiny_inputs(even)
    assert torch.equal(_logits(plain.eval(), inputs), _logits(even, inputs))


def _rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_plain_folder_with_a_missing_weight_is_refused(tiny_folder):
    _rewrite_weights(tiny_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    line = one_line_error(ffnkit("models", str(tiny_folder), "--json"))
    assert "missing" in line and "up_proj" in line


def test_plain_folder_with_weights_in_another_format_is_refused(tiny_folder):
    def requantised(t):  # a layer stored as something the model does not know
        t["model.layers.0.mlp.down_proj.qweight"] = t.pop("model.layers.0.mlp.down_proj.weight").to(
            torch.int8
        )

    _rewrite_weights(tiny_folder, requantised)
    with pytest.raises(SavedModelError, match="qweight"):
        load_model(str(tiny_folder))


def test_a_dropped_task_head_is_not_an_error(tmp_path):
    # (a guard for the rule above, not a regression) an encoder checkpoint with a pre-training head, loaded as the bare encoder: the head is not built
    folder = tmp_path / "bert"
    tiny_model("bert").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    _rewrite_weights(folder, lambda t: t.update({"cls.predictions.bias": torch.zeros(4)}))
    model, _ = load_model(str(folder))
    assert type(model).__name__ == "BertModel"


def test_changes_of_two_saves_are_refused(tmp_path):
    # an old, non-atomic save killed mid-way left new weights and config under the previous manifest
    a, b = tiny_model("llama"), tiny_model("llama")
    keep_neurons_(find_ffns(a)[0], torch.arange(10), model=a)
    keep_neurons_(find_ffns(b)[1], torch.arange(10), model=b)
    io.save(a, None, tmp_path / "a")
    io.save(b, None, tmp_path / "b")
    (tmp_path / "b" / "ffnkit.json").write_text((tmp_path / "a" / "ffnkit.json").read_text())
    with pytest.raises(SavedModelError, match="different changes"):
        io.load(tmp_path / "b")


def test_weight_file_of_another_size_is_refused(tmp_path):
    model = tiny_model("llama")
    keep_neurons_(find_ffns(model)[0], torch.arange(10), model=model)
    io.save(model, None, tmp_path / "m")
    with open(tmp_path / "m" / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(SavedModelError, match="model.safetensors has"):
        io.load(tmp_path / "m")
