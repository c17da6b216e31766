"""The experiment pipeline: load → measure → transform step(s) → heal → measure → save → a run record.

One :class:`PipelineConfig` (JSON round trip) says what to do; :func:`run_pipeline` does it and returns a
:class:`RunRecord` (``to_dict()``): the model, the calibration corpus and the perplexity protocol, each
step's method, config and report, parameters and perplexity before and after, seconds per stage, the
environment and the command line. ``ffnkit compress`` is a thin layer over it; the benchmark scripts and
a server use the same stage functions (:func:`evaluation_set`, :func:`measure`, :func:`run_step`,
:func:`heal_step`, :func:`load_step`, :func:`save_step`) when they share work between runs (one dense measurement, statistics collected once).

Steps name a method of :data:`ffnkit.compress.registry.METHODS` and the config fields the user gives; the
method adds its fixed fields and defaults. Steps and healing inherit the pipeline's ``corpus`` (the
calibration text) unless they set their own.

Example:
    >>> config = PipelineConfig(
    ...     model="smollm2-135m",
    ...     steps=[Step("svd-llm", {"ratio": 0.3, "allocation": "global"})],
    ...     heal={"max_minutes": 5},
    ...     output="smol-svdllm-30",
    ... )
    >>> record = run_pipeline(config)
    >>> record.perplexity_before, record.perplexity_after
    (17.3, 21.9)
    >>> PipelineConfig.from_dict(json.loads(config.to_json())) == config
    True
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError

__all__ = [
    "EvaluationSet",
    "Measurement",
    "PerplexityProtocol",
    "PipelineConfig",
    "RunRecord",
    "Step",
    "StepRecord",
    "evaluation_set",
    "heal_config",
    "heal_step",
    "load_step",
    "measure",
    "run_pipeline",
    "run_step",
    "save_step",
    "step_config",
]

RECORD = "run.json"  # the run record's name inside the output folder
INHERITED = ("corpus",)  # pipeline fields that steps and healing take unless they set their own


# ----- configuration ------------------------------------------------------------------------------
@dataclass
class Step(JsonConfig):
    """One transform: a method of the registry and the config fields given for it.

    Example:
        >>> Step("flap", {"ratio": 0.3, "allocation": "global"}).to_dict()["method"]
        'flap'
    """

    method: str
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ffnkit.compress.registry import METHODS

        METHODS.entry(self.method)  # an unknown method fails here, listing the known ones
        if not isinstance(self.config, Mapping):
            raise InvalidArgumentError(
                f"step {self.method!r}: config must be a dict of fields, got {self.config!r}"
            )
        self.config = dict(self.config)


@dataclass
class PerplexityProtocol(JsonConfig):
    """How perplexity is measured: the last ``max_tokens`` tokens of a corpus' evaluation split in
    windows of ``window`` tokens (``stride`` = window: no overlap). ``corpus=None``: the pipeline's.

    Example:
        >>> PerplexityProtocol(corpus="austen").to_dict()["window"]
        512
    """

    corpus: str | None = None
    max_tokens: int | None = 4096
    window: int = 512
    stride: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 2:
            raise InvalidArgumentError(f"max_tokens must be >= 2 or None, got {self.max_tokens}")
        if self.window < 2 or (self.stride is not None and not 1 <= self.stride <= self.window):
            raise InvalidArgumentError(
                f"window must be >= 2 and stride in [1, window], got window={self.window}, stride={self.stride}"
            )


@dataclass
class PipelineConfig(JsonConfig):
    """What :func:`run_pipeline` does. JSON round trip: ``PipelineConfig.from_dict(json.loads(c.to_json()))``.

    ``heal``: None (no healing) or the :class:`~ffnkit.train.heal.HealConfig` fields given (``{}`` =
    its defaults); ``evaluation``: None skips perplexity; ``output``: the folder the model is saved in
    (with ``run.json``, the run record, and ``README.md``, its model card), None saves nothing. ``device``
    and ``dtype``: where and in what the model runs; ``save_dtype``: the saved weights' dtype.

    Example:
        >>> PipelineConfig(steps=[Step("best", {"ratio": 0.3})], heal={}, output="out").to_dict()["heal"]
        {}
    """

    model: str = "smollm2-135m"
    steps: list[Step] = field(default_factory=list)
    corpus: str = "shakespeare"  # calibration text of the steps and of healing (unless they set one)
    evaluation: PerplexityProtocol | None = field(default_factory=PerplexityProtocol)
    heal: dict[str, Any] | None = None
    output: str | None = None
    device: str | None = None  # cpu, cuda, cuda:N, auto (None: cpu)
    dtype: str = "float32"  # what the model is loaded and run in: float32, bfloat16, float16, auto
    save_dtype: str | None = None  # the saved weights' dtype (None: as run)
    measure_before_heal: bool = False  # also the perplexity after the steps, before healing
    overwrite: bool = False  # replace a non-empty ``output`` (never the input or the cache)
    trust_remote_code: bool = False  # let a model folder run its own Python code (``auto_map``)
    version: int = 1

    def __post_init__(self) -> None:
        self.steps = [s if isinstance(s, Step) else Step(**s) for s in self.steps]
        if isinstance(self.evaluation, Mapping):
            self.evaluation = PerplexityProtocol.from_dict(dict(self.evaluation))
        if self.heal is not None:
            if not isinstance(self.heal, Mapping):
                raise InvalidArgumentError(
                    f"heal must be None or a dict of HealConfig fields, got {self.heal!r}"
                )
            self.heal = dict(self.heal)
        # bad settings fail now, before a model loads
        from ffnkit.core.device import check_device, check_dtype

        self.device = check_device(self.device, "device")
        self.dtype = check_dtype(self.dtype, "dtype") or "float32"
        self.save_dtype = check_dtype(self.save_dtype, "save_dtype")
        if self.save_dtype == "auto":
            raise InvalidArgumentError(
                "save_dtype takes float32, bfloat16 or float16 (None: as run), not auto"
            )
        for step in self.steps:
            step_config(step, self.corpus)
        if self.heal is not None:
            heal_config(self.heal, self.corpus)


def step_config(step: Step, corpus: str | None = None) -> Any:
    """The config object of ``step``: the method's defaults, ``corpus`` (when the config has one and the
    step does not set it), the step's fields, then the method's fixed fields.

    Example:
        >>> step_config(Step("svd-llm", {"allocation": "global"}), "austen")
        LowRankConfig(method='svd-llm', ratio=0.3, ..., corpus='austen', ..., allocation='global', ...)
    """
    from ffnkit.compress.registry import METHODS

    method = METHODS.get(step.method)
    given = dict(step.config)
    if corpus is not None and "corpus" in method.fields():
        given.setdefault("corpus", corpus)
    return method.build(given)


def heal_config(fields: Mapping[str, Any], corpus: str | None = None) -> Any:
    """The :class:`~ffnkit.train.heal.HealConfig` of ``fields``, with ``corpus`` unless they set one.

    Example:
        >>> heal_config({"max_minutes": 5}, "austen").corpus
        'austen'
    """
    from ffnkit.train.heal import HealConfig

    given = dict(fields)
    if corpus is not None:
        given.setdefault("corpus", corpus)
    return HealConfig.from_dict(given)


# ----- stages -------------------------------------------------------------------------------------
def load_step(config: PipelineConfig) -> tuple[Any, Any]:
    """(model, tokenizer) of ``config.model`` in ``config.dtype`` on ``config.device``.

    Example:
        >>> model, tok = load_step(PipelineConfig(model="smollm2-135m", device="cuda"))
    """
    from ffnkit import load_model

    return load_model(
        config.model, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code
    )


@dataclass
class EvaluationSet:
    """The evaluation tokens [T] of a protocol, with the corpus name and its split description.

    Example:
        >>> ev = evaluation_set(PerplexityProtocol(corpus="austen"), tok)
        >>> ev.tokens.shape
        torch.Size([4096])
    """

    tokens: Any  # LongTensor [T]
    corpus: str
    split: dict[str, Any]
    protocol: PerplexityProtocol


def evaluation_set(
    protocol: PerplexityProtocol, tokenizer: Any, corpus: str = "shakespeare"
) -> EvaluationSet:
    """Tokenise the protocol's evaluation text (``corpus`` when the protocol names none).

    Example:
        >>> evaluation_set(PerplexityProtocol(max_tokens=1024), tok).tokens.numel()
        1024
    """
    from ffnkit import evaluation_tokens, load_corpus

    text = load_corpus(protocol.corpus or corpus)
    tokens = evaluation_tokens(text, tokenizer, max_tokens=protocol.max_tokens)
    return EvaluationSet(tokens, text.name, text.split_info(), protocol)


@dataclass
class Measurement:
    """Perplexity (None when not measured) and parameter counts of a model at one point of a run.

    Example:
        >>> measure(model, ev).to_dict()["parameters"]["ffn"]
    """

    perplexity: float | None
    nll: float | None
    protocol: dict[str, Any] | None
    parameters: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(model: Any, evaluation: EvaluationSet | None = None, *, progress: bool = False) -> Measurement:
    """Parameters of ``model`` and, given an evaluation set, its perplexity under that protocol.

    Example:
        >>> measure(model, evaluation_set(PerplexityProtocol(), tok)).perplexity
        17.3
    """
    from ffnkit.core.archs import find_ffns
    from ffnkit.evaluate import count_parameters, perplexity

    start = time.perf_counter()
    parameters = count_parameters(model, find_ffns(model))
    if evaluation is None:
        return Measurement(None, None, None, parameters, time.perf_counter() - start)
    p = evaluation.protocol
    result = perplexity(model, evaluation.tokens, window=p.window, stride=p.stride, progress=progress)
    protocol = {
        **result.protocol,
        "corpus": evaluation.corpus,
        "split": "evaluation",
        "max_tokens": p.max_tokens,
    }
    return Measurement(result.perplexity, result.nll, protocol, parameters, time.perf_counter() - start)


@dataclass
class StepRecord:
    """One step of a run: the method, its full config, its report and how long it took.

    Example:
        >>> run_step(model, Step("magnitude", {"ratio": 0.2})).config["method"]
        'magnitude'
    """

    method: str
    config: dict[str, Any]
    report: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_step(
    model: Any,
    step: Step,
    *,
    tokenizer: Any = None,
    corpus: str | None = None,
    progress: bool = False,
    **inputs: Any,
) -> tuple[StepRecord, Any]:
    """Run one step on ``model`` (in place): (its record, the report object).

    ``inputs`` go to the method's transform: precomputed ``calibration=`` ids, ``stats=``, ``grads=``,
    ``order=``, ``dependency=`` (what the transform accepts), so that several runs share one pass.

    Example:
        >>> record, report = run_step(model, Step("flap", {"ratio": 0.3}), calibration=ids, stats=stats)
    """
    from ffnkit.compress.registry import METHODS

    config = step_config(step, corpus)
    start = time.perf_counter()
    report = METHODS.get(step.method)(model, config, tokenizer=tokenizer, progress=progress, **inputs)
    seconds = time.perf_counter() - start
    doc = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    return StepRecord(step.method, config.to_dict(), doc, seconds), report


def heal_step(
    model: Any,
    reference: Any,
    fields: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    corpus: str | None = None,
    progress: bool = False,
    calibration: Any = None,
) -> Any:
    """Distil ``model`` towards ``reference`` with the HealConfig ``fields`` (+ ``corpus``); the report.

    Example:
        >>> heal_step(model, reference, {"max_minutes": 5}, tokenizer=tok, corpus="austen").steps
    """
    from ffnkit.train.heal import heal_

    config = heal_config(fields, corpus)
    return heal_(model, reference, config, tokenizer=tokenizer, calibration=calibration, progress=progress)


# ----- the run ------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """What a pipeline run did and measured (JSON-ready through ``to_dict``; saved as ``run.json``).

    ``seconds``: per stage (load, measure_before, steps, [measure_before_heal], heal, measure_after,
    save) and the total.

    Example:
        >>> record = run_pipeline(PipelineConfig(steps=[Step("flap", {"ratio": 0.3})]))
        >>> record.to_dict()["steps"][0]["report"]["ffn_ratio_removed"]
        0.3
    """

    model: str
    corpus: str
    protocol: dict[str, Any] | None
    steps: list[StepRecord]
    heal: dict[str, Any] | None
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    perplexity_before: float | None
    perplexity_after: float | None
    perplexity_before_heal: float | None  # with config.measure_before_heal
    seconds: dict[str, float]
    environment: dict[str, Any]
    config: dict[str, Any]
    output: str | None = None
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pipeline(
    config: PipelineConfig,
    *,
    progress: bool = True,
    on_stage: Callable[[str, dict[str, Any]], None] | None = None,
    command: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> RunRecord:
    """Run ``config``: load, measure, each step, heal, measure, save; the run record.

    ``progress``: the transforms' and perplexity's progress bars (stderr). ``on_stage(stage, info)`` is
    called as each stage ends (``info``: its seconds and what it measured), for a log or a server.
    ``model``/``tokenizer``: a model already loaded (changed in place; ``config.model`` names it).
    ``command``: the command line, recorded.

    Example:
        >>> record = run_pipeline(PipelineConfig(steps=[Step("svd-llm", {"ratio": 0.3})], output="out"))
        >>> record.parameters_after["ffn"] < record.parameters_before["ffn"]
        True
    """
    from ffnkit.evaluate import environment

    notify = on_stage or (lambda stage, info: None)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if config.output:  # a bad output folder fails now, not after the work
        from ffnkit.folders import check_output_dir

        check_output_dir(config.output, overwrite=config.overwrite, model_source=config.model)
    if model is None:
        model, tokenizer = load_step(config)
        seconds["load"] = time.perf_counter() - t0
        notify("load", {"seconds": seconds["load"]})
    for step in config.steps:  # a step that cannot apply to this model fails now, before any measuring
        check = getattr(step_config(step, config.corpus), "check_model", None)
        if check is not None:
            check(model)
    evaluation = None
    if config.evaluation is not None:
        evaluation = evaluation_set(config.evaluation, tokenizer, config.corpus)
    before = measure(model, evaluation, progress=progress)
    seconds["measure_before"] = before.seconds
    notify("measure_before", before.to_dict())
    reference = copy.deepcopy(model) if config.heal is not None else None  # the teacher: before any step
    steps: list[StepRecord] = []
    for step in config.steps:
        record, _ = run_step(model, step, tokenizer=tokenizer, corpus=config.corpus, progress=progress)
        steps.append(record)
        notify("step", {"method": record.method, "seconds": record.seconds})
    seconds["steps"] = sum(s.seconds for s in steps)
    heal_doc, before_heal = None, None
    if config.heal is not None:
        if config.measure_before_heal and evaluation is not None:
            before_heal = measure(model, evaluation, progress=progress)
            seconds["measure_before_heal"] = before_heal.seconds
            notify("measure_before_heal", before_heal.to_dict())
        start = time.perf_counter()
        report = heal_step(
            model, reference, config.heal, tokenizer=tokenizer, corpus=config.corpus, progress=progress
        )
        del reference
        heal_doc = report.to_dict()
        seconds["heal"] = time.perf_counter() - start
        notify("heal", {"seconds": seconds["heal"], "steps": report.steps})
    after = measure(model, evaluation, progress=progress)
    seconds["measure_after"] = after.seconds
    notify("measure_after", after.to_dict())
    record = RunRecord(
        model=config.model,
        corpus=config.corpus,
        protocol=before.protocol,
        steps=steps,
        heal=heal_doc,
        parameters_before=before.parameters,
        parameters_after=after.parameters,
        perplexity_before=before.perplexity,
        perplexity_after=after.perplexity,
        perplexity_before_heal=before_heal.perplexity if before_heal else None,
        seconds=seconds,
        environment=environment(),
        config=config.to_dict(),
        output=config.output,
        command=command,
    )
    if config.output:
        start = time.perf_counter()
        reports = [s.report for s in steps] + ([heal_doc] if heal_doc else [])
        if config.save_dtype is not None:  # after every measurement: they are of the model as run
            from ffnkit.core.device import resolve_dtype

            model = model.to(dtype=resolve_dtype(config.save_dtype))
        save_step(model, tokenizer, config.output, reports, overwrite=config.overwrite)
        seconds["save"] = time.perf_counter() - start
        notify("save", {"seconds": seconds["save"], "output": config.output})
    seconds["total"] = time.perf_counter() - t0
    if config.output:
        from ffnkit.card import write_model_card

        (Path(config.output) / RECORD).write_text(json.dumps(record.to_dict(), indent=2, default=str) + "\n")
        write_model_card(config.output, record.to_dict())  # README.md: what was done and measured
    return record


def save_step(
    model: Any,
    tokenizer: Any,
    output: str | Path,
    reports: list[dict[str, Any]] = (),
    *,
    overwrite: bool = False,
) -> Path:
    """``ffnkit.save`` into ``output``, with ``reports`` (each step's, the healing's) among the saved
    reports (transforms that record their own report on the model are not repeated).

    Example:
        >>> save_step(model, tok, "out", [record.report for record in steps])
    """
    from ffnkit.io import save

    saved = list(getattr(model, "ffnkit_reports", []) or [])
    saved += [doc for doc in reports if doc not in saved]
    model.ffnkit_reports = saved
    return save(model, tokenizer, output, overwrite=overwrite)
