"""``ffnkit compress MODEL --method M --ratio R -o DIR``: compress, report, save a loadable folder.

Methods plug in through :data:`METHODS` (name → function); add one with :func:`register_method`::

    def run_svd(model, tokenizer, opts: CompressOptions) -> report: ...
    register_method("svd", run_svd, "plain SVD of FFN matrices at a parameter ratio")

A method function changes ``model`` in place and returns a report (an object with ``to_dict()`` or a
dict); the command saves the model with ``ffnkit.io.save`` and prints parameters (and perplexity)
before and after.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from ffnkit.cli.common import (
    CorpusOpt,
    JsonOpt,
    ModelArg,
    OverwriteOpt,
    TrustRemoteCodeOpt,
    print_json,
    print_table,
)


@dataclass
class CompressOptions:
    """What the command line gives every method (methods read the fields they need)."""

    method: str
    ratio: float
    allocation: str = "uniform"
    samples: int = 32
    seq_len: int = 256
    corpus: str = "shakespeare"
    seed: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodEntry:
    run: Callable[[Any, Any, CompressOptions], Any]
    help: str


def _prune_with(method: str, **fixed: Any) -> Callable[[Any, Any, CompressOptions], Any]:
    def run(model: Any, tokenizer: Any, opts: CompressOptions) -> Any:
        from ffnkit.compress.prune import PruneConfig, prune_

        settings = dict(
            method=method,
            ratio=opts.ratio,
            allocation=opts.allocation,
            samples=opts.samples,
            seq_len=opts.seq_len,
            corpus=opts.corpus,
            seed=opts.seed,
        )
        settings.update(fixed)
        return prune_(model, PruneConfig(**settings), tokenizer=tokenizer, progress=opts.progress)

    return run


def _best(model: Any, tokenizer: Any, opts: CompressOptions) -> Any:
    from ffnkit.compress.prune import BEST  # imported when it runs: `ffnkit --help` stays fast

    return _prune_with(**BEST)(model, tokenizer, opts)


METHODS: dict[str, MethodEntry] = {
    "magnitude": MethodEntry(_prune_with("magnitude"), "neuron pruning by weight norms (data-free)"),
    "wanda-sp": MethodEntry(_prune_with("wanda-sp"), "neuron pruning: mean |W_out| · ‖m‖ (Wanda-sp)"),
    "flap": MethodEntry(_prune_with("flap"), "neuron pruning: Var(m)·‖v‖², bias compensation (FLAP)"),
    "lorap": MethodEntry(_prune_with("lorap"), "neuron pruning: LoRAP's activation-weighted norms"),
    "taylor": MethodEntry(_prune_with("taylor"), "neuron pruning: first-order Taylor |W ⊙ ∂L/∂W|"),
    "frequency": MethodEntry(_prune_with("frequency"), "neuron pruning by activation frequency"),
    "best": MethodEntry(
        _best,
        "the published frontier's best: FLAP scores, per-layer sensitivity, least-squares W_out refit",
    ),
}


def _lazy(target: str) -> Callable[[Any, Any, CompressOptions], Any]:
    """A method whose module is imported only when it runs (``ffnkit --help`` stays fast)."""

    def run(model: Any, tokenizer: Any, opts: CompressOptions) -> Any:
        import importlib

        module, _, fn = target.partition(":")
        return getattr(importlib.import_module(module), fn)(model, tokenizer, opts)

    return run


METHODS.update(
    {
        "svd": MethodEntry(_lazy("ffnkit.compress.lowrank:cli_run"), "low rank: truncated SVD (data-free)"),
        "asvd": MethodEntry(
            _lazy("ffnkit.compress.lowrank:cli_run"), "low rank: activation-aware SVD (ASVD)"
        ),
        "svd-llm": MethodEntry(_lazy("ffnkit.compress.lowrank:cli_run"), "low rank: whitened SVD (SVD-LLM)"),
        "finercut": MethodEntry(
            _lazy("ffnkit.compress.sublayers:cli_finercut"),
            "remove the FFN sublayers FinerCut's greedy order picks",
        ),
        "shortgpt": MethodEntry(
            _lazy("ffnkit.compress.sublayers:cli_shortgpt"),
            "delete round(R·L) blocks of lowest block influence",
        ),
        "fuse": MethodEntry(
            _lazy("ffnkit.compress.fusion:cli_fuse"), "fuse low-dependency FFN runs into wider parallel FFNs"
        ),
        "nest": MethodEntry(
            _lazy("ffnkit.compress.nest:cli_nest"),
            "sort neurons by importance, keep the first (1-R) per layer",
        ),
        "quantize": MethodEntry(
            _lazy("ffnkit.compress.quantize:cli_run"),
            "4-bit weight-only FFN quantisation (torchao integers, packed; saves and reloads exactly)",
        ),
    }
)


def register_method(name: str, run: Callable[[Any, Any, CompressOptions], Any], help: str = "") -> None:
    """Add (or replace) a compression method of ``ffnkit compress``.

    Example:
        >>> register_method("svd", run_svd, "plain SVD of FFN matrices")
    """
    METHODS[name] = MethodEntry(run, help)


def _method(name: str) -> MethodEntry:
    from ffnkit.core.errors import InvalidArgumentError

    if name not in METHODS:
        raise InvalidArgumentError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def compress(
    model: ModelArg = "smollm2-135m",
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="best (the frontier's best), magnitude, wanda-sp, flap, lorap, taylor, frequency, svd, asvd, "
            "svd-llm, finercut, shortgpt, fuse, nest, quantize, or any "
            "registered method; an unknown name lists them all.",
        ),
    ] = "best",
    ratio: Annotated[
        float, typer.Option("--ratio", "-r", help="Share of FFN parameters removed, [0, 1).")
    ] = 0.3,
    output: Annotated[
        str, typer.Option("--output", "-o", help="Folder to save the compressed model in.")
    ] = "",
    allocation: Annotated[str, typer.Option(help="uniform, global, or sensitivity.")] = "uniform",
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    corpus: CorpusOpt = "shakespeare",
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip perplexity before/after.")] = False,
    heal: Annotated[
        bool, typer.Option("--heal", help="Then distil towards the original on calibration text (≤10 min).")
    ] = False,
    bits: Annotated[int, typer.Option(help="Bits per FFN weight (method quantize), 2-8.")] = 4,
    heal_minutes: Annotated[float, typer.Option(help="Time budget of --heal, minutes.")] = 10.0,
    heal_lr: Annotated[float, typer.Option(help="Peak learning rate of --heal.")] = 3e-4,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Compress MODEL's FFNs with METHOD at RATIO, save it to DIR, print sizes and perplexity."""
    from ffnkit.core.archs import find_ffns
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.evaluate import count_parameters, environment
    from ffnkit.folders import check_output_dir
    from ffnkit.io import save
    from ffnkit.sources.models import load_model

    entry = _method(method)
    if not output:
        raise InvalidArgumentError("give an output folder with -o DIR (the compressed model is saved there)")
    if not 0.0 <= ratio < 1.0:
        raise InvalidArgumentError(
            f"--ratio must be in [0, 1) (share of FFN parameters removed), got {ratio}"
        )
    if heal:  # bad healing options fail now, not after the compression
        from ffnkit.compress.heal import HealConfig

        HealConfig(max_minutes=heal_minutes, lr=heal_lr)
    if method == "quantize":  # like the healing options: a bad --bits fails before the model loads
        from ffnkit.compress.quantize import QuantizeConfig

        QuantizeConfig(bits=bits)
    # a bad -o (not empty, the input, the cache, read-only, no room) fails now, not after the work
    check_output_dir(output, overwrite=overwrite, model_source=model)
    net, tok = load_model(model, trust_remote_code=trust_remote_code)
    before = count_parameters(net, find_ffns(net))
    doc: dict[str, Any] = {"model": model, "method": method, "ratio": ratio, "output": output}
    tokens = None
    if not no_eval:
        from ffnkit.data import evaluation_tokens, load_corpus
        from ffnkit.evaluate import perplexity

        text = load_corpus(corpus)
        tokens = evaluation_tokens(text, tok)
        ppl_before = perplexity(net, tokens, progress=not json)
        doc["perplexity_before"] = ppl_before.perplexity
        doc["protocol"] = {**ppl_before.protocol, "corpus": text.name, "split": "evaluation"}
    start = time.perf_counter()
    opts = CompressOptions(method, ratio, allocation, samples, seq_len, corpus, progress=not json)
    opts.extra["heal"] = {"max_minutes": heal_minutes, "lr": heal_lr}
    opts.extra["bits"] = bits
    reference = copy.deepcopy(net) if heal else None  # the teacher for healing: the model before compression
    report = entry.run(net, tok, opts)
    if heal:
        from ffnkit.compress.heal import cli_heal

        doc["heal"] = cli_heal(net, reference, tok, opts).to_dict()
        del reference
    seconds = time.perf_counter() - start
    after = count_parameters(net, find_ffns(net))
    doc.update(parameters_before=before, parameters_after=after, seconds=seconds)
    if tokens is not None:
        from ffnkit.evaluate import perplexity

        doc["perplexity_after"] = perplexity(net, tokens, progress=not json).perplexity
    save(net, tok, output, report=report, overwrite=overwrite)
    doc["report"] = report.to_dict() if hasattr(report, "to_dict") else report
    doc["environment"] = environment()
    if json:
        print_json(doc)
        return
    rows = [
        {"": "parameters (total)", "before": before["total"], "after": after["total"]},
        {"": "parameters (FFN)", "before": before["ffn"], "after": after["ffn"]},
    ]
    if tokens is not None:
        rows.append({"": "perplexity", "before": doc["perplexity_before"], "after": doc["perplexity_after"]})
    print_table(f"{method} at {ratio:.0%} of FFN parameters ({seconds:.1f} s)", rows, ["", "before", "after"])
    sys.stdout.write(f"saved to {output} (load it with `ffnkit eval {output}` or ffnkit.load)\n")
