"""Quantised models save to safetensors (packed, really smaller) and load back with identical logits."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from ffnkit import find_ffns, io
from ffnkit.compress.lowrank import LowRankConfig, lowrank_
from ffnkit.compress.quantize import QuantizeConfig, quantize_, replay_quantized
from ffnkit.core.edit import keep_neurons_
from ffnkit.core.errors import InvalidArgumentError, SavedModelError
from ffnkit.kernels import use_backend
from ffnkit.modules.lowrank import LowRankLinear
from ffnkit.modules.quantized import PackedExperts, QuantizedLinear, pack_ints, unpack_ints
from tests.tiny_models import tiny_inputs, tiny_model

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(
    not HAS_TORCHAO, reason="torchao is not installed (pip install ffnkit[quantize])"
)


def _out(model, inputs):
    with torch.no_grad():
        o = model(**inputs)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _weights_size(folder) -> int:
    """Bytes of tensor data in model.safetensors (the file less its JSON header: 8-byte length + header)."""
    path = folder / "model.safetensors"
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip_and_size(bits):
    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for n in (1, 7, 8, 61, 1000):
        q = torch.randint(lo, hi + 1, (n,), generator=gen, dtype=torch.int64).to(torch.int8)
        packed = pack_ints(q, bits)
        assert packed.dtype == torch.uint8
        assert n * bits <= 8 * packed.numel() < n * bits + 8 * bits  # bits per value, whole bytes
        assert torch.equal(unpack_ints(packed, bits, n), q)
    extremes = torch.tensor([lo, hi, 0, -1], dtype=torch.int8)
    assert torch.equal(unpack_ints(pack_ints(extremes, bits), bits, 4), extremes)


@needs_torchao
@pytest.mark.parametrize(
    "bits,group,mapping",
    [
        (4, 16, "symmetric"),
        (8, None, "symmetric"),
        (3, 8, "symmetric"),
        (4, 16, "asymmetric"),
        (2, 8, "asymmetric"),
    ],
)
def test_forward_equals_torchao_bit_for_bit(bits, group, mapping):
    """QuantizedLinear computes exactly what torchao's own quantised Linear computes (reference backend:
    dequantise then matmul, bit for bit; the kernel paths: up to float32 rounding)."""
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup
    from torchao.quantization import quantize_ as ao_quantize_

    torch.manual_seed(0)
    model = tiny_model("llama")
    mod = find_ffns(model)[0].in_proj  # quantise a real FFN Linear through quantize_, then compare
    with torch.no_grad():
        mod.weight.copy_(torch.randn_like(mod.weight))
    ref_lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
    with torch.no_grad():
        ref_lin.weight.copy_(mod.weight)
    config = QuantizeConfig(bits=bits, group_size=group, layers=[0], matrices=["in"], mapping=mapping)
    quantize_(model, config)
    q = find_ffns(model)[0].in_proj
    assert isinstance(q, QuantizedLinear) and (q.zero_point is not None) == (mapping == "asymmetric")
    gran = PerAxis(0) if group is None else PerGroup(group)
    kind = MappingType.SYMMETRIC if mapping == "symmetric" else MappingType.ASYMMETRIC
    dtype = getattr(torch, f"int{bits}")
    ao_quantize_(ref_lin, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=gran, mapping_type=kind))
    x = torch.randn(5, mod.in_features)
    with use_backend("reference"):
        assert torch.equal(q(x), ref_lin(x))
    with torch.no_grad():  # the kernels run without autograd
        torch.testing.assert_close(q(x), ref_lin(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(q.weight, ref_lin.weight.dequantize())


@needs_torchao
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "opt", "gpt_neox", "qwen2_moe", "t5-gated"])
def test_save_load_identical_logits_and_smaller_files(family, tmp_path):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    io.save(model, None, tmp_path / "float")
    sizes = {}
    for bits in (8, 4):
        m = tiny_model(family)
        report = quantize_(m, QuantizeConfig(bits=bits, group_size=8))
        ref = _out(m, inputs)
        io.save(m, None, tmp_path / f"q{bits}", report=report)
        loaded, _ = io.load(tmp_path / f"q{bits}")
        assert torch.equal(_out(loaded, inputs), ref)  # bit for bit
        mods = [x for x in loaded.modules() if isinstance(x, QuantizedLinear)]
        linears = [k for k in report.layers[0]["matrices"] if not k.startswith("experts.")]
        assert len(mods) == len(linears) * len(find_ffns(m))
        assert all(x.bits == bits and x.group_size == 8 for x in mods)
        for (n, b), (n2, b2) in zip(m.named_buffers(), loaded.named_buffers(), strict=True):
            assert n == n2 and torch.equal(b, b2)
        # the file really holds packed integers, not dequantised floats
        with safe_open(str(tmp_path / f"q{bits}" / "model.safetensors"), "pt") as f:
            packed = [k for k in f.keys() if k.endswith(".qweight")]
            assert packed and all(f.get_slice(k).get_dtype() == "U8" for k in packed)
        sizes[bits] = _weights_size(tmp_path / f"q{bits}")
        saved = _weights_size(tmp_path / "float") - sizes[bits]
        # the tensor data shrinks by what the report says the FFN matrices shrank (padding aside)
        assert saved == pytest.approx(report.ffn_bytes_before - report.ffn_bytes_after, rel=0.01)
        assert loaded.ffnkit_reports[-1]["transform"] == "quantize"
    assert sizes[4] < sizes[8] < _weights_size(tmp_path / "float")


@needs_torchao
def test_prune_then_quantise_then_lowrank_combinations_round_trip(tmp_path):
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    f0 = find_ffns(model)[0]
    keep_neurons_(f0, torch.arange(0, f0.d_ff, 2), model=model)  # prune first: allowed
    lowrank_(model, LowRankConfig("svd", rank=8, layers=[1]))
    quantize_(model, QuantizeConfig(bits=4, group_size=8))
    assert isinstance(find_ffns(model)[1].in_proj, LowRankLinear)
    assert isinstance(find_ffns(model)[1].in_proj.A, QuantizedLinear)
    kinds = [c["kind"] for c in model.config.ffnkit["changes"]]
    assert kinds == ["ffn_structure", "ffn_lowrank", "ffn_quantized"]
    ref = _out(model, inputs)
    io.save(model, None, tmp_path / "m")
    loaded, _ = io.load(tmp_path / "m")
    assert torch.equal(_out(loaded, inputs), ref)
    assert find_ffns(loaded)[0].d_ff == f0.d_ff


@needs_torchao
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantised_matrices_refuse_pruning_and_stay_unchanged(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    quantize_(model, QuantizeConfig(bits=4, group_size=8))
    ref = _out(model, inputs)
    f = find_ffns(model)[0]
    with pytest.raises(InvalidArgumentError, match="quantised.*before quantize_"):
        keep_neurons_(f, torch.arange(4), model=model)
    assert torch.equal(_out(model, inputs), ref)
    assert find_ffns(model)[0].d_ff == f.d_ff
    with pytest.raises(InvalidArgumentError, match="already quantised"):
        quantize_(model, QuantizeConfig(bits=8, group_size=8))


@needs_torchao
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_moe_expert_tensors_quantise_save_and_load(family, tmp_path):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    moe = find_ffns(model)[0]
    w_before = moe.experts[1].W_out.detach().clone()
    report = quantize_(model, QuantizeConfig(bits=8, group_size=8))
    assert {"experts.gate_up", "experts.down"} <= set(report.layers[0]["matrices"])
    moe = find_ffns(model)[0]
    assert moe.experts[1].W_out.shape == w_before.shape
    err = (moe.experts[1].W_out - w_before).abs().max() / w_before.abs().max()
    assert 0 < err < 0.01  # really quantised, within int8's half step
    q = _out(model, inputs)
    assert 0 < float((q - ref).norm() / ref.norm()) < 0.05
    io.save(model, None, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        packed = [k for k in f.keys() if "experts.parametrizations" in k and k.endswith("original0")]
        assert len(packed) == 2 * len(find_ffns(model))
        assert all(f.get_slice(k).get_dtype() == "U8" for k in packed)
    loaded, _ = io.load(tmp_path / "m")
    assert torch.equal(_out(loaded, inputs), q)


@needs_torchao
def test_experts_dequantise_once_per_forward_and_refuse_pruning(monkeypatch):
    model = tiny_model("mixtral")
    inputs = tiny_inputs(model)
    quantize_(model, QuantizeConfig(bits=4, group_size=8))
    ref = _out(model, inputs)
    calls = []
    forward = PackedExperts.forward
    monkeypatch.setattr(PackedExperts, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    assert torch.equal(_out(model, inputs), ref)
    assert len(calls) == 2 * len(find_ffns(model))  # gate_up and down once per layer, not per expert
    with pytest.raises(InvalidArgumentError, match="quantised.*before quantize_"):
        keep_neurons_(find_ffns(model)[0], torch.arange(8), model=model)
    assert torch.equal(_out(model, inputs), ref)
    with pytest.raises(InvalidArgumentError, match="already quantised"):
        quantize_(model, QuantizeConfig(bits=8, group_size=8))


@needs_torchao
def test_corrupt_or_foreign_folders_give_one_line_errors(tmp_path):
    model = tiny_model("llama")
    quantize_(model, QuantizeConfig(bits=4, group_size=8))
    io.save(model, None, tmp_path / "q")
    errors = []
    # 1. the manifest claims other bits than the stored tensors hold
    bad = tmp_path / "bits"
    io.save(model, None, bad)
    doc = json.loads((bad / "ffnkit.json").read_text())
    doc["changes"][-1]["modules"][0]["bits"] = 8
    (bad / "ffnkit.json").write_text(json.dumps(doc))
    with pytest.raises(SavedModelError) as e:
        io.load(bad)
    errors.append(str(e.value))
    # 2. a path that is not in the model
    bad = tmp_path / "path"
    io.save(model, None, bad)
    for name, key in (("ffnkit.json", None), ("config.json", "ffnkit")):  # both record the changes
        doc = json.loads((bad / name).read_text())
        (doc[key] if key else doc)["changes"][-1]["modules"][0]["path"] = "model.layers.0.mlp.nowhere"
        (bad / name).write_text(json.dumps(doc))
    with pytest.raises(SavedModelError, match="ffn_quantized") as e:
        io.load(bad)
    errors.append(str(e.value))
    # 3. a float folder (foreign weights) with a quantised manifest
    foreign = tmp_path / "foreign"
    io.save(tiny_model("llama"), None, foreign)
    doc = json.loads((tmp_path / "q" / "ffnkit.json").read_text())
    doc.pop("files")  # a manifest without file sizes (older ffnkit): the weights themselves are checked
    (foreign / "ffnkit.json").write_text(json.dumps(doc))
    with pytest.raises(SavedModelError, match="do not match") as e:
        io.load(foreign)
    errors.append(str(e.value))
    # 4. truncated weights
    bad = tmp_path / "trunc"
    io.save(model, None, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SavedModelError) as e:
        io.load(bad)
    errors.append(str(e.value))
    assert all("\n" not in msg and "save" in msg for msg in errors), errors


def test_replay_refuses_a_module_that_is_not_a_matrix():
    model = tiny_model("llama")
    change = {"modules": [{"path": "model.norm", "in_features": 8, "out_features": 8, "bits": 4,
                           "group_size": 8, "bias": False}]}  # fmt: skip
    with pytest.raises(SavedModelError, match="not the Linear"):
        replay_quantized(model, change)


@needs_torchao
def test_bfloat16_model_round_trip_and_load_without_torchao(tmp_path, monkeypatch):
    # a bf16 model as loading gives it (a .to(bfloat16) cast would also cast RoPE's inv_freq, which
    # loading recomputes in float32: a difference of io, not of quantisation)
    io.save(tiny_model("llama").to(torch.bfloat16), None, tmp_path / "bf16")
    model, _ = io.load(tmp_path / "bf16")
    inputs = tiny_inputs(model)
    quantize_(model, QuantizeConfig(bits=4, group_size=8))
    assert find_ffns(model)[0].in_proj.scale.dtype == torch.bfloat16
    ref = _out(model, inputs)
    io.save(model, None, tmp_path / "m")
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # loading and running need no torchao
    loaded, _ = io.load(tmp_path / "m")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(_out(loaded, inputs), ref)


@needs_torchao
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_asymmetric_round_trip_and_lower_error(family, tmp_path):
    model = tiny_model(family)
    inputs = tiny_inputs(model)
    ref = _out(model, inputs)
    errs = {}
    for mapping in ("symmetric", "asymmetric"):
        m = tiny_model(family)
        report = quantize_(m, QuantizeConfig(bits=3, group_size=8, mapping=mapping))
        q = _out(m, inputs)
        errs[mapping] = float((q - ref).norm() / ref.norm())
        io.save(m, None, tmp_path / mapping, report=report)
        loaded, _ = io.load(tmp_path / mapping)
        assert torch.equal(_out(loaded, inputs), q)
    # a zero point per group fits skewed groups better; 3 bits make the difference visible
    assert errs["asymmetric"] < errs["symmetric"]
    with pytest.raises(InvalidArgumentError, match="mapping"):
        QuantizeConfig(mapping="nf4")


@needs_torchao
def test_prune_after_quantise_is_a_clear_error():
    from ffnkit.compress import PruneConfig, prune_

    model = tiny_model("llama")
    quantize_(model, QuantizeConfig(bits=4, group_size=8))
    calibration = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(5))
    with pytest.raises(InvalidArgumentError, match="quantised"):
        prune_(model, PruneConfig("magnitude", 0.3), calibration=calibration)


@needs_torchao
def test_cli_compress_quantize_then_eval(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.tiny_models import SAMPLE_TEXT, tiny_tokenizer

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root / "src"),
        "FFNKIT_CACHE": str(tmp_path / "c"),
        "HF_HUB_OFFLINE": "1",
    }
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "corpus.txt").write_text(SAMPLE_TEXT)

    def ffnkit(*args):
        run = subprocess.run([sys.executable, "-m", "ffnkit", *args], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout)

    out = tmp_path / "q"
    doc = ffnkit(
        "compress", str(tmp_path / "tiny"), "--method", "quantize", "-o", str(out), "--no-eval", "--json"
    )
    assert doc["report"]["transform"] == "quantize" and doc["report"]["stored_bits_per_weight"] < 8
    assert doc["report"]["config"]["mapping"] == QuantizeConfig().mapping  # the library's default
    assert _weights_size(out) < _weights_size(tmp_path / "tiny")
    doc8 = ffnkit(
        "compress",
        str(tmp_path / "tiny"),
        "--method",
        "quantize",
        "--bits",
        "8",
        "-o",
        str(tmp_path / "q8"),
        "--no-eval",
        "--json",
    )
    assert doc8["report"]["config"]["bits"] == 8 and _weights_size(out) < _weights_size(tmp_path / "q8")
    ev = ffnkit("eval", str(out), "--corpus", str(tmp_path / "corpus.txt"), "--window", "32", "--json")
    assert ev["perplexity"] > 1


@needs_torchao
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_quantising_keeps_the_parameter_count(family):
    from ffnkit.evaluate import count_parameters

    model = tiny_model(family)
    before = count_parameters(model, find_ffns(model))
    quantize_(model, QuantizeConfig(bits=4, group_size=8))
    assert count_parameters(model, find_ffns(model)) == before


@needs_torchao
def test_bits_per_ffn_mixed_in_one_model_round_trip(tmp_path):
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    quantize_(model, QuantizeConfig(bits=8, group_size=8, layers=[0]))
    quantize_(model, QuantizeConfig(bits=4, group_size=8, layers=[1]))
    bits = [find_ffns(model)[i].in_proj.bits for i in (0, 1)]
    assert bits == [8, 4]
    with pytest.raises(InvalidArgumentError):
        quantize_(model, QuantizeConfig(bits=4, group_size=8, layers=[0]))  # already quantised
    ref = _out(model, inputs)
    io.save(model, None, tmp_path / "mixed")
    loaded, _ = io.load(tmp_path / "mixed")
    assert [find_ffns(loaded)[i].in_proj.bits for i in (0, 1)] == [8, 4]
    assert torch.equal(_out(loaded, inputs), ref)
