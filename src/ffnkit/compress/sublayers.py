"""Sublayer and block removal for real: FinerCut's greedy order, ShortGPT's block influence.

The scores come from :mod:`ffnkit.inspect.importance` (FinerCut's JS divergence with zeroing hooks,
ShortGPT's BI) and :mod:`ffnkit.compress.sublayer_order` (FinerCut's greedy order); the structural
change lives in :mod:`ffnkit.compress.sublayer_removal`: a removed FFN or attention sublayer becomes a
parameter-free ``ZeroFFN`` / ``ZeroAttention`` (:mod:`ffnkit.modules.zero`), a removed block (ShortGPT) leaves the
ModuleList and the later blocks are renumbered. This module holds the config, the report, the
transform ``remove_sublayers_`` and the CLI methods; the other modules' public names import from here.

What ``ratio`` means (the CLI's R is the share of FFN parameters removed):

- FinerCut, ``kind="ffn"`` or ``"all"``: the greedy order runs until round(ratio × #FFNs) FFN sublayers
  are removed; with ``"all"`` the attention sublayers that come earlier in the order go as well (extra
  savings outside the FFNs). With equal widths, #FFN sublayers removed / #FFNs = FFN parameters removed.
- FinerCut, ``kind="attn"``: round(ratio × #attention sublayers) attention sublayers.
- ShortGPT: round(ratio × #blocks) blocks (``kind="all"``), or the FFN / attention sublayers of the
  round(ratio × #blocks) lowest-BI blocks (``kind="ffn"`` / ``"attn"``).

``count`` instead gives the number of removed candidates directly; ``method="manual"`` removes the
names in ``remove`` (``"layers.3.attn"``, ``"layers.5.ffn"``, ``"layers.7"`` for a whole block).

Saved models replay the change (``ffnkit.io`` kinds ``sublayers_removed`` and ``blocks_removed``).

Example:
    >>> report = remove_sublayers_(model, SublayerConfig("finercut", ratio=0.2, kind="ffn"), tokenizer=tok)
    >>> [r["name"] for r in report.removed][:3], report.parameters_after["ffn"]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from ffnkit.compress.sublayer_order import finercut_order
from ffnkit.compress.sublayer_removal import (
    BLOCKS_KIND,
    SUBLAYERS_KIND,
    apply_sublayer_removal_,
    check_block_deletion,
    delete_blocks_,
    removed_sublayers,
    replay_blocks,
    replay_sublayers,
)
from ffnkit.core.blocks import block_modules, blocks, num_blocks, parameter_count
from ffnkit.core.config import JsonConfig, Result, as_dict
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError

__all__ = [
    "BLOCKS_KIND",
    "SUBLAYERS_KIND",
    "SublayerConfig",
    "SublayerReport",
    "apply_sublayer_removal_",
    "delete_blocks_",
    "finercut_order",
    "remove_sublayers_",
    "removed_sublayers",
    "replay_blocks",
    "replay_sublayers",
]

METHODS = ("finercut", "shortgpt", "manual")
KINDS = ("all", "attn", "ffn")


# ----- config and report --------------------------------------------------------------------------
@dataclass
class SublayerConfig(JsonConfig):
    """Which sublayers or blocks to remove (see the module docstring for ``ratio``).

    Example:
        >>> SublayerConfig("shortgpt", ratio=0.2).to_dict()["kind"]
        'all'
    """

    method: str = "finercut"
    ratio: float | None = None  # share of FFN parameters (FFN sublayers / blocks) removed, [0, 1)
    count: int | None = None  # or: the number of candidates removed
    kind: str = "all"  # "all" | "attn" | "ffn"
    remove: list[str] | None = None  # method "manual": ["layers.3.attn", "layers.5.ffn", "layers.7"]
    samples: int = 8  # calibration windows (FinerCut is O(L²) forwards: keep it small)
    seq_len: int = 128
    batch_size: int = 4
    corpus: str = "shakespeare"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.method == "manual":
            if not self.remove:
                raise InvalidArgumentError(
                    "method 'manual' needs remove=[...] names like 'layers.3.attn', 'layers.5.ffn', 'layers.7'"
                )
        elif (self.ratio is None) == (self.count is None):
            raise InvalidArgumentError(
                f"give exactly one of ratio (share of FFN parameters removed) or count for {self.method!r}"
            )
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
                raise InvalidArgumentError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
            if not 0.0 <= float(self.ratio) < 1.0:
                raise InvalidArgumentError(f"ratio must be in [0, 1), got {self.ratio}")
            self.ratio = float(self.ratio)
        if self.count is not None and (
            isinstance(self.count, bool) or int(self.count) != self.count or self.count < 0
        ):
            raise InvalidArgumentError(f"count must be an integer >= 0, got {self.count!r}")
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise InvalidArgumentError("samples and batch_size must be >= 1 and seq_len >= 2")


@dataclass
class SublayerReport:
    """What ``remove_sublayers_`` removed (JSON-ready through ``to_dict``)."""

    transform: str
    method: str
    config: dict[str, Any]
    removed: list[dict[str, Any]]  # name, kind, layer (original numbering), score, parameters
    scores: dict[str, Any] | None  # the FinerCut order / ShortGPT BI per block
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    ffn_ratio_removed: float
    num_layers_before: int
    num_layers_after: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _calibration(config: SublayerConfig, calibration: Tensor | None, tokenizer: Any) -> Tensor:
    from ffnkit.data import calibration_ids

    return calibration_ids(config, calibration, tokenizer, what=f"method {config.method!r}")


def _parse_manual(names: list[str], n_blocks: int) -> tuple[list[tuple[int, str]], list[int]]:
    items, blocks = [], []
    for name in names:
        parts = str(name).split(".")
        ok = len(parts) in (2, 3) and parts[0] == "layers" and parts[1].lstrip("-").isdigit()
        if not ok or (len(parts) == 3 and parts[2] not in ("attn", "ffn")):
            raise InvalidArgumentError(
                f"cannot read {name!r}: use 'layers.<i>.attn', 'layers.<i>.ffn' or 'layers.<i>' (a block)"
            )
        i = int(parts[1])
        if not 0 <= i < n_blocks:
            raise LayerIndexError(
                f"layer {i} is out of range: this model has {n_blocks} blocks (0–{n_blocks - 1})"
            )
        if len(parts) == 2:
            blocks.append(i)
        else:
            items.append((i, parts[2]))
    if len(set(items)) != len(items) or len(set(blocks)) != len(blocks):
        raise InvalidArgumentError("a sublayer or block is named twice in remove=[...]")
    return items, blocks


def _how_many(config: SublayerConfig, n: int, what: str) -> int:
    k = round(config.ratio * n) if config.ratio is not None else int(config.count)
    if k > n:
        raise InvalidArgumentError(f"count {k} is more than the {n} {what} of this model")
    return k


# ----- the transform ------------------------------------------------------------------------------
def remove_sublayers_(
    model: nn.Module,
    config: SublayerConfig,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    order: dict[str, Any] | Result | None = None,
    progress: bool = False,
) -> SublayerReport:
    """Remove attention / FFN sublayers or whole blocks for real (parameters drop); atomic.

    ``order``: a precomputed :func:`finercut_order` or ``block_influence`` result on this unmodified
    model, to apply several ratios without rescoring (FinerCut's greedy order is nested: the first
    k steps of a longer run are the run of k steps).

    Example:
        >>> rep = remove_sublayers_(model, SublayerConfig("shortgpt", ratio=0.2), tokenizer=tok)
        >>> rep.num_layers_after, rep.parameters_after["total"] < rep.parameters_before["total"]
    """
    from ffnkit.core.archs import find_ffns
    from ffnkit.evaluate import count_parameters

    start = time.perf_counter()
    before = count_parameters(model, find_ffns(model))
    n_blocks = num_blocks(model)
    n_ffn = len(blocks(model))
    scores: dict[str, Any] | None = None
    items: list[tuple[int, str]] = []
    drop_blocks: list[int] = []
    notes: list[str] = []
    score_of: dict[tuple[int, str], float] = {}
    if config.method == "manual":
        items, drop_blocks = _parse_manual(list(config.remove or []), n_blocks)
    elif config.method == "finercut":
        if config.kind == "attn":
            k, target = _how_many(config, n_ffn, "attention sublayers"), None
        elif config.ratio is not None:
            k, target = None, round(config.ratio * n_ffn)
        else:
            k, target = _how_many(config, n_ffn * (2 if config.kind == "all" else 1), "sublayers"), None
        if target is not None and target >= n_ffn:
            raise InvalidArgumentError(f"ratio {config.ratio} would remove every FFN; use a smaller ratio")
        if k == 0 or target == 0:
            scores = {"method": "finercut", "order": []}
        else:
            if order is None:
                ids = _calibration(config, calibration, tokenizer)
                order = finercut_order(
                    model,
                    ids,
                    kind=config.kind,
                    ffn_target=target,
                    steps=k,
                    batch_size=config.batch_size,
                    progress=progress,
                )
            rows = [r for r in order["order"] if config.kind == "all" or r["kind"] == config.kind]
            chosen, n_f = [], 0
            for r in rows:
                if k is not None and len(chosen) >= k:
                    break
                if target is not None and n_f >= target:
                    break
                chosen.append(r)
                n_f += r["kind"] == "ffn"
            if (k is not None and len(chosen) < k) or (target is not None and n_f < target):
                raise InvalidArgumentError("the given FinerCut order is too short for this ratio/count")
            items = [(int(r["layer"]), r["kind"]) for r in chosen]
            score_of = {(int(r["layer"]), r["kind"]): float(r["js"]) for r in chosen}
            scores = {**order, "order": rows}
    else:  # shortgpt
        k = _how_many(config, n_blocks, "blocks")
        if config.kind in ("all", "ffn") and k >= n_ffn:
            raise InvalidArgumentError(f"ratio/count would remove all {n_ffn} blocks; use a smaller one")
        if order is None:
            from ffnkit.inspect.importance import block_influence

            order = (
                block_influence(
                    model, _calibration(config, calibration, tokenizer), batch_size=config.batch_size
                )
                if k > 0
                else {"method": "shortgpt", "layers": [], "ranking": []}
            )
        scores = order = as_dict(order)  # a BlockInfluence result, or its dict read back from JSON
        lowest = [int(i) for i in order["ranking"][:k]]
        bi = {int(r["layer"]): float(r["bi"]) for r in order.get("layers", [])}
        if config.kind == "all":
            drop_blocks = lowest
            score_of = {(i, "block"): bi.get(i, float("nan")) for i in lowest}
        else:
            items = [(i, config.kind) for i in lowest]
            score_of = {(i, config.kind): bi.get(i, float("nan")) for i in lowest}
        notes.append("BI = block influence of the whole block (ShortGPT); lowest first")
    if drop_blocks:
        check_block_deletion(model, drop_blocks)  # fail before the sublayers change
    removed = apply_sublayer_removal_(model, items)
    for r in removed:
        r["name"] = f"layers.{r['layer']}.{r['kind']}"
        r["score"] = score_of.get((r["layer"], r["kind"]))
    if drop_blocks:
        block_params = {i: parameter_count(block_modules(model)[i]) for i in drop_blocks}
        delete_blocks_(model, drop_blocks)
        removed += [
            {
                "name": f"layers.{i}",
                "kind": "block",
                "layer": i,
                "parameters": block_params[i],
                "score": score_of.get((i, "block")),
            }
            for i in sorted(drop_blocks)
        ]
    after = count_parameters(model, find_ffns(model))
    report = SublayerReport(
        transform="remove_sublayers",
        method=config.method,
        config=config.to_dict(),
        removed=removed,
        scores=scores,
        parameters_before=before,
        parameters_after=after,
        ffn_ratio_removed=1 - after["ffn"] / before["ffn"] if before["ffn"] else 0.0,
        num_layers_before=n_blocks,
        num_layers_after=num_blocks(model),
        seconds=time.perf_counter() - start,
        notes=notes,
    )
    model.ffnkit_reports = [*list(getattr(model, "ffnkit_reports", []) or []), report.to_dict()]
    return report
