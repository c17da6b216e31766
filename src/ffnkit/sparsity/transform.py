"""``sparsify_(model, SparsityConfig(rule, sparsity))``: activation sparsity in place, measured and saveable.

Each chosen FFN container becomes a :class:`~ffnkit.modules.sparse_ffn.SparseFFN` whose thresholds the
rule calibrated on calibration text (:mod:`ffnkit.sparsity.rules`, :mod:`ffnkit.sparsity.predictor`). The
swap goes through one :class:`~ffnkit.core.transaction.Transaction` and is recorded (kind
``ffn_sparsity``), so ``ffnkit.save`` / ``ffnkit.load`` rebuild the modules and the saved thresholds
reproduce the logits exactly. :func:`measure_sparsity` reports, per layer and site, the share of zeroed
activations and the share of FFN weight bytes a batch-1 decode step does not read, on any text.

Example:
    >>> result = sparsify_(model, SparsityConfig("best", sparsity=0.4), tokenizer=tok)
    >>> round(result.measured["bytes_skipped"], 2)   # on held-out text
    0.4
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.config import Result
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.transaction import Transaction
from ffnkit.modules.sparse_ffn import CHANGE_KIND, SparseFFN
from ffnkit.sparsity.calibrate import Calibration, LayerPlan, build_sparse, bytes_skipped
from ffnkit.sparsity.config import RULES, SparsityConfig
from ffnkit.sparsity.predictor import predictor_overhead

__all__ = [
    "count_sparsity",
    "SparsityMeasurement",
    "SparsityResult",
    "measure_sparsity",
    "replay_sparsity",
    "sparsify_",
]


@dataclass
class SparsityMeasurement(Result):
    """Measured sparsity on some text: per layer and site, and the byte-weighted means.

    ``layers``: rows ``{"index", "name", "mode", "zeroed": {"in": share, "post": share}, "bytes_skipped"}``;
    ``zeroed``: the mean shares per site; ``bytes_skipped``: the share of FFN weight bytes a batch-1 decode
    step does not read, averaged over tokens and weighted by each FFN's bytes.

    Example:
        >>> measure_sparsity(model, ids).bytes_skipped
    """

    tokens: int
    bytes_skipped: float
    zeroed: dict[str, float]
    layers: list[dict[str, Any]]


@dataclass
class SparsityResult(Result):
    """What ``sparsify_`` did: the config, per-layer thresholds and calibration sparsity, and (when held-out
    text was given or drawn) the measured sparsity there.

    Example:
        >>> sparsify_(model, SparsityConfig("teal", 0.4), tokenizer=tok).to_dict()["target"]
        0.4
    """

    transform: str
    rule: str
    target: float
    config: dict[str, Any]
    calibration: dict[str, Any]
    layers: list[dict[str, Any]]
    measured: dict[str, Any] | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    heal: dict[str, Any] | None = None  # the heal report when config.heal_minutes > 0 (weights changed)


def _sparse_modules(model: nn.Module) -> list[tuple[int, Any, SparseFFN]]:
    return [(f.index, f, f.module) for f in find_ffns(model) if isinstance(f.module, SparseFFN)]


@contextlib.contextmanager
def count_sparsity(model: nn.Module) -> Iterator[Callable[[], SparsityMeasurement]]:
    """Count what the selectors zero while the block runs; the yielded function gives the measurement.

    Example:
        >>> with count_sparsity(model) as result:
        ...     perplexity(model, tokens)
        >>> result().bytes_skipped
    """
    mods = _sparse_modules(model)
    if not mods:
        raise InvalidArgumentError("the model has no sparse FFN: run sparsify_ first")
    counters = [{} for _ in mods]  # kept after the block: the result can be read there
    for (_, _, m), c in zip(mods, counters, strict=True):
        m.counter = c
    try:
        yield lambda: _measurement(mods, counters)
    finally:
        for _, _, m in mods:
            m.counter = None


def _measurement(mods: list[tuple[int, Any, SparseFFN]], counters: list[dict]) -> SparsityMeasurement:
    rows, weighted, total, tokens = [], 0.0, 0.0, 0
    sums: dict[str, float] = {}
    for (index, ffn, m), c in zip(mods, counters, strict=True):
        sites = ("in", "post") if m.mode == "input" else ("post",)
        zeroed = {
            s: c.get(f"{s}_zeroed", 0.0) / c[f"{s}_total"] if c.get(f"{s}_total") else 0.0 for s in sites
        }
        tokens = max(tokens, int(c.get("post_total", 0.0)) // m.d_ff)
        over = predictor_overhead(m.d_model, m.d_ff, m.rank, m.spec.gated) if m.mode == "predictor" else 0.0
        skipped = bytes_skipped(m.mode, m.spec.gated, zeroed.get("in", 0.0), zeroed["post"], over)
        if m.mode == "predictor" and zeroed["post"] == 0.0:
            skipped = 0.0  # predictor off: nothing read for it either
        size = (3 if m.spec.gated else 2) * m.d_model * m.d_ff
        weighted += skipped * size
        total += size
        for s, v in zeroed.items():
            sums[s] = sums.get(s, 0.0) + v
        rows.append(
            {"index": index, "name": ffn.name, "mode": m.mode, "zeroed": zeroed, "bytes_skipped": skipped}
        )
    counts = {s: sum(1 for r in rows if s in r["zeroed"]) for s in sums}
    return SparsityMeasurement(
        tokens=tokens,
        bytes_skipped=weighted / total,
        zeroed={s: v / counts[s] for s, v in sums.items()},
        layers=rows,
    )


def measure_sparsity(model: nn.Module, ids: Tensor, *, batch_size: int = 4) -> SparsityMeasurement:
    """Run ``ids`` [n, T] through a sparsified model and count what the selectors zeroed.

    Example:
        >>> m = measure_sparsity(model, heldout_ids)
        >>> m.layers[0]["zeroed"]["post"], m.bytes_skipped
    """
    ids = torch.as_tensor(ids).long()
    ids = ids[None] if ids.dim() == 1 else ids
    device = next(model.parameters()).device
    with count_sparsity(model) as result, torch.no_grad():
        for b in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[b : b + batch_size].to(device))
        return result()


def _heldout(config: SparsityConfig, tokenizer: Any) -> Tensor:
    """Windows of the evaluation split of ``config.corpus`` (text the calibration never saw)."""
    from ffnkit.data import evaluation_tokens, load_corpus

    tokens = evaluation_tokens(
        load_corpus(config.corpus, progress=False), tokenizer, max_tokens=2048, progress=False
    )
    n = max(tokens.numel() // config.seq_len, 1)
    return tokens[: n * config.seq_len].reshape(n, -1)[:8]


def sparsify_(
    model: nn.Module,
    config: SparsityConfig,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    heldout: Tensor | None = None,
    stats: Calibration | None = None,
    progress: bool = False,
) -> SparsityResult:
    """Calibrate ``config.rule`` to skip ``config.sparsity`` of FFN weight bytes and swap in sparse FFNs.

    ``calibration``: token ids [n, T] (default: ``config.samples`` windows of ``config.corpus`` through
    ``tokenizer``). ``heldout``: ids on which the result is measured (default, with a tokenizer: the
    corpus' evaluation split; without either nothing is measured). ``stats``: a :class:`Calibration` of this
    model from an earlier call, reused (inputs, error paths, probes). In place and atomic; returns a
    :class:`SparsityResult`.

    Example:
        >>> result = sparsify_(model, SparsityConfig("best", 0.4), tokenizer=tok)
        >>> ffnkit.save(model, tok, "out/sparse40", report=result)
    """
    from ffnkit.data import calibration_ids

    start = time.perf_counter()
    if not isinstance(config, SparsityConfig):
        raise InvalidArgumentError(f"sparsify_ takes a SparsityConfig, got {type(config).__name__}")
    all_ffns = find_ffns(model)
    ffns = select_ffns(all_ffns, config.layers)
    for f in ffns:
        if isinstance(f.module, SparseFFN):
            raise InvalidArgumentError(
                f"{f.name} is already sparse: sparsify the dense model (load it again) instead of twice"
            )
        if config.needs_gate and f.kind != "gated":
            raise InvalidArgumentError(
                f"rule {config.rule!r} thresholds the gate, and {f.name} ({f.family}) has none: use rule "
                "teal, best, stat-topk or predictor"
            )
    if stats is None:
        for f in ffns:
            build_sparse(f, config.mode)  # refuses unsupported FFNs before any work
        ids = calibration_ids(config, calibration, tokenizer, what=f"sparsity rule {config.rule!r}")
        stats = Calibration.collect(model, ffns, ids, config.tokens, seed=config.seed)
    plans: list[LayerPlan] = RULES.get(config.rule)(stats, config)
    heal = None
    reference = None
    if config.heal_minutes > 0 and config.sparsity > 0:
        if tokenizer is None and calibration is None:
            raise InvalidArgumentError("heal_minutes > 0 needs a tokenizer or calibration ids for the heal")
        reference = copy.deepcopy(model)  # the dense teacher; also the undo if anything below fails
        try:
            heal = _heal(model, reference, ffns, config, plans, stats.ids, tokenizer, progress)
            ffns = select_ffns(find_ffns(model), config.layers)
            stats = Calibration.collect(model, ffns, stats.ids, config.tokens, seed=config.seed)
            plans = RULES.get(config.rule)(stats, config)  # thresholds of the healed weights
        except BaseException:
            _undo(model, reference, ffns)
            raise
    by_index = {p.index: p for p in plans}
    refit_rows: dict[int, dict[str, float]] = {}
    if config.refit and config.sparsity > 0:
        if reference is None:  # the undo if the refit or the swap below fails
            reference = {f.index: _out_weights(f) for f in ffns}
        try:
            refit_rows = _refit(ffns, by_index, stats, config, progress)
        except BaseException:
            _undo(model, reference, ffns)
            raise
    swaps = []
    for f in ffns:
        swaps.append((f, _planned_module(f, config, by_index[f.index])))
    record = {"kind": CHANGE_KIND, "rule": config.rule, "modules": [m.to_record(f.name) for f, m in swaps]}
    if heal is not None:  # the FFN weights were trained: say so in the saved model's record
        record["heal"] = {k: heal[k] for k in ("steps", "seconds", "stopped_by", "tokens_seen")}
    if refit_rows:  # W_out was refitted: the saved record says so
        record["refit"] = {
            "ridge": config.refit_ridge,
            "tokens": max(r["tokens"] for r in refit_rows.values()),
        }
    try:
        with Transaction(model) as tx:
            for f, module in swaps:
                tx.replace(f.name, module)
            tx.record(record)
    except BaseException:
        if reference is not None:
            _undo(model, reference, ffns)
        raise
    del reference
    sizes = {f.index: (3 if f.kind == "gated" else 2) * f.d_model * f.d_ff for f in ffns}
    calib_bytes = sum(by_index[i].bytes_skipped * s for i, s in sizes.items()) / sum(sizes.values())
    rows = [{"name": f.name, **by_index[f.index].row()} for f in ffns]
    for row, f in zip(rows, ffns, strict=True):
        if f.index in refit_rows:
            row["refit"] = refit_rows[f.index]
    measured = None
    if heldout is None and tokenizer is not None:
        heldout = _heldout(config, tokenizer)
    if heldout is not None:
        measured = measure_sparsity(model, heldout).to_dict()
    notes = []
    if measured is not None and abs(measured["bytes_skipped"] - config.sparsity) > 0.02:
        notes.append(
            f"held-out text skips {measured['bytes_skipped']:.1%} of FFN weight bytes against the target "
            f"{config.sparsity:.1%} (calibration: {calib_bytes:.1%})"
        )
    return SparsityResult(
        transform="sparsify",
        rule=config.rule,
        target=config.sparsity,
        config=config.to_dict(),
        calibration={"bytes_skipped": calib_bytes, "tokens": int(stats.inputs[ffns[0].index].shape[0])},
        layers=rows,
        measured=measured,
        seconds=time.perf_counter() - start,
        notes=notes,
        heal=heal,
    )


def _planned_module(f: Any, config: SparsityConfig, plan: LayerPlan) -> SparseFFN:
    """The SparseFFN of ``f`` in the rule's mode with ``plan``'s thresholds (not yet in the model)."""
    rank = min(config.predictor_rank, f.d_model, f.d_ff) if config.mode == "predictor" else 0
    module = build_sparse(f, config.mode, rank=rank)
    plan.apply(module)
    return module


def _out_weights(f: Any) -> tuple[Tensor, Tensor | None]:
    """Copies of ``f``'s W_out and b_out: all the refit changes."""
    return f.W_out.detach().clone(), None if f.b_out is None else f.b_out.detach().clone()


def _undo(model: nn.Module, reference: nn.Module | dict, ffns: list[Any]) -> None:
    """Put back the weights before heal (the dense model copy) or refit (the saved W_out / b_out)."""
    if isinstance(reference, nn.Module):
        model.load_state_dict(reference.state_dict())
        return
    with torch.no_grad():
        for f in ffns:
            w, b = reference[f.index]
            f.W_out.copy_(w)
            if b is not None:
                f.b_out.copy_(b)


def _refit(
    ffns: list[Any], plans: dict[int, LayerPlan], stats: Calibration, config: SparsityConfig, progress: bool
) -> dict[int, dict[str, float]]:
    """W_out refit of every chosen FFN for its plan's masks, on the calibration inputs (:mod:`.refit`)."""
    from ffnkit.core.progress import track
    from ffnkit.sparsity.refit import refit_out_

    rows = {}
    for f in track(ffns, progress, "refitting W_out", unit="layer"):
        module = _planned_module(f, config, plans[f.index])
        rows[f.index] = refit_out_(module, f, stats.inputs[f.index], config.refit_ridge)
    return rows


def _heal(
    model: nn.Module,
    reference: nn.Module,
    ffns: list[Any],
    config: SparsityConfig,
    plans: list[LayerPlan],
    ids: Tensor,
    tokenizer: Any,
    progress: bool,
) -> dict[str, Any]:
    """Distil ``model`` to ``reference`` (dense) with sparse FFNs of ``plans`` in the loop; in place.

    The masks are recomputed every step from the fixed thresholds; gradients reach the weights through the
    kept entries only (``torch.where``: straight-through for what stays). Trains the FFN weights on
    ``config.heal_samples`` windows of ``config.corpus`` (with a tokenizer), else on the calibration ``ids``.
    """
    from ffnkit.sparsity.calibrate import installed
    from ffnkit.train.heal import HealConfig, heal_

    by_index = {p.index: p for p in plans}
    pairs = []
    for f in ffns:
        pairs.append((f, _planned_module(f, config, by_index[f.index])))
    heal_config = HealConfig(
        steps=config.heal_steps,
        lr=config.heal_lr,
        max_minutes=float(config.heal_minutes),
        samples=config.heal_samples if tokenizer is not None else int(ids.shape[0]),
        seq_len=config.seq_len if tokenizer is not None else int(ids.shape[1]),
        corpus=config.corpus,
        seed=config.seed,
    )
    with installed(model, pairs):
        given = None if tokenizer is not None else ids
        report = heal_(
            model, reference, heal_config, calibration=given, tokenizer=tokenizer, progress=progress
        )
    return report.to_dict()


def replay_sparsity(model: nn.Module, change: dict) -> None:
    """Rebuild the sparse FFNs of an ``ffn_sparsity`` change in a freshly built model (placeholder
    thresholds; the saved state dict fills them).

    Example:
        >>> replay_sparsity(fresh_model, model.config.ffnkit["changes"][-1])
    """
    for rec in change.get("modules", []):
        SparseFFN.replay(model, rec)
