"""Read what FFN neurons do: vocabulary projection, neuron search, prediction trace (and corpus statistics).

Names are imported lazily so that ``import ffnkit.inspect`` does no heavy work.

Example:
    >>> from ffnkit.inspect import project_neurons, search_neurons, trace
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Lens": "ffnkit.inspect.lens",
    "project_neurons": "ffnkit.inspect.vocab",
    "search_neurons": "ffnkit.inspect.vocab",
    "word_token_ids": "ffnkit.inspect.vocab",
    "Projection": "ffnkit.inspect.vocab",
    "SearchResult": "ffnkit.inspect.vocab",
    "trace": "ffnkit.inspect.trace",
    "Trace": "ffnkit.inspect.trace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ffnkit.inspect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
