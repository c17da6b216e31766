"""Activation sparsity: selectors (thresholds, predictors) calibrated to skip a share of FFN weight bytes.

- :mod:`.config`     ``SparsityConfig``, the rule registry ``RULES``
- :mod:`.calibrate`  calibration inputs, quantiles, output errors (``Calibration``)
- :mod:`.rules`      ``teal``, ``best``, ``cats``, ``chess``, ``stat-topk``
- :mod:`.predictor`  ``predictor`` (Deja Vu)
- :mod:`.transform`  ``sparsify_``, ``measure_sparsity``, the replay on load
- :mod:`.drelu`      ``drelu_`` (TurboSparse's dReLU, for models that will be fine-tuned)

The runtime module is :class:`ffnkit.modules.sparse_ffn.SparseFFN`.

Example:
    >>> from ffnkit.sparsity import SparsityConfig, sparsify_
    >>> result = sparsify_(model, SparsityConfig("best", sparsity=0.4), tokenizer=tok)
"""

from __future__ import annotations

from ffnkit.core.lazy import lazy_exports

_EXPORTS = {
    "SparsityConfig": "ffnkit.sparsity.config",
    "RULES": "ffnkit.sparsity.config",
    "register_rule": "ffnkit.sparsity.config",
    "Calibration": "ffnkit.sparsity.calibrate",
    "sparsify_": "ffnkit.sparsity.transform",
    "measure_sparsity": "ffnkit.sparsity.transform",
    "SparsityResult": "ffnkit.sparsity.transform",
    "SparsityMeasurement": "ffnkit.sparsity.transform",
    "drelu_": "ffnkit.sparsity.drelu",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
