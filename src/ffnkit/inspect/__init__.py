"""Read what FFN neurons do: vocabulary projection, neuron search, prediction trace (and corpus statistics).

Names are imported lazily so that ``import ffnkit.inspect`` does no heavy work.

Example:
    >>> from ffnkit.inspect import project_neurons, search_neurons, trace
"""

from __future__ import annotations

from ffnkit.core.lazy import lazy_exports

_EXPORTS = {
    "Lens": "ffnkit.inspect.lens",
    "project_neurons": "ffnkit.inspect.vocab",
    "search_neurons": "ffnkit.inspect.vocab",
    "word_token_ids": "ffnkit.inspect.vocab",
    "Projection": "ffnkit.inspect.vocab",
    "SearchResult": "ffnkit.inspect.vocab",
    "moe_stats": "ffnkit.inspect.moe",
    "expert_vocab": "ffnkit.inspect.moe",
    "expert_contrast": "ffnkit.inspect.moe_contrast",
    "trace": "ffnkit.inspect.tracing",
    "Trace": "ffnkit.inspect.tracing",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
