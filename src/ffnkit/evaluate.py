"""Measure a model: perplexity, agreement with a reference, decode speed, memory, parameter counts.

Perplexity protocol (stored with every result in ``PerplexityResult.protocol``):

* Input: one 1-D sequence of T evaluation tokens (by convention the last 4,096 tokens of the corpus'
  evaluation split, from ``ffnkit.data.evaluation_tokens``); no BOS is added, no padding is used.
* The tokens are cut into windows of ``window`` tokens starting at 0, stride, 2·stride, … until a window
  reaches the end (the last window may be shorter). Each window is one independent forward pass.
* ``stride == window`` (the default): non-overlapping windows. Every token is scored at most once; the
  first token of each window is context only and is not scored, so T − ceil(T / window) tokens are
  scored (a last window of one token scores nothing and is skipped).
* ``stride < window``: sliding window (Hugging Face's strided protocol). Each window scores only the
  tokens that no earlier window scored, with the rest of the window as context, so every token except
  the very first is scored exactly once (T − 1 tokens), each with at least ``window − stride`` tokens of
  context.
* The score of a token is its negative log-likelihood under the model's next-token distribution
  (log-softmax over the float32 logits); NLLs are summed in float64; perplexity = exp(sum / count).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffnkit.core.config import Result
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.progress import ProgressLike, track
from ffnkit.core.runner import check_causal_lm, device_of, evaluating, logits

__all__ = [
    "PerplexityResult",
    "agreement",
    "count_parameters",
    "decode_speed",
    "environment",
    "ffn_table",
    "parameter_share",
    "peak_memory",
    "perplexity",
]

SCORING_RULE = (
    "windows start every `stride` tokens; each window scores only tokens not scored by an earlier window, "
    "never its own first token; NLL from float32 log-softmax, summed in float64; ppl = exp(mean NLL)"
)


@dataclass
class PerplexityResult(Result):
    """Perplexity, mean NLL (nats/token), how many tokens were scored, and the protocol used."""

    perplexity: float
    nll: float
    n_scored_tokens: int
    protocol: dict[str, Any] = field(default_factory=dict)


# --- helpers ------------------------------------------------------------------------------------------
def _as_tokens(tokens: Tensor | Sequence[int]) -> Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise InvalidArgumentError(f"tokens must be a 1-D LongTensor [T], got shape {tuple(t.shape)}")
    if t.numel() < 2:
        raise InvalidArgumentError(f"need at least 2 tokens to score one, got {t.numel()}: pass more text")
    return t


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window, absolute positions; tokens [first_scored, end) are scored."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no context in the window
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _batches(wins: list[tuple[int, int, int]], batch_size: int) -> Iterable[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most ``batch_size`` at a time (no padding needed)."""
    batch: list[tuple[int, int, int]] = []
    for w in wins:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


# --- perplexity and agreement -------------------------------------------------------------------------
def perplexity(
    model: nn.Module,
    tokens: Tensor | Sequence[int],
    *,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    progress: ProgressLike = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``tokens`` [T] under the protocol in this module's docstring.

    Example:
        >>> r = perplexity(model, tokens, window=512)  # non-overlapping windows
        >>> r.perplexity, r.n_scored_tokens, r.protocol["stride"]
    """
    check_causal_lm(model, "perplexity")
    tokens = _as_tokens(tokens)
    stride = window if stride is None else stride
    if window < 2:
        raise InvalidArgumentError(f"window must be >= 2 (one context and one scored token), got {window}")
    if not 1 <= stride <= window:
        raise InvalidArgumentError(f"stride must be in [1, window={window}], got {stride}")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")

    wins = _windows(tokens.numel(), window, stride)
    device, nll_sum, n_scored = device_of(model), 0.0, 0
    with evaluating(model):
        for batch in track(list(_batches(wins, batch_size)), progress, "perplexity", unit="batch"):
            ids = torch.stack([tokens[b:e] for b, e, _ in batch]).to(device)  # [B, L]
            pred = logits(model, ids)[:, :-1].float()  # [B, L-1, V]: position j predicts token j+1
            nll = F.cross_entropy(pred.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L-1]
            for row, (b, e, first) in enumerate(batch):
                nll_sum += nll[row, first - b - 1 :].double().sum().item()  # targets first..e-1
                n_scored += e - first
    mean = nll_sum / n_scored
    protocol = {
        "window": window,
        "stride": stride,
        "n_tokens": tokens.numel(),
        "n_windows": len(wins),
        "scoring": SCORING_RULE,
    }
    return PerplexityResult(math.exp(mean), mean, n_scored, protocol)


def agreement(
    model: nn.Module,
    reference: nn.Module,
    tokens: Tensor | Sequence[int],
    *,
    window: int = 512,
    progress: ProgressLike = False,
) -> dict[str, Any]:
    """Top-1 next-token agreement and mean KL(reference ‖ model) per token, over non-overlapping windows.

    The same tokens as ``perplexity(..., stride=window)`` are compared. KL in nats, computed in float64.

    Example:
        >>> agreement(pruned, original, tokens, window=256)
        {'top1_agreement': 0.97, 'mean_kl': 0.021, 'n_tokens': 4080, 'window': 256}
    """
    check_causal_lm(model, "agreement")
    check_causal_lm(reference, "agreement")
    tokens = _as_tokens(tokens)
    if window < 2:
        raise InvalidArgumentError(f"window must be >= 2, got {window}")
    agree, kl_sum, n = 0, 0.0, 0
    with evaluating(model, reference):
        for b, e, _ in track(_windows(tokens.numel(), window, window), progress, "agreement", unit="window"):
            ids = tokens[b:e][None]  # [1, L]
            lm = logits(model, ids)[0, :-1].double()  # [L-1, V]; last position predicts nothing
            lr = logits(reference, ids)[0, :-1].to(lm.device, torch.float64)  # [L-1, V]
            agree += (lm.argmax(-1) == lr.argmax(-1)).sum().item()
            logp_m, logp_r = lm.log_softmax(-1), lr.log_softmax(-1)
            kl_sum += (logp_r.exp() * (logp_r - logp_m)).sum().item()  # Σ_tokens KL(ref ‖ model)
            n += lm.shape[0]
    return {"top1_agreement": agree / n, "mean_kl": kl_sum / n, "n_tokens": n, "window": window}


# --- speed and memory ---------------------------------------------------------------------------------
def decode_speed(
    model: nn.Module,
    tokenizer: Any = None,
    prompt: str = "The feed-forward layers of a Transformer",
    *,
    input_ids: Tensor | Sequence[int] | None = None,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Greedy decode speed at batch 1: median tokens/s over ``repeats`` runs after ``warmup`` runs.

    Give either a ``tokenizer`` (the ``prompt`` is encoded) or ``input_ids`` [T] / [1, T].

    Example:
        >>> decode_speed(model, tokenizer, new_tokens=32)["tokens_per_s"]
        41.7
    """
    check_causal_lm(model, "decode_speed")
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise InvalidArgumentError("decode_speed needs new_tokens >= 1, repeats >= 1 and warmup >= 0")
    if input_ids is None:
        if tokenizer is None:
            raise InvalidArgumentError("decode_speed needs a tokenizer (with a prompt) or input_ids")
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    device = device_of(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(device)  # [1, T]
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:  # silences generate's warning; no padding happens at batch 1
        eos = getattr(config, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    gen_kwargs = {
        "attention_mask": torch.ones_like(ids),
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,  # no early stop at EOS: every run decodes the same number of tokens
        "pad_token_id": pad,
    }

    def run() -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, **gen_kwargs)  # [1, T + new_tokens]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out.shape[1] - ids.shape[1]

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                run()
            runs = [run() for _ in range(repeats)]
    finally:
        model.train(was_training)
    rates = [n / s for s, n in runs]
    return {
        "tokens_per_s": statistics.median(rates),
        "runs_tokens_per_s": rates,
        "new_tokens": runs[0][1],
        "prompt_tokens": ids.shape[1],
        "batch_size": 1,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def _find_device(objs: Iterable[Any]) -> torch.device:
    for o in objs:
        if isinstance(o, nn.Module):
            return device_of(o)
        if isinstance(o, Tensor):
            return o.device
    return torch.device("cpu")


def peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Run ``fn(*args, **kwargs)`` and report its peak memory.

    The device is that of ``fn`` if it is a module, else of the first module or tensor among the
    arguments (CPU if none). On CUDA the
    allocator's peak (``max_memory_allocated``, reset before the call) is measured; on CPU the process'
    peak resident set size (``ru_maxrss``), which is process-wide and since process start: it only grows
    if ``fn`` goes above every earlier peak.

    Example:
        >>> logits, mem = peak_memory(model, input_ids)
        >>> mem["peak_bytes"], mem["measured"]
    """
    device = _find_device([fn, *args, *kwargs.values()])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        info = {
            "measured": "cuda_max_memory_allocated",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device),
            "peak_bytes": peak,
            "allocated_before_bytes": before,
            "peak_increase_bytes": peak - before,
            "note": "peak of tensors allocated by PyTorch on this device during the call",
        }
    else:
        before = _peak_rss_bytes()
        result = fn(*args, **kwargs)
        peak = _peak_rss_bytes()
        info = {
            "measured": "cpu_peak_rss",
            "device": str(device),
            "peak_bytes": peak,
            "peak_before_bytes": before,
            "peak_increase_bytes": peak - before,
            "note": "process-wide peak RSS since process start (ru_maxrss), not only this call",
        }
    info["peak_mib"] = info["peak_bytes"] / 2**20
    return result, info


# --- parameters ---------------------------------------------------------------------------------------
def _unique_numel(params: Iterable[nn.Parameter]) -> int:
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) not in seen:  # tied weights (embedding = LM head) count once
            seen.add(id(p))
            total += p.numel()
    return total


def _activation_name(act: Any) -> str | None:
    if act is None or isinstance(act, str):
        return act
    return getattr(act, "__name__", None) or type(act).__name__


def ffn_table(ffns: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per FFN: {layer, name, kind, d_model, d_ff, activation, params, flops_per_token}.

    Takes any objects with ``layer``, ``kind``, ``d_model``, ``d_ff`` and ``num_parameters()``,
    ``flops_per_token()`` (the FFN handles of ``find_ffns``); ``name`` and ``activation`` are optional.

    Example:
        >>> ffn_table(find_ffns(model))[0]["params"]
    """
    rows = []
    for f in ffns:
        rows.append(
            {
                "layer": f.layer,
                "name": getattr(f, "name", None) or f"layer{f.layer}.ffn",
                "kind": f.kind,
                "d_model": f.d_model,
                "d_ff": f.d_ff,
                "activation": _activation_name(getattr(f, "activation", None)),
                "params": int(f.num_parameters()),
                "flops_per_token": int(f.flops_per_token()),
            }
        )
    return rows


def count_parameters(model: nn.Module, ffns: Iterable[Any] | None = None) -> dict[str, Any]:
    """Parameter counts: total, embedding (input/output embeddings, tied ones once), non-embedding, and
    with ``ffns`` also the FFN total and its share of the total and of the non-embedding parameters.

    Example:
        >>> count_parameters(model, find_ffns(model))["ffn_share"]
        0.64
    """
    from ffnkit.modules.base import packed_numel

    # quantised FFN matrices (packed buffers) count as the weights they stand for
    total = _unique_numel(model.parameters()) + packed_numel(model)
    emb_modules = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    if out_emb is not None:
        emb_modules.append(out_emb)
    embedding = _unique_numel(p for m in emb_modules for p in m.parameters())
    counts: dict[str, Any] = {"total": total, "embedding": embedding, "non_embedding": total - embedding}
    if ffns is not None:
        ffn = sum(int(f.num_parameters()) for f in ffns)
        counts.update(
            ffn=ffn,
            ffn_share=ffn / total if total else 0.0,
            ffn_share_non_embedding=ffn / (total - embedding) if total > embedding else 0.0,
        )
    return counts


def parameter_share(model: nn.Module, ffns: Iterable[Any]) -> dict[str, Any]:
    """Total parameters, FFN parameters and the FFN share of the total.

    Example:
        >>> parameter_share(model, find_ffns(model))
        {'total': 124439808, 'ffn': 56669184, 'ffn_share': 0.455}
    """
    c = count_parameters(model, ffns)
    return {"total": c["total"], "ffn": c["ffn"], "ffn_share": c["ffn_share"]}


# --- environment --------------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """The machine and versions, to record with every result.

    Example:
        >>> environment()["torch"]
        '2.13.0+cpu'
    """
    env: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "device_name": None,
    }
    if torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.cuda.current_device())
        env["device_count"] = torch.cuda.device_count()
    return env
