"""How long a pipeline run will take, from one quick measurement of a forward pass, said before the work.

The rule (``RULE``): a run is counted in forward passes of one calibration window (``seq_len`` tokens;
its cost measured in a batch of 4 windows, as statistics and perplexity run batched, divided by 4), and
a forward of T tokens costs ``T / seq_len`` of one (attention's quadratic part is small at
these lengths). Per step: collecting statistics is one forward per calibration window (``samples``;
none for data-free scores), Taylor scores three per gradient window (forward + backward), the
``sensitivity`` allocation ``1 + 5 · #FFNs`` forwards of each of ``sensitivity_samples`` windows (the
reference, then each layer at five ratios); perplexity is its windows; healing takes its time budget
(``max_minutes``, an upper bound). Matrix factorisations and solves are not counted, so a low-rank or
least-squares step can take longer: the estimate says so.

Example:
    >>> est = estimate_run(model, PipelineConfig(steps=[Step("best", {"ratio": 0.3})], heal={}))
    >>> est.total > 0, est.stages["heal"]
    (True, 600.0)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["RULE", "Estimate", "estimate_run", "forward_seconds"]

RULE = (
    "forwards of one calibration window × its measured seconds (a batch of 4 windows / 4); statistics: 1 per "
    "window, Taylor: 3 per window, sensitivity: 1 + 5·#FFNs per window, perplexity: its windows "
    "(scaled by length), healing: its max_minutes; factorisations and solves not counted"
)
_SENSITIVITY_RATIOS = 5  # prune's sensitivity grid: 0.5r, r, 1.5r, 2r, 2.5r
_SLOW_UNCOUNTED = ("svd", "asvd", "svd-llm", "finercut", "fuse")  # big uncounted parts: a lower bound


@dataclass
class Estimate:
    """Seconds per stage and in all, the forward it was scaled from, and how it was counted.

    Example:
        >>> est.line()
        'estimated time: about 4 min (perplexity 80 s, best 3 min), from a measured forward of 0.3 s per …'
    """

    stages: dict[str, float]
    total: float
    forward_s: float
    seq_len: int
    lower_bound: bool = False
    rule: str = RULE
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for stderr."""
        parts = ", ".join(f"{k} {_duration(v)}" for k, v in self.stages.items() if v > 0)
        bound = "at least " if self.lower_bound else "about "
        return (
            f"estimated time: {bound}{_duration(self.total)} ({parts}), from a measured forward of "
            f"{self.forward_s:.3g} s per {self.seq_len}-token window on this machine"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@torch.no_grad()
def forward_seconds(model: Any, seq_len: int = 256, repeats: int = 2, batch: int = 4) -> float:
    """Seconds per window of a forward of ``[batch, seq_len]`` random token ids (median of ``repeats``
    after a warm-up, divided by ``batch``).

    Example:
        >>> forward_seconds(model, 128) > 0
        True
    """
    from ffnkit.core.runner import device_of, evaluating, forward

    vocab = int(getattr(model.config, "vocab_size", None) or model.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (batch, seq_len), device=device_of(model))  # [B, T]
    times = []
    with evaluating(model):
        for i in range(repeats + 1):
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward(model, ids)
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first one warms up
                times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def _step_forwards(step_config: Any, method: str, n_ffns: int) -> float:
    """Forward passes (of the step's own window length) of one compression step, by ``RULE``."""
    from ffnkit.compress.score_functions import SCORES

    get = lambda name, default=0: getattr(step_config, name, default)  # noqa: E731
    score = get("method", method)
    needs = SCORES.entry(score).meta.get("needs", "stats") if score in SCORES else "stats"
    compensate = bool(get("compensate", False)) or bool(get("reconstruct", False))
    sensitivity = get("allocation", None) == "sensitivity"
    forwards = 0.0
    if needs is not None or compensate or sensitivity or score not in SCORES:
        forwards += get("samples", 0) or 0
    if needs == "grads":
        forwards += 3 * (get("taylor_samples", 0) or 0)
    if sensitivity:
        forwards += (1 + _SENSITIVITY_RATIOS * n_ffns) * (get("sensitivity_samples", 0) or 0)
    return float(forwards)


def estimate_run(model: Any, config: Any, forward_s: float | None = None) -> Estimate:
    """The time ``config`` (a :class:`~ffnkit.pipeline.PipelineConfig`) will take on ``model`` (loaded).

    ``forward_s``: the seconds of one forward of the first step's window (measured now when None).

    Example:
        >>> estimate_run(model, PipelineConfig(steps=[Step("flap", {"ratio": 0.3})])).line()
    """
    from ffnkit.core.archs import find_ffns
    from ffnkit.pipeline import step_config

    configs = [(s.method, step_config(s, config.corpus)) for s in config.steps]
    seq_len = int(next((getattr(c, "seq_len", 0) for _, c in configs if getattr(c, "seq_len", 0)), 256))
    if forward_s is None:
        forward_s = forward_seconds(model, seq_len)
    n_ffns = len(find_ffns(model))
    stages: dict[str, float] = {}
    notes: list[str] = []
    if config.evaluation is not None:
        p = config.evaluation
        tokens = p.max_tokens or 4096
        windows = max(1, math.ceil(max(tokens - p.window, 0) / (p.stride or p.window)) + 1)
        times = 3 if config.heal is not None and config.measure_before_heal else 2
        stages["perplexity"] = times * windows * forward_s * p.window / seq_len
    lower = False
    for method, cfg in configs:
        own = getattr(cfg, "seq_len", seq_len) or seq_len
        chosen = getattr(cfg, "layers", None)
        units = len(chosen) if chosen else n_ffns  # a layer subset measures only its FFNs' sensitivity
        forwards = _step_forwards(cfg, method, units)
        stages[method] = stages.get(method, 0.0) + forwards * forward_s * own / seq_len
        if method in _SLOW_UNCOUNTED or getattr(cfg, "reconstruct", False):
            lower = True
            notes.append(f"{method}: factorisations/solves not counted")
    if config.heal is not None:
        from ffnkit.pipeline import heal_config

        stages["heal"] = 60.0 * float(heal_config(config.heal, config.corpus).max_minutes)
    return Estimate(stages, sum(stages.values()), forward_s, seq_len, lower, RULE, notes)
