"""Mixture of experts from dense models: split FFNs into experts (``moefy_``), upcycle (``upcycle_``),
MoE++ experts. The runtime block is :class:`ffnkit.modules.moe.MoEBlock` (transformers v5 layout).

- :mod:`ffnkit.moe.cluster`  neuron splits (balanced k-means, co-activation, random), shared expert
- :mod:`ffnkit.moe.router`   centroid router, MLP router trained on calibration activations
- :mod:`ffnkit.moe.convert`  ``moefy_`` / ``MoEfyConfig`` (dense → MoE), replay on load
- :mod:`ffnkit.moe.upcycle`  ``upcycle_`` / ``UpcycleConfig`` (copy and granular upcycling)
- :mod:`ffnkit.moe.pluspp`   MoE++ routing statistics: share of slots zero experts absorb, compute saved

Example:
    >>> from ffnkit import moefy_, MoEfyConfig
    >>> report = moefy_(model, MoEfyConfig(active=0.5), tokenizer=tok)
"""
