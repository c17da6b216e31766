"""ffnkit export: GGUF read back with the gguf package and run by an independent numpy forward of
llama.cpp's graph; plain transformers folders loaded without ffnkit; --align's rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from ffnkit.core.errors import InvalidArgumentError, OutputFolderError, UnsupportedArchitectureError
from tests.tiny_models import SAMPLE_TEXT

gguf = pytest.importorskip("gguf")

D, HEADS, KV, FF, LAYERS, VOCAB = 32, 4, 2, 64, 4, 300


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained offline (GPT-2 style, as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )


def tiny_llama(seed: int = 0, tied: bool = True):
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.float().eval()


def pruned_llama(**kw):
    """Non-uniform widths and an FFN output bias: FLAP, global allocation, bias compensation."""
    from ffnkit.compress.prune import PruneConfig, prune_

    model = tiny_llama(**kw)
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    prune_(model, PruneConfig("flap", 0.4, allocation="global", samples=4, seq_len=16), calibration=ids)
    return model


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name not in ("tokenizer.ggml.pre", "tokenizer.ggml.model"):
            continue
        val = f.contents()
        fields[name] = val
    tensors = {t.name: t for t in reader.tensors}
    return reader, fields, tensors


def as_float(t) -> np.ndarray:
    """A GGUF tensor as float32 [rows, cols] (numpy order: the reverse of GGUF's dims)."""
    shape = tuple(int(x) for x in reversed(t.shape))
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows back to transformers' half-split order (written here, not the
    exporter's inverse: row 2j -> j, row 2j+1 -> hd/2 + j within each head)."""
    rows, d = w.shape
    hd = rows // heads
    out = np.empty_like(w)
    for h in range(heads):
        for j in range(hd // 2):
            out[h * hd + j] = w[h * hd + 2 * j]
            out[h * hd + hd // 2 + j] = w[h * hd + 2 * j + 1]
    return out


def numpy_forward(path, ids: np.ndarray) -> np.ndarray:
    """llama.cpp's llama/deci graph in numpy from the GGUF file alone: logits [T, V]."""
    _, fields, tensors = read(path)
    arch = fields["general.architecture"]
    n = int(fields[f"{arch}.block_count"])
    per = lambda v: list(v) if isinstance(v, list) else [v] * n  # noqa: E731
    heads, kv_heads = (
        per(fields[f"{arch}.attention.head_count"]),
        per(fields[f"{arch}.attention.head_count_kv"]),
    )
    widths = per(fields[f"{arch}.feed_forward_length"])
    eps = float(fields[f"{arch}.attention.layer_norm_rms_epsilon"])
    base = float(fields[f"{arch}.rope.freq_base"])
    w = {k: as_float(t) for k, t in tensors.items()}
    norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g  # noqa: E731
    h = w["token_embd.weight"][ids].astype(np.float64)  # [T, d]
    T = len(ids)
    for i in range(n):
        if heads[i] > 0:
            x = norm(h, w[f"blk.{i}.attn_norm.weight"])
            q = (x @ w[f"blk.{i}.attn_q.weight"].T).reshape(T, heads[i], -1)  # [T, H, hd]
            k = (x @ w[f"blk.{i}.attn_k.weight"].T).reshape(T, kv_heads[i], -1)
            v = (x @ w[f"blk.{i}.attn_v.weight"].T).reshape(T, kv_heads[i], -1)
            hd = q.shape[-1]
            theta = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)  # [T, hd/2]
            cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

            def rope(z, cos=cos, sin=sin):  # consecutive pairs (llama.cpp's "normal" rope)
                a, b = z[..., 0::2], z[..., 1::2]
                out = np.empty_like(z)
                out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
                return out

            q, k = rope(q), rope(k)
            group = heads[i] // kv_heads[i]
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", p, v).reshape(T, -1)
            h = h + o @ w[f"blk.{i}.attn_output.weight"].T
        if widths[i] > 0:
            x = norm(h, w[f"blk.{i}.ffn_norm.weight"])
            g = x @ w[f"blk.{i}.ffn_gate.weight"].T
            y = (g / (1 + np.exp(-g))) * (x @ w[f"blk.{i}.ffn_up.weight"].T) @ w[f"blk.{i}.ffn_down.weight"].T
            if f"blk.{i}.ffn_down.bias" in w:
                y = y + w[f"blk.{i}.ffn_down.bias"]
            h = h + y
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(h, w["output_norm.weight"]) @ head.T


def logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].double().numpy()


IDS = np.array([5, 17, 42, 99, 3, 250, 7, 8, 120])


def test_gguf_nonuniform_widths_read_back(tmp_path) -> None:
    from ffnkit.export import ExportConfig, export_loaded

    model, tok = pruned_llama(), bpe_tokenizer()
    widths = [int(layer.mlp.gate_proj.weight.shape[0]) for layer in model.model.layers]
    assert len(set(widths)) > 1  # the point of the test
    out = tmp_path / "m.gguf"
    result = export_loaded(model, tok, ExportConfig("gguf", str(out), dtype="f32"))
    assert result["architecture"] == "deci" and result["widths"] == widths
    _, fields, tensors = read(out)
    assert fields["general.architecture"] == "deci"
    assert list(fields["deci.feed_forward_length"]) == widths
    assert fields["deci.block_count"] == LAYERS and fields["deci.embedding_length"] == D
    assert fields["deci.attention.head_count"] == HEADS and fields["deci.attention.head_count_kv"] == KV
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    for i, layer in enumerate(model.model.layers):
        mlp, attn = layer.mlp, layer.self_attn
        assert tuple(tensors[f"blk.{i}.ffn_down.weight"].shape) == (widths[i], D)  # GGUF dims: [in, out]
        np.testing.assert_array_equal(
            as_float(tensors[f"blk.{i}.ffn_gate.weight"]), mlp.gate_proj.weight.detach().numpy()
        )
        np.testing.assert_array_equal(
            as_float(tensors[f"blk.{i}.ffn_down.weight"]), mlp.down_proj.weight.detach().numpy()
        )
        np.testing.assert_array_equal(
            as_float(tensors[f"blk.{i}.ffn_down.bias"]), mlp.down_proj.bias.detach().numpy()
        )
        q = unpermute(as_float(tensors[f"blk.{i}.attn_q.weight"]), HEADS)
        k = unpermute(as_float(tensors[f"blk.{i}.attn_k.weight"]), KV)
        np.testing.assert_array_equal(q, attn.q_proj.weight.detach().numpy())
        np.testing.assert_array_equal(k, attn.k_proj.weight.detach().numpy())
    np.testing.assert_allclose(numpy_forward(out, IDS), logits(model, IDS), atol=2e-4)


def test_gguf_tokenizer_matches_transformers(tmp_path) -> None:
    from ffnkit.export import ExportConfig, export_loaded

    tok = bpe_tokenizer()
    out = tmp_path / "m.gguf"
    export_loaded(tiny_llama(), tok, ExportConfig("gguf", str(out), dtype="f32"))
    reader = gguf.GGUFReader(str(out))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    vocab = tok.get_vocab()
    assert len(tokens) == VOCAB and all(vocab[t] == i for i, t in enumerate(tokens))
    assert (
        types[vocab["<|im_end|>"]] == gguf.TokenType.CONTROL and types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    )
    import json

    want = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert merges and merges == [m if isinstance(m, str) else " ".join(m) for m in want]
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == vocab["<|im_end|>"]
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == vocab["<|im_start|>"]


def test_gguf_removed_sublayers_and_untied_head(tmp_path) -> None:
    from ffnkit.compress.sublayers import SublayerConfig, remove_sublayers_
    from ffnkit.export import ExportConfig, export_loaded

    model = tiny_llama(seed=1, tied=False)
    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.1.ffn", "layers.2.attn", "layers.3"]))
    out = tmp_path / "m.gguf"
    result = export_loaded(model, bpe_tokenizer(), ExportConfig("gguf", str(out), dtype="f32"))
    _, fields, tensors = read(out)
    assert fields["deci.block_count"] == LAYERS - 1  # the removed block is gone
    # FFN removed, attention kept: a zero FFN of 32 (llama.cpp drops the whole block at width 0)
    assert list(fields["deci.feed_forward_length"]) == [FF, 32, FF] == result["widths"]
    assert list(fields["deci.attention.head_count"]) == [HEADS, HEADS, 0]
    assert "blk.2.attn_q.weight" not in tensors and "output.weight" in tensors
    np.testing.assert_allclose(numpy_forward(out, IDS), logits(model, IDS), atol=2e-4)


def test_gguf_block_quants_and_fallback(tmp_path) -> None:
    from ffnkit.export import ExportConfig, export_loaded

    model = pruned_llama()
    widths = [int(layer.mlp.gate_proj.weight.shape[0]) for layer in model.model.layers]
    out = tmp_path / "m.gguf"
    result = export_loaded(model, bpe_tokenizer(), ExportConfig("gguf", str(out), dtype="q8_0"))
    _, _, tensors = read(out)
    ragged = [i for i, w in enumerate(widths) if w % 32]
    assert ragged and result["fallback"] == [f"blk.{i}.ffn_down.weight" for i in ragged]
    for i in range(LAYERS):
        t = tensors[f"blk.{i}.ffn_down.weight"]
        want = gguf.GGMLQuantizationType.F16 if i in ragged else gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == want
        gate = tensors[f"blk.{i}.ffn_gate.weight"]
        assert gate.tensor_type == gguf.GGMLQuantizationType.Q8_0
        w = model.model.layers[i].mlp.gate_proj.weight.detach().numpy()  # [n, d]: blocks of 32 along d
        bound = (
            np.abs(w.reshape(-1, 32)).max(1, keepdims=True) / 127 * 0.57
        )  # half a step + 127 × f16 rounding of the scale
        assert (np.abs(as_float(gate) - w).reshape(-1, 32) <= bound + 1e-7).all()
    assert tensors["blk.0.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_gguf_uniform_is_plain_llama_and_ffnkit_quantised_maps_to_block_type(tmp_path) -> None:
    pytest.importorskip("torchao")
    from ffnkit.compress.quantize import QuantizeConfig, quantize_
    from ffnkit.export import ExportConfig, export_loaded

    model = tiny_llama()
    quantize_(model, QuantizeConfig(bits=8, group_size=32, mapping="symmetric"))
    out = tmp_path / "m.gguf"
    result = export_loaded(model, bpe_tokenizer(), ExportConfig("gguf", str(out)))
    _, fields, tensors = read(out)
    assert result["architecture"] == "llama" and fields["llama.feed_forward_length"] == FF
    assert result["dequantised"]
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # auto: F16 elsewhere
    ref = logits(model, IDS)
    np.testing.assert_allclose(numpy_forward(out, IDS), ref, atol=0.02 * np.abs(ref).max())


def test_hf_export_loads_with_plain_transformers(tmp_path) -> None:
    from ffnkit.export import ExportConfig, export_loaded

    model = tiny_llama()
    from ffnkit.compress.prune import PruneConfig, prune_

    prune_(
        model,
        PruneConfig("flap", 0.25, samples=2, seq_len=8),
        calibration=torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0)),
    )
    out = tmp_path / "plain"
    result = export_loaded(model, bpe_tokenizer(), ExportConfig("hf", str(out), dtype="f32"))
    plain = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__name__ == "LlamaForCausalLM" and result["intermediate_size"] < FF
    np.testing.assert_allclose(logits(plain, IDS), logits(model, IDS), atol=1e-5)


def test_hf_export_refuses_per_layer_widths_unless_padded(tmp_path) -> None:
    from ffnkit.export import ExportConfig, export_loaded

    model = pruned_llama()
    with pytest.raises(UnsupportedArchitectureError, match="--format gguf"):
        export_loaded(model, bpe_tokenizer(), ExportConfig("hf", str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
    result = export_loaded(model, bpe_tokenizer(), ExportConfig("hf", str(tmp_path / "p"), pad=True))
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert result["padded"] and plain.config.intermediate_size == max(
        int(layer.mlp.gate_proj.weight.shape[0]) for layer in model.model.layers
    )
    np.testing.assert_allclose(logits(plain, IDS), logits(model, IDS), atol=1e-5)


def test_export_config_and_output_checks(tmp_path) -> None:
    from ffnkit.export import ExportConfig, check_export_output, export_loaded

    with pytest.raises(InvalidArgumentError, match="gguf, hf"):
        ExportConfig("onnx", "x")
    with pytest.raises(InvalidArgumentError, match="does not apply"):
        ExportConfig("hf", "x", dtype="q8_0")
    with pytest.raises(InvalidArgumentError, match="-o"):
        ExportConfig("gguf", "")
    (tmp_path / "a.gguf").write_bytes(b"old")
    with pytest.raises(OutputFolderError, match="--overwrite"):
        check_export_output(ExportConfig("gguf", str(tmp_path / "a.gguf")))
    with pytest.raises(OutputFolderError, match="folder"):
        check_export_output(ExportConfig("gguf", str(tmp_path)))
    with pytest.raises(UnsupportedArchitectureError, match="Llama family"):
        from tests.tiny_models import tiny_model

        export_loaded(tiny_model("gpt2"), None, ExportConfig("gguf", str(tmp_path / "b.gguf")))
    assert not (tmp_path / "b.gguf").exists()


def test_align_widths_rounds_and_keeps_the_total() -> None:
    from ffnkit.compress.prune import align_widths

    sizes = {(i, None): 1536 for i in range(6)}
    kept = {(i, None): k for i, k in enumerate([1274, 1070, 612, 1535, 900, 1111])}
    out = align_widths(kept, sizes, 32)
    assert all(v % 32 == 0 for v in out.values())
    assert all(abs(out[k] - kept[k]) < 32 for k in kept)
    assert abs(sum(out.values()) - sum(kept.values())) <= 16  # within half a step overall
    assert align_widths(kept, sizes, 1) == kept
    # a unit narrower than the multiple keeps its full width; minimums round up
    assert align_widths({(0, None): 20}, {(0, None): 24}, 32) == {(0, None): 24}
    assert align_widths({(0, None): 40}, {(0, None): 512}, 32, {(0, None): 70}) == {(0, None): 96}


def test_prune_align_gives_multiples() -> None:
    from ffnkit.compress.prune import PruneConfig, prune_

    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    report = prune_(
        model, PruneConfig("flap", 0.3, allocation="global", align=16, samples=2, seq_len=8), calibration=ids
    )
    assert all(r["d_ff_after"] % 16 == 0 for r in report.layers)
    with pytest.raises(InvalidArgumentError, match="align"):
        PruneConfig("flap", 0.3, align=0)


def test_cli_export_gguf_json_and_hf_refusal(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from ffnkit.cli.main import app
    from ffnkit.io import save

    folder = tmp_path / "pruned"
    save(pruned_llama(), bpe_tokenizer(), folder)
    out = tmp_path / "p.gguf"
    result = CliRunner().invoke(app, ["export", str(folder), "-o", str(out), "--dtype", "f32", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["architecture"] == "deci" and doc["path"] == str(out) and out.stat().st_size == doc["bytes"]
    again = CliRunner().invoke(app, ["export", str(folder), "-o", str(out)])
    assert again.exit_code != 0 and isinstance(again.exception, OutputFolderError)  # exists: --overwrite
    hf = CliRunner().invoke(app, ["export", str(folder), "--format", "hf", "-o", str(tmp_path / "h")])
    assert isinstance(hf.exception, UnsupportedArchitectureError) and "--format gguf" in str(hf.exception)
    assert not (tmp_path / "h").exists()
