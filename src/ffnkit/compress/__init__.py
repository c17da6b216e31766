"""Compression of FFN blocks: structured neuron pruning, low rank, sublayer removal, fusion, nesting,
quantisation. Every method of ``ffnkit compress`` is in :data:`ffnkit.compress.registry.METHODS`.

Names are imported lazily, so that ``ffnkit.compress.registry`` (what the CLI lists) loads without torch.

Example:
    >>> from ffnkit.compress import PruneConfig, prune_
    >>> report = prune_(model, PruneConfig("flap", 0.3, allocation="global"), tokenizer=tok)
"""

from __future__ import annotations

from ffnkit.core.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
