"""``ffnkit eval MODEL --corpus NAME``: perplexity under the documented protocol (and optional speed),
measured by the pipeline's stages (:mod:`ffnkit.pipeline`), as ``ffnkit compress`` and the benchmarks.
``--tasks`` runs lm-eval instead (:mod:`ffnkit.harness`: ``ffnkit:CORPUS`` offline, or lm-eval's tasks)."""

from __future__ import annotations

from typing import Annotated

import typer

from ffnkit.cli.common import (
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    TrustRemoteCodeOpt,
    print_json,
    print_table,
)


def eval_(
    model: ModelArg = "smollm2-135m",
    corpus: CorpusOpt = "shakespeare",
    window: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[int | None, typer.Option(help="Window stride (default: window, no overlap).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Score the last N tokens of the evaluation split.")] = 4096,
    speed: Annotated[bool, typer.Option("--speed", help="Also measure decode speed (batch 1).")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Run lm-eval tasks instead, comma-separated: ffnkit:CORPUS (offline rolling perplexity on "
            "a corpus' evaluation split: ffnkit:austen) or lm-eval task names (their data comes from the hub)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="--tasks: at most N documents per task.")] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Perplexity of MODEL on the evaluation split of a corpus (JSON has the protocol and the split)."""
    from ffnkit.evaluate import decode_speed, environment
    from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, evaluation_set, load_step, measure

    if tasks is not None:
        _harness(model, tasks, limit, device, dtype, trust_remote_code, json)
        return
    if limit is not None:
        from ffnkit.core.errors import InvalidArgumentError

        raise InvalidArgumentError("--limit applies to --tasks only")

    protocol = PerplexityProtocol(corpus, max_tokens, window, stride)  # bad values fail before the load
    net, tok = load_step(
        PipelineConfig(
            model=model, evaluation=None, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
    )
    evaluation = evaluation_set(protocol, tok)
    result = measure(net, evaluation, progress=True)
    measured = {k: v for k, v in result.protocol.items() if k not in ("corpus", "split", "max_tokens")}
    doc = {
        "model": model,
        "corpus": evaluation.corpus,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "protocol": measured,
        "split": evaluation.split,
        "parameters": result.parameters,
        "environment": environment(),
    }
    if speed:
        doc["decode_speed"] = decode_speed(net, tok)
    if json:
        print_json(doc)
        return
    row = {"model": model, "corpus": evaluation.corpus, "perplexity": result.perplexity, **measured}
    print_table("perplexity", [row], list(row))
    if speed:
        print(f"decode speed: {doc['decode_speed']['tokens_per_s']:.1f} tokens/s (batch 1)")


def _harness(
    model: str, tasks: str, limit: int | None, device: str, dtype: str, trust_remote_code: bool, json: bool
) -> None:
    """``--tasks``: lm-eval through its HFLM wrapper on the loaded (ffnkit) model."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.evaluate import environment
    from ffnkit.harness import check_harness, run_harness
    from ffnkit.pipeline import PipelineConfig, load_step

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if limit is not None and limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1, got {limit}")
    check_harness(names)  # lm-eval installed, corpora readable: before the model loads
    net, tok = load_step(
        PipelineConfig(
            model=model, evaluation=None, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
    )
    doc = {"model": model, **run_harness(net, tok, names, limit=limit), "environment": environment()}
    if json:
        print_json(doc)
        return
    rows = [
        {"task": task, "metric": metric.split(",")[0], "value": value}
        for task, metrics in doc["results"].items()
        for metric, value in metrics.items()
        if isinstance(value, int | float) and "stderr" not in metric
    ]
    print_table("lm-eval", rows, ["task", "metric", "value"])
