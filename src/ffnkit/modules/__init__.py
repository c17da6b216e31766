"""Runtime ``nn.Module``s that ffnkit's transforms put into models, with one protocol (:mod:`.base`).

- :mod:`ffnkit.modules.base`      ``RuntimeModule`` (stored size, replay, capture sites, writability),
  ``HookPoint``, ``packed_numel``
- :mod:`ffnkit.modules.lowrank`   ``LowRankLinear`` (y = B·A·x)
- :mod:`ffnkit.modules.quantized` ``QuantizedLinear``, ``PackedExperts``, int packing and dequantisation
- :mod:`ffnkit.modules.zero`      ``ZeroFFN``, ``ZeroAttention`` (removed sublayers)

Example:
    >>> from ffnkit.modules.lowrank import LowRankLinear
    >>> LowRankLinear(576, 1536, rank=64).stored_numel()
    135168
"""
