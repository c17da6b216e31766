"""Tiny random models of every supported family, built from transformers' config classes (no network).

Adding a family = one line in TINY_CONFIGS.
"""

from __future__ import annotations

import torch
import transformers as tf

H, F, L, V = 32, 48, 2, 96  # hidden size, FFN width, layers, vocabulary
ATT = dict(num_attention_heads=4, num_key_value_heads=2)
DEC = dict(
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    vocab_size=V,
    hidden_size=H,
    intermediate_size=F,
    num_hidden_layers=L,
    **ATT,
)
MOE = dict(num_experts_per_tok=2, **DEC)

TINY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**DEC),
    "mistral": lambda: tf.MistralConfig(**DEC),
    "qwen2": lambda: tf.Qwen2Config(**DEC),
    "qwen3": lambda: tf.Qwen3Config(head_dim=8, **DEC),
    "gemma": lambda: tf.GemmaConfig(head_dim=8, **DEC),
    "gemma2": lambda: tf.Gemma2Config(head_dim=8, **DEC),
    "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=8, **DEC),
    "smollm3": lambda: tf.SmolLM3Config(**DEC),
    "phi3": lambda: tf.Phi3Config(**DEC),
    "phi": lambda: tf.PhiConfig(**DEC),
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=H, n_inner=F, n_layer=L, n_head=4),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**{**DEC, "num_key_value_heads": 4}),
    "opt": lambda: tf.OPTConfig(
        vocab_size=V,
        hidden_size=H,
        ffn_dim=F,
        num_hidden_layers=L,
        num_attention_heads=4,
        word_embed_proj_dim=H,
    ),
    "bert": lambda: tf.BertConfig(
        vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L, num_attention_heads=4
    ),
    "roberta": lambda: tf.RobertaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L, num_attention_heads=4
    ),
    "t5": lambda: tf.T5Config(
        vocab_size=V, d_model=H, d_ff=F, d_kv=8, num_layers=L, num_heads=4, decoder_start_token_id=0
    ),
    "t5-gated": lambda: tf.T5Config(
        vocab_size=V,
        d_model=H,
        d_ff=F,
        d_kv=8,
        num_layers=L,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
    ),
    "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, **MOE),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40, **MOE
    ),
    "olmoe": lambda: tf.OlmoeConfig(num_experts=4, **MOE),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=24, head_dim=8, **MOE),
}
FAMILIES = tuple(TINY_CONFIGS)
# FFNs each tiny model must have: T5 has an encoder and a decoder stack
EXPECTED_FFNS = {f: 2 * L if f.startswith("t5") else L for f in FAMILIES}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model of this family, float32, eval mode."""
    config = TINY_CONFIGS[family]()
    torch.manual_seed(seed)
    if config.model_type in ("bert", "roberta"):
        model = tf.AutoModel.from_config(config)
    elif config.model_type == "t5":
        model = tf.T5ForConditionalGeneration(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    # random init leaves some biases / norms at trivial values: perturb so tests can see mistakes
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.float().eval()


def tiny_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, seq), generator=g)
    kwargs = {"input_ids": ids}
    if model.config.model_type == "t5":
        kwargs["decoder_input_ids"] = ids[:, :5]
    return kwargs


SAMPLE_TEXT = "\n".join(
    f"line {i}: the quick brown fox jumps over the lazy dog while {i % 7} small birds sing of tea and bread."
    for i in range(400)
)


def tiny_tokenizer(text: str = SAMPLE_TEXT):
    """An offline word-level tokenizer whose ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=V, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
