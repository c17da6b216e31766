"""The compression methods that compose library transforms, each a config dataclass plus a run function.

:data:`ffnkit.compress.registry.METHODS` points here for the methods that are more than one transform
with a config (the others run ``prune_``, ``lowrank_`` or ``remove_sublayers_`` directly):

- ``fuse``: fuse round(ratio × #FFNs) runs of consecutive FFNs, lowest dependency first
  (:class:`FuseShareConfig`, :func:`fuse_share_`); parameters stay, sequential depth goes.
- ``nest``: sort neurons by importance, then keep the first (1 − ratio) of every FFN
  (:class:`NestSliceConfig`, :func:`nest_slice_`).
- ``quantize``: :func:`~ffnkit.compress.quantize.quantize_` whose group size falls back to one scale per
  output row where it does not divide a matrix's input width (:func:`quantize_fitting_`).

Example:
    >>> report = fuse_share_(model, FuseShareConfig(ratio=0.1), tokenizer=tok)   # 3 runs of 30 FFNs
    >>> report = nest_slice_(model, NestSliceConfig(ratio=0.25), tokenizer=tok)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ffnkit.compress.fusion import FusionConfig, FusionReport, fuse_ffns_
from ffnkit.compress.nest import NestConfig, NestReport, nest_, slice_widths_
from ffnkit.compress.quantize import QuantizeConfig, QuantizeReport, group_size_fits, quantize_
from ffnkit.core.archs import find_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError

__all__ = ["FuseShareConfig", "NestSliceConfig", "fuse_share_", "nest_slice_", "quantize_fitting_"]


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= float(ratio) < 1.0:
        raise InvalidArgumentError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


# ----- fuse ---------------------------------------------------------------------------------------
@dataclass
class FuseShareConfig(JsonConfig):
    """Fuse round(``ratio`` × #FFNs) runs of ``run_length`` blocks (``FusionConfig(runs="auto")``).

    The other fields are :class:`~ffnkit.compress.fusion.FusionConfig`'s, with its defaults.

    Example:
        >>> FuseShareConfig(ratio=0.1).fusion_config(30).max_runs
        3
    """

    ratio: float = 0.3  # share of the FFNs taken off the sequential path (their parameters stay)
    run_length: int = FusionConfig.run_length
    samples: int = FusionConfig.samples
    seq_len: int = FusionConfig.seq_len
    batch_size: int = FusionConfig.batch_size
    corpus: str = FusionConfig.corpus
    seed: int = FusionConfig.seed
    version: int = 1

    def __post_init__(self) -> None:
        self.ratio = _check_ratio(self.ratio)
        self.fusion_config(0)  # the FusionConfig checks of the other fields, now

    def fusion_config(self, n_ffns: int) -> FusionConfig:
        """The FusionConfig for a model of ``n_ffns`` FFNs (at least one run, so that checks pass)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in ("ratio", "version")}
        return FusionConfig(runs="auto", max_runs=max(1, self.runs(n_ffns)), **fields)

    def runs(self, n_ffns: int) -> int:
        """How many runs a model of ``n_ffns`` FFNs gets: round(ratio × n_ffns)."""
        return round(self.ratio * n_ffns)


def fuse_share_(
    model: nn.Module,
    config: FuseShareConfig,
    *,
    tokenizer: Any = None,
    progress: bool = False,
    **inputs: Any,
) -> FusionReport:
    """Fuse round(ratio × #FFNs) lowest-dependency runs (``inputs``: fuse_ffns_'s calibration=, dependency=).

    Example:
        >>> fuse_share_(model, FuseShareConfig(ratio=0.5), tokenizer=tok).runs   # [[0, 1], [2, 3]] of 4
    """
    n = len(find_ffns(model))
    if config.runs(n) < 1:
        raise InvalidArgumentError(
            f"ratio {config.ratio} fuses no run: fusion takes round(ratio × {n} FFNs) off the sequential "
            f"path; use a ratio >= {0.5 / n:.3g}"
        )
    return fuse_ffns_(model, config.fusion_config(n), tokenizer=tokenizer, progress=progress, **inputs)


# ----- nest ---------------------------------------------------------------------------------------
@dataclass
class NestSliceConfig(NestConfig):
    """:class:`~ffnkit.compress.nest.NestConfig` plus ``ratio``: the share of every FFN's neurons cut
    after nesting (``slice_widths_(model, 1 − ratio)``).

    Example:
        >>> NestSliceConfig(ratio=0.25).to_dict()["score"]
        'wanda-sp'
    """

    ratio: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ratio = _check_ratio(self.ratio)


def nest_slice_(
    model: nn.Module,
    config: NestSliceConfig,
    *,
    tokenizer: Any = None,
    progress: bool = False,
    **inputs: Any,
) -> NestReport:
    """``nest_`` by ``config.score``, then keep the first (1 − ratio) of every FFN; the slice's report.

    Example:
        >>> nest_slice_(model, NestSliceConfig(ratio=0.25), tokenizer=tok).ffn_ratio_removed
        0.25
    """
    fields = {k: v for k, v in config.to_dict().items() if k != "ratio"}
    nest_(model, NestConfig(**fields), tokenizer=tokenizer, progress=progress, **inputs)
    return slice_widths_(model, 1.0 - config.ratio)


# ----- quantize -----------------------------------------------------------------------------------
def quantize_fitting_(
    model: nn.Module, config: QuantizeConfig, *, tokenizer: Any = None, progress: bool = False
) -> QuantizeReport:
    """``quantize_``, with one scale per output row where ``group_size`` does not divide every input
    width (e.g. a small model): the report notes the fallback. ``tokenizer``/``progress`` are unused.

    Example:
        >>> quantize_fitting_(tiny, QuantizeConfig(bits=4)).config["group_size"]   # d_ff = 48
    """
    note = None
    if not group_size_fits(model, config):
        note = (
            f"group_size {config.group_size} does not divide every FFN matrix's inputs: one scale per "
            "output row instead"
        )
        config = replace(config, group_size=None)
    report = quantize_(model, config)
    if note:
        report.notes.append(note)
    return report
