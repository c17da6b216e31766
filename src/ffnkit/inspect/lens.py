"""The logit lens shared by every inspect method: the final norm and the unembedding of any family.

``Lens.of(model)`` finds

- the final norm through the adapter's candidate paths (``resolve_spec(model).final_norm``), matched as a
  suffix of the module name (``norm`` → ``model.norm``), the shallowest match winning;
- the unembedding E [V, d] (and its bias, if any) through ``model.get_output_embeddings()``;
- the norm's gain g [d]: ``norm.weight``, or ``1 + norm.weight`` for Gemma's RMSNorm (which stores w − 1);
- the constants the model applies after the norm: T5's ``d_model ** -0.5`` (tied embeddings) and
  Gemma-2's final logit soft-capping — neither changes which tokens rank first.

Encoder-only models (BERT, RoBERTa) have no unembedding: ``Lens.of`` raises InvalidArgumentError.

Example:
    >>> lens = Lens.of(model)
    >>> lens.logits(hidden)            # [..., V], what the model would predict from this residual
    >>> lens.direction(W_out[:, :8])   # [d, 8]: g ⊙ v_i (centred for LayerNorm), ready for E @ ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ffnkit.core.archs import resolve_spec
from ffnkit.core.errors import InvalidArgumentError


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm module named by the adapter (suffix match, shallowest wins), or None."""
    spec = resolve_spec(model)
    for path in spec.final_norm:
        hits = [
            (name.count("."), name, mod)
            for name, mod in model.named_modules()
            if name == path or name.endswith("." + path)
        ]
        if hits:
            return min(hits, key=lambda h: h[0])[2]
    return None


def _is_layernorm(norm: nn.Module | None) -> bool:
    """Mean-centring norms (LayerNorm) versus RMS norms (Llama, T5, Gemma ...)."""
    return isinstance(norm, nn.LayerNorm)


def norm_gain(norm: nn.Module | None, d: int, like: Tensor) -> Tensor:
    """g [d] in float32: a norm's weight, with Gemma's (1 + w) convention; ones (on ``like``'s device)
    if there is no weight.

    Example:
        >>> norm_gain(model.model.norm, 576, hidden)        # [576]
    """
    weight = getattr(norm, "weight", None) if norm is not None else None
    if weight is None:
        return torch.ones(d, dtype=torch.float32, device=like.device)
    g = weight.detach().float()
    if type(norm).__name__.startswith("Gemma"):  # Gemma/Gemma2/Gemma3 RMSNorm: output * (1 + w)
        g = 1.0 + g
    return g


@dataclass(eq=False)
class Lens:
    """Final norm + unembedding of one model (see the module docstring)."""

    model: nn.Module
    norm: nn.Module | None  # the final norm (None: the model has none)
    E: Tensor  # [V, d] unembedding weight (a view of the model's parameter)
    bias: Tensor | None  # [V] lm_head bias (Phi), or None
    gain: Tensor  # [d] float32
    layernorm: bool  # the final norm subtracts the mean
    scale: float  # constant applied between the norm and E (T5 tied: d_model ** -0.5)
    softcap: float | None  # Gemma-2 final logit soft-capping

    @classmethod
    def of(cls, model: nn.Module) -> Lens:
        """Build the lens of a model; encoder-only models raise a clear error.

        Example:
            >>> lens = Lens.of(model); lens.E.shape      # torch.Size([49152, 576])
        """
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if weight is None:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise InvalidArgumentError(
                f"this {kind!r} model has no unembedding (lm_head), so its vectors cannot be read as "
                "tokens; load it with a language-modelling head (e.g. AutoModelForCausalLM / "
                "AutoModelForMaskedLM) or inspect a decoder model"
            )
        norm = _final_norm(model)
        config = model.config
        d = weight.shape[1]
        scale = 1.0
        if config.model_type == "t5" and getattr(config, "scale_decoder_outputs", False):
            scale = config.d_model**-0.5
        softcap = getattr(config, "final_logit_softcapping", None)
        bias = getattr(head, "bias", None)
        return cls(
            model=model,
            norm=norm,
            E=weight.detach(),
            bias=None if bias is None else bias.detach(),
            gain=norm_gain(norm, d, weight),
            layernorm=_is_layernorm(norm),
            scale=scale,
            softcap=softcap,
        )

    @property
    def vocab_size(self) -> int:
        return self.E.shape[0]

    @property
    def d_model(self) -> int:
        return self.E.shape[1]

    def normed(self, hidden: Tensor) -> Tensor:
        """What E reads: the final norm of a residual [..., d] times the post-norm constant."""
        with torch.no_grad():
            if self.norm is None:
                out = hidden
            else:
                param = next(self.norm.parameters(), None)
                out = self.norm(hidden if param is None else hidden.to(param.dtype))
        return out * self.scale if self.scale != 1.0 else out

    def logits(self, hidden: Tensor) -> Tensor:
        """Logit lens of a residual stream vector [..., d] → [..., V] in float32."""
        h = self.normed(hidden).float()
        logits = h @ self.E.float().T  # [..., V]
        if self.bias is not None:
            logits = logits + self.bias.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def norm_scale(self, hidden: Tensor) -> Tensor:
        """s [...]: the final norm's divisor on this residual (RMS, or std for LayerNorm), eps included."""
        h = hidden.float()
        eps = getattr(self.norm, "eps", None) or getattr(self.norm, "variance_epsilon", None) or 0.0
        if self.layernorm:
            return torch.sqrt(h.var(dim=-1, unbiased=False) + eps)
        if self.norm is None:
            return torch.ones(h.shape[:-1], device=h.device)
        return torch.sqrt(h.pow(2).mean(dim=-1) + eps)

    def direction(self, vectors: Tensor, *, use_gain: bool = True) -> Tensor:
        """Vectors [d, n] as the unembedding sees them: g ⊙ v (centred first under LayerNorm), float32.

        With ``use_gain=False`` the plain v_i (Geva et al.'s r_i = E v_i) is returned in float32.
        """
        v = vectors.float()
        if not use_gain:
            return v
        if self.layernorm:
            v = v - v.mean(dim=0, keepdim=True)  # LayerNorm removes the mean over d
        return v * (self.gain[:, None] * self.scale)

    def basis(self, use_gain: bool) -> str:
        """How projections are computed, in words (stored with every result)."""
        if not use_gain:
            return "E v_i (raw value vector, no final-norm gain)"
        centred = "centred " if self.layernorm else ""
        return f"E (g ⊙ {centred}v_i) (through the final norm's gain g)"


def decode_tokens(tokenizer, ids: list[int]) -> list[str]:
    """One readable string per token id (leading spaces kept); ids beyond the tokenizer → ``<id N>``."""
    if tokenizer is None:
        return [f"<id {i}>" for i in ids]
    n = len(tokenizer)
    return [tokenizer.decode([i]) if 0 <= i < n else f"<id {i}>" for i in ids]
