"""Compression of FFN blocks: structured neuron pruning (more methods plug into ``METHODS`` of the CLI).

Example:
    >>> from ffnkit.compress import PruneConfig, prune_
    >>> report = prune_(model, PruneConfig("flap", 0.3, allocation="global"), tokenizer=tok)
"""

from __future__ import annotations

from ffnkit.compress.prune import ALLOCATIONS, PruneConfig, PruneReport, allocate, prune_
from ffnkit.compress.scores import SCORES, collect_stats, neuron_scores, taylor_scores

__all__ = [
    "ALLOCATIONS",
    "SCORES",
    "PruneConfig",
    "PruneReport",
    "allocate",
    "collect_stats",
    "neuron_scores",
    "prune_",
    "taylor_scores",
]
