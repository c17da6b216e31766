"""save / load: reload reproduces logits exactly; standard results load in plain transformers; clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from ffnkit import find_ffns, io
from ffnkit.compress import PruneConfig, prune_
from ffnkit.core.edit import keep_neurons_, set_bias_out_
from ffnkit.core.errors import SavedModelError
from tests.tiny_models import H, V, tiny_inputs, tiny_model

CALIB = torch.randint(3, V, (4, 16), generator=torch.Generator().manual_seed(5))


def _out(model, inputs):
    with torch.no_grad():
        o = model(**inputs)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize(
    "family", ["llama", "gpt2", "phi3", "opt", "bert", "t5-gated", "gpt_neox", "mixtral", "qwen2_moe"]
)
def test_per_layer_widths_and_added_biases_round_trip(family, tmp_path):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    gen = torch.Generator().manual_seed(0)
    for i, f in enumerate(find_ffns(model)):
        k = f.d_ff // 2 + 4 * i  # different widths per layer (multiples of 4 for MoE kernels)
        keep_neurons_(f, torch.randperm(f.d_ff, generator=gen)[:k], model=model)
        if f.kind != "moe":
            set_bias_out_(f, torch.randn(H, generator=gen), model=model)
    ref = _out(model, inputs)
    io.save(model, None, tmp_path / "m")
    loaded, _ = io.load(tmp_path / "m")
    assert torch.equal(_out(loaded, inputs), ref)
    assert [f.d_ff for f in find_ffns(loaded)] == [f.d_ff for f in find_ffns(model)]
    assert type(loaded) is type(model)


def test_uniform_prune_loads_in_plain_transformers(tmp_path):
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    report = prune_(model, PruneConfig("wanda-sp", 0.25), calibration=CALIB)
    ref = _out(model, inputs)
    io.save(model, None, tmp_path / "m", report=report)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert plain.config.intermediate_size == find_ffns(model)[0].d_ff
    assert torch.equal(_out(plain, inputs), ref)
    manifest = json.loads((tmp_path / "m" / "ffnkit.json").read_text())
    assert manifest["reports"][-1]["method"] == "wanda-sp"
    assert manifest["changes"][-1]["kind"] == "ffn_structure"


def test_flap_global_round_trip_and_reports(tmp_path):
    model = tiny_model("gpt2")
    inputs = tiny_inputs(model)
    prune_(model, PruneConfig("flap", 0.3, allocation="global"), calibration=CALIB)
    ref = _out(model, inputs)
    io.save(model, None, tmp_path / "m")  # the report travels with the model
    loaded, _ = io.load(tmp_path / "m")
    assert torch.equal(_out(loaded, inputs), ref)
    assert loaded.ffnkit_reports[-1]["method"] == "flap"
    # a second transform on the loaded model: both reports are kept, the reload is still exact
    prune_(loaded, PruneConfig("wanda-sp", 0.2), calibration=CALIB)
    ref2 = _out(loaded, inputs)
    io.save(loaded, None, tmp_path / "m2")
    again, _ = io.load(tmp_path / "m2")
    assert torch.equal(_out(again, inputs), ref2)
    assert [r["method"] for r in again.ffnkit_reports] == ["flap", "wanda-sp"]


def test_load_model_delegates_to_io(tmp_path):
    from ffnkit.sources.models import load_model

    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    prune_(model, PruneConfig("flap", 0.3, allocation="global"), calibration=CALIB)
    ref = _out(model, inputs)
    io.save(model, None, tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"))
    assert torch.equal(_out(loaded, inputs), ref)


def test_replay_registry_names_unknown_kinds(tmp_path):
    model = tiny_model("llama")
    keep_neurons_(find_ffns(model)[0], torch.arange(10), model=model)
    io.save(model, None, tmp_path / "m")
    # a folder from a newer ffnkit: both ffnkit.json and config.json record the unknown change
    for name, key in (("ffnkit.json", None), ("config.json", "ffnkit")):
        doc = json.loads((tmp_path / "m" / name).read_text())
        (doc[key] if key else doc)["changes"].append({"kind": "from_the_future"})
        (tmp_path / "m" / name).write_text(json.dumps(doc))
    with pytest.raises(SavedModelError, match="from_the_future"):
        io.load(tmp_path / "m")
    # a registered kind is replayed
    seen = []
    io.register_replay("from_the_future", lambda m, c: seen.append(c["kind"]))
    try:
        io.load(tmp_path / "m")
    finally:
        io.REPLAYS.unregister("from_the_future")
    assert seen == ["from_the_future"]


def test_errors(tmp_path):
    with pytest.raises(SavedModelError, match="not a folder"):
        io.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SavedModelError, match="config.json"):
        io.load(tmp_path / "empty")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(SavedModelError, match="weights"):
        io.load(foreign)
    (foreign / "model.safetensors").write_bytes(b"not really")
    with pytest.raises(SavedModelError):
        io.load(foreign)
    model = tiny_model("llama")
    keep_neurons_(find_ffns(model)[0], torch.arange(10), model=model)
    io.save(model, None, tmp_path / "m")
    (tmp_path / "m" / "ffnkit.json").write_text("{not json")
    with pytest.raises(SavedModelError, match="ffnkit.json"):
        io.load(tmp_path / "m")
    (tmp_path / "m" / "ffnkit.json").write_text(json.dumps({"changes": "nope"}))
    with pytest.raises(SavedModelError, match="changes"):
        io.load(tmp_path / "m")
