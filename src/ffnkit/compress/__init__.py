"""Compression of FFN blocks: structured neuron pruning, low rank, sublayer removal, fusion, nesting,
quantisation. Every method of ``ffnkit compress`` is in :data:`ffnkit.compress.registry.METHODS`.

Names are imported lazily, so that ``ffnkit.compress.registry`` (what the CLI lists) loads without torch.

Example:
    >>> from ffnkit.compress import PruneConfig, prune_
    >>> report = prune_(model, PruneConfig("flap", 0.3, allocation="global"), tokenizer=tok)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ALLOCATIONS": "ffnkit.compress.prune",
    "PruneConfig": "ffnkit.compress.prune",
    "PruneReport": "ffnkit.compress.prune",
    "allocate": "ffnkit.compress.prune",
    "prune_": "ffnkit.compress.prune",
    "SCORES": "ffnkit.compress.score_functions",
    "collect_stats": "ffnkit.compress.scores",
    "neuron_scores": "ffnkit.compress.scores",
    "taylor_scores": "ffnkit.compress.scores",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ffnkit.compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
