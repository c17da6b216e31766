"""Run a model on token ids: the one forward pass, next-token log-probabilities and the causal-LM check.

Every part of ffnkit that feeds token ids through a model goes through :func:`forward` (one pass) or
:func:`run` (many ids in batches, for the hooks' sake or for the outputs):

- the ids go to the model's device (that of its first parameter);
- encoder-decoder models (T5) get the same ids as decoder input, so their decoder runs too;
- the KV cache is off (``use_cache=False`` where the config has one): nothing is generated, and a cache
  object would only grow inside captured block inputs;
- :func:`run` switches the model to eval mode (no dropout) under ``torch.no_grad`` and restores the
  training flag afterwards; :func:`forward` changes no mode (healing trains through it).

Example:
    >>> logp = log_probs(model, ids)                          # [B, T, V] float32
    >>> for start, chunk, out in run(model, batches, batch_size=8):
    ...     pass                                              # hooks saw every batch
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.progress import ProgressLike, track

__all__ = [
    "check_causal_lm",
    "device_of",
    "evaluating",
    "forward",
    "is_causal_lm",
    "iter_batches",
    "layer_states",
    "log_probs",
    "logits",
    "run",
    "to_log_probs",
]


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters).

    Example:
        >>> device_of(model)
        device(type='cpu')
    """
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _why_not_causal_lm(model: nn.Module) -> str | None:
    """None for a causal LM, else what it lacks (in words)."""
    if getattr(_config(model), "is_encoder_decoder", False):
        return "is an encoder-decoder"
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        return "has no language-modelling head"
    if not getattr(model, "can_generate", lambda: True)():
        return "is not a generative (causal) model"
    return None


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only model with a language-modelling head that predicts the next token.

    Example:
        >>> is_causal_lm(model)                                # SmolLM2: True; BERT, T5: False
        True
    """
    return _why_not_causal_lm(model) is None


def check_causal_lm(model: nn.Module, what: str) -> None:
    """Raise a one-line error naming the fix when ``what`` cannot run on ``model`` (not a causal LM).

    Example:
        >>> check_causal_lm(bert, "perplexity")
        InvalidArgumentError: perplexity needs a causal LM (AutoModelForCausalLM); this 'bert' model has no language-modelling head — load a decoder-only causal LM
    """
    why = _why_not_causal_lm(model)
    if why is not None:
        kind = getattr(_config(model), "model_type", None) or type(model).__name__
        raise InvalidArgumentError(
            f"{what} needs a causal LM (AutoModelForCausalLM); this {kind!r} model {why} — "
            "load a decoder-only causal LM"
        )


def forward(
    model: nn.Module, ids: Tensor, *, hidden_states: bool = False, labels: bool = False, **kwargs: Any
) -> Any:
    """One forward pass on token ids [B, T] (see the module docstring); the model's output object.

    ``hidden_states``: also return every layer's output; ``labels``: pass the ids as labels (the output
    then has the LM loss). No mode is changed and gradients flow (wrap in ``torch.no_grad`` or use
    :func:`run` to read only).

    Example:
        >>> out = forward(model, ids, hidden_states=True)
        >>> out.logits.shape, len(layer_states(model, out))   # [B, T, V], L
    """
    ids = ids.to(device_of(model))
    config = _config(model)
    if getattr(config, "is_encoder_decoder", False):
        kwargs.setdefault("decoder_input_ids", ids)
    if getattr(config, "use_cache", None):
        kwargs.setdefault("use_cache", False)
    if hidden_states:
        kwargs["output_hidden_states"] = True
    if labels:
        kwargs["labels"] = ids
    return model(input_ids=ids, **kwargs)


def logits(model: nn.Module, ids: Tensor, **kwargs: Any) -> Tensor:
    """Logits [B, T, V] of one :func:`forward` (in the model's dtype); a clear error without an LM head.

    Example:
        >>> logits(model, ids)[:, -1].argmax(-1)              # the next token of each row
    """
    out = forward(model, ids, **kwargs)
    result = getattr(out, "logits", None)
    if result is None:
        check_causal_lm(model, "reading logits")
        raise InvalidArgumentError(f"the output of {type(model).__name__} has no logits; load a causal LM")
    return result  # [B, T, V]


def to_log_probs(values: Tensor) -> Tensor:
    """Log-softmax over the last dimension in float32: logits [..., V] → log-probabilities [..., V].

    Example:
        >>> to_log_probs(torch.zeros(2, 4)).exp().sum(-1)     # tensor([1., 1.])
    """
    return torch.log_softmax(values.float(), dim=-1)


def log_probs(model: nn.Module, ids: Tensor, **kwargs: Any) -> Tensor:
    """Next-token log-probabilities [B, T, V] (float32): position t predicts token t + 1.

    Example:
        >>> lp = log_probs(model, ids)
        >>> lp[0, :-1].gather(-1, ids[0, 1:, None])          # log p(token t+1 | ..t)
    """
    return to_log_probs(logits(model, ids, **kwargs))


def layer_states(model: nn.Module, output: Any) -> tuple[Tensor, ...]:
    """Every layer's output hidden state [B, T, d] from a ``forward(..., hidden_states=True)`` output:
    the embedding output dropped; the decoder's states for encoder-decoder models.

    Example:
        >>> states = layer_states(model, forward(model, ids, hidden_states=True))
    """
    if getattr(_config(model), "is_encoder_decoder", False):
        states = getattr(output, "decoder_hidden_states", None)
    else:
        states = getattr(output, "hidden_states", None)
    return tuple(states[1:]) if states else ()


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and ``torch.no_grad`` for the block; the training flags come back after.

    Example:
        >>> with evaluating(model, reference):
        ...     a, b = logits(model, ids), logits(reference, ids)
    """
    flags = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(models, flags, strict=True):
            m.train(flag)


def iter_batches(
    ids: Tensor, batch_size: int, progress: ProgressLike = False, stage: str = "forward"
) -> Iterator[tuple[int, Tensor]]:
    """(first row, rows [b, T]) slices of ``ids`` [n, T], ``batch_size`` rows at a time, with progress.

    Example:
        >>> [(s, b.shape[0]) for s, b in iter_batches(torch.zeros(5, 3, dtype=torch.long), 2)]
        [(0, 2), (2, 2), (4, 1)]
    """
    if ids.dim() != 2:
        raise InvalidArgumentError(f"token batches must be [n_samples, seq_len], got {tuple(ids.shape)}")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, ids.shape[0], batch_size)
    for s in track(starts, progress, stage, unit="batch"):
        yield s, ids[s : s + batch_size]


def run(
    model: nn.Module,
    ids: Tensor,
    *,
    batch_size: int = 8,
    hidden_states: bool = False,
    progress: ProgressLike = False,
    stage: str = "forward",
    **kwargs: Any,
) -> Iterator[tuple[int, Tensor, Any]]:
    """Run ``ids`` [n, T] through the model in batches (eval mode, no gradients): yields
    (first row, ids [b, T], output) per batch. Hooks attached to the model see every batch.

    Example:
        >>> with capture(model, "post", reducers=["mean"]) as cap:
        ...     for _ in run(model, batches, batch_size=8):
        ...         pass
    """
    with evaluating(model):
        for start, chunk in iter_batches(ids, batch_size, progress, stage):
            yield start, chunk, forward(model, chunk, hidden_states=hidden_states, **kwargs)
