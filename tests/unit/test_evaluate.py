"""evaluate.py on a tiny random llama: perplexity protocol by hand, agreement, speed, memory, counts."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.evaluate import (
    agreement,
    count_parameters,
    decode_speed,
    environment,
    ffn_table,
    parameter_share,
    peak_memory,
    perplexity,
)

VOCAB = 128


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(1))  # [T]


def nll_by_hand(model: LlamaForCausalLM, tokens: torch.Tensor, window: int) -> tuple[float, int]:
    """One forward per non-overlapping window; sum of NLL of tokens 1.. of each window."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, tokens.numel(), window):
            ids = tokens[b : b + window][None]  # [1, L]
            if ids.shape[1] < 2:
                continue
            logp = model(ids).logits[0, :-1].double().log_softmax(-1)  # [L-1, V]
            total -= logp.gather(1, ids[0, 1:, None]).sum().item()
            n += ids.shape[1] - 1
    return total, n


@pytest.mark.parametrize("window,batch_size", [(16, 4), (25, 2), (33, 1), (100, 4)])
def test_perplexity_non_overlapping_matches_hand(model, tokens, window: int, batch_size: int) -> None:
    r = perplexity(model, tokens, window=window, batch_size=batch_size, progress=False)
    total, n = nll_by_hand(model, tokens, window)
    assert r.n_scored_tokens == n == 100 - math.ceil(100 / window)  # a 1-token last window scores nothing
    assert r.nll == pytest.approx(total / n, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)
    assert r.protocol["window"] == window and r.protocol["stride"] == window and r.protocol["n_tokens"] == 100
    assert "scoring" in r.protocol


def test_perplexity_random_model_is_near_vocab_size(model, tokens) -> None:
    r = perplexity(model, tokens, window=32, progress=False)
    assert VOCAB / 2 < r.perplexity < VOCAB * 2  # an untrained model is close to uniform


@pytest.mark.parametrize("window,stride", [(16, 8), (32, 5), (20, 1), (64, 63)])
def test_perplexity_sliding_scores_each_token_once(model, tokens, window: int, stride: int) -> None:
    r = perplexity(model, tokens, window=window, stride=stride, progress=False)
    assert r.n_scored_tokens == tokens.numel() - 1
    assert r.protocol["stride"] == stride


def test_perplexity_sliding_with_full_context_equals_one_window(model, tokens) -> None:
    # a window as long as the text: sliding and non-overlapping score the same tokens with the same context
    one = perplexity(model, tokens, window=100, progress=False)
    slid = perplexity(model, tokens, window=100, stride=10, progress=False)
    assert slid.nll == pytest.approx(one.nll, rel=1e-6)


def test_perplexity_restores_training_flag(model, tokens) -> None:
    model.train()
    try:
        perplexity(model, tokens, window=50, progress=False)
        assert model.training
    finally:
        model.eval()


def test_perplexity_errors(model, tokens) -> None:
    with pytest.raises(InvalidArgumentError):
        perplexity(model, tokens[:1], progress=False)
    with pytest.raises(InvalidArgumentError):
        perplexity(model, tokens, window=1, progress=False)
    with pytest.raises(InvalidArgumentError):
        perplexity(model, tokens, window=8, stride=9, progress=False)
    with pytest.raises(InvalidArgumentError):
        perplexity(model, tokens.view(4, 25), progress=False)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(InvalidArgumentError, match="causal LM"):
        perplexity(bert, tokens, progress=False)


def test_agreement(model, tokens) -> None:
    same = agreement(model, model, tokens, window=32)
    assert same["top1_agreement"] == 1.0
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert same["n_tokens"] == 100 - 4  # 4 windows, first token of each is context

    other = copy.deepcopy(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    diff = agreement(other, model, tokens, window=32)
    assert diff["top1_agreement"] < 1.0
    assert diff["mean_kl"] > 0.0

    # KL(ref ‖ model) by hand on one window
    ids = tokens[:32][None]
    with torch.no_grad():
        lp_m = other(ids).logits[0, :-1].double().log_softmax(-1)
        lp_r = model(ids).logits[0, :-1].double().log_softmax(-1)
    kl = F.kl_div(lp_m, lp_r, log_target=True, reduction="sum").item() / 31
    assert agreement(other, model, tokens[:32], window=32)["mean_kl"] == pytest.approx(kl, rel=1e-9)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def test_decode_speed_with_tokenizer(model) -> None:
    r = decode_speed(model, tiny_tokenizer(), "w1 w2 w3 w4", new_tokens=8, repeats=2, warmup=1)
    assert r["tokens_per_s"] > 0 and r["new_tokens"] == 8 and r["prompt_tokens"] == 4
    assert len(r["runs_tokens_per_s"]) == 2
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["threads"] == torch.get_num_threads()


def test_decode_speed_with_input_ids(model) -> None:
    r = decode_speed(model, input_ids=torch.tensor([5, 6, 7]), new_tokens=5, repeats=1, warmup=0)
    assert r["tokens_per_s"] > 0 and r["new_tokens"] == 5
    with pytest.raises(InvalidArgumentError):
        decode_speed(model)  # neither tokenizer nor input_ids
    with pytest.raises(InvalidArgumentError):
        decode_speed(model, input_ids=[1, 2], new_tokens=0)


def test_peak_memory(model, tokens) -> None:
    out, mem = peak_memory(model, tokens[None, :16])
    assert out.logits.shape == (1, 16, VOCAB)
    assert mem["measured"] == "cpu_peak_rss" and mem["peak_bytes"] > 0
    assert mem["peak_bytes"] >= mem["peak_before_bytes"] and "process-wide" in mem["note"]


@dataclass
class StandInFFN:
    """Duck-typed FFN handle: what ffn_table and parameter_share need."""

    layer: int
    kind: str
    d_model: int
    d_ff: int
    activation: str = "silu"

    def num_parameters(self) -> int:
        return 3 * self.d_model * self.d_ff

    def flops_per_token(self) -> int:
        return 2 * self.num_parameters()


def test_parameter_counts(model) -> None:
    ffns = [StandInFFN(i, "gated", 32, 64) for i in range(2)]
    rows = ffn_table(ffns)
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0] == {
        "layer": 0,
        "name": "layer0.ffn",
        "kind": "gated",
        "d_model": 32,
        "d_ff": 64,
        "activation": "silu",
        "params": 6144,
        "flops_per_token": 12288,
    }
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
    assert mlp == 2 * 6144  # the stand-in counts what the real llama MLPs hold

    counts = count_parameters(model, ffns)
    assert counts["total"] == total
    assert counts["embedding"] == 2 * VOCAB * 32  # embed_tokens and an untied lm_head
    assert counts["ffn"] == mlp and counts["ffn_share"] == pytest.approx(mlp / total)
    assert "ffn" not in count_parameters(model)

    share = parameter_share(model, ffns)
    assert share == {"total": total, "ffn": mlp, "ffn_share": pytest.approx(mlp / total)}


def test_environment() -> None:
    env = environment()
    assert env["torch"] == torch.__version__
    for key in ("platform", "processor", "cpu_count", "python", "transformers", "device_name"):
        assert key in env
