"""llama.cpp itself runs ffnkit's GGUF exports: logits of a tiny model with per-layer widths, an FFN bias,
a removed FFN, a removed attention and a removed block equal ffnkit's. Needs llama-cpp-python (built from
its source distribution: slow, so never part of the default test command); skipped without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.integration


def test_llamacpp_logits_equal_ffnkit(tmp_path) -> None:
    from ffnkit.compress.sublayers import SublayerConfig, remove_sublayers_
    from ffnkit.export import ExportConfig, export_loaded
    from tests.unit.test_export import IDS, bpe_tokenizer, logits, pruned_llama

    model = pruned_llama()
    remove_sublayers_(model, SublayerConfig("manual", remove=["layers.1.ffn", "layers.2.attn"]))
    path = tmp_path / "m.gguf"
    result = export_loaded(model, bpe_tokenizer(), ExportConfig("gguf", str(path), dtype="f32"))
    assert result["architecture"] == "deci"
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(IDS.tolist())
    got = np.asarray(llm.scores[: len(IDS)], dtype=np.float64)  # [T, V]
    np.testing.assert_allclose(got, logits(model, IDS), atol=1e-3)
    with torch.no_grad():
        want = model.generate(torch.tensor([IDS.tolist()]), max_new_tokens=8, do_sample=False)[0, len(IDS) :]
    out = []
    for tok in llm.generate(IDS.tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == 8:
            break
    assert out == want.tolist()


def test_llamacpp_uniform_llama_tokenizer_and_q8_0(tmp_path) -> None:
    """One FFN width: the plain ``llama`` graph. llama.cpp's own tokenizer, from the GGUF's vocabulary,
    splits text as transformers does; a Q8_0 export stays within quantisation noise of ffnkit's logits."""
    from ffnkit.export import ExportConfig, export_loaded
    from tests.tiny_models import SAMPLE_TEXT
    from tests.unit.test_export import IDS, bpe_tokenizer, logits, tiny_llama

    model, tok = tiny_llama(), bpe_tokenizer()
    want = logits(model, IDS)
    text = SAMPLE_TEXT[:300] + " 12345 <|im_end|>"
    for dtype, atol in (("f32", 1e-3), ("q8_0", 0.05)):
        path = tmp_path / f"m-{dtype}.gguf"
        result = export_loaded(model, tok, ExportConfig("gguf", str(path), dtype=dtype))
        assert result["architecture"] == "llama"
        llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"]
        llm.eval(IDS.tolist())
        got = np.asarray(llm.scores[: len(IDS)], dtype=np.float64)  # [T, V]
        assert np.abs(got - want).max() < atol
        assert np.abs(got - want).max() > 0 or dtype == "f32"  # q8_0 really quantised
        llm.close()


def test_q8_0_export_bit_equal_to_llama_cpp_quantize(tmp_path) -> None:
    """ffnkit's Q8_0 (the gguf package's quantiser) is byte for byte llama.cpp's own Q8_0 of the F32 export."""
    import ctypes

    import gguf

    from ffnkit.export import ExportConfig, export_loaded
    from tests.unit.test_export import bpe_tokenizer, pruned_llama

    model, tok = pruned_llama(), bpe_tokenizer()
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export_loaded(model, tok, ExportConfig("gguf", str(f32), dtype="f32"))
    export_loaded(model, tok, ExportConfig("gguf", str(ours), dtype="q8_0"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert a.keys() == b.keys()
    assert sum(t.tensor_type.name == "Q8_0" for t in a.values()) > 20
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(b[name].data), err_msg=name)
