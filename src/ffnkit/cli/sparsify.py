"""``ffnkit sparsify MODEL --rule R --sparsity S -o DIR``: calibrate activation sparsity, measure, save.

A thin layer over :func:`ffnkit.sparsity.sparsify_`: every option maps 1:1 onto a field of
:class:`~ffnkit.sparsity.SparsityConfig`, and every option is checked (and the output folder refused when
it must not be written) before the model loads. The saved folder loads with ``ffnkit.load`` and runs with
``ffnkit eval DIR``.
"""

from __future__ import annotations

import shlex
import sys
import time
from typing import Annotated

import typer

from ffnkit.cli.common import (
    REFIT_RIDGE_HELP,
    ConfigOpt,
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    OverwriteOpt,
    TrustRemoteCodeOpt,
    print_json,
    print_table,
    refit_flag,
)


def _rule_help() -> str:
    from ffnkit.sparsity.config import RULES

    return f"One of: {', '.join(RULES)}."


def sparsify(
    ctx: typer.Context,
    model: ModelArg = "smollm2-135m",
    rule: Annotated[str, typer.Option("--rule", help=_rule_help())] = "best",
    sparsity: Annotated[
        float, typer.Option("--sparsity", "-s", help="Share of FFN weight bytes a decode step skips, [0, 1).")
    ] = 0.4,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to save the sparse model in.")] = "",
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    corpus: CorpusOpt = "shakespeare",
    heal_minutes: Annotated[
        float,
        typer.Option(
            help="best+heal: minutes of distillation to the dense model with the sparsity in the loop "
            "(changes FFN weights; 0 = off)."
        ),
    ] = 0.0,
    refit: Annotated[
        bool | None,
        refit_flag(
            "each FFN's W_out for the masks, shrunk towards the dense W_out (changes FFN weights; default: "
            "on for best, off for the published rules)"
        ),
    ] = None,
    refit_ridge: Annotated[float, typer.Option(help=REFIT_RIDGE_HELP)] = 3.0,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip perplexity before/after.")] = False,
    config_file: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Sparsify MODEL's FFN activations with RULE to skip SPARSITY of FFN weight bytes; save to DIR."""
    from dataclasses import fields as dataclass_fields

    from ffnkit.cli.recipe import apply_recipe, given_on_command_line
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.folders import check_output_dir
    from ffnkit.sparsity.config import SparsityConfig

    given = dict(
        rule=rule,
        sparsity=sparsity,
        samples=samples,
        seq_len=seq_len,
        corpus=corpus,
        heal_minutes=heal_minutes,
        refit=refit,
        refit_ridge=refit_ridge,
    )
    valid = [f.name for f in dataclass_fields(SparsityConfig) if f.name != "version"]
    # every SparsityConfig field can come from a --config recipe; options typed here override it
    config = SparsityConfig(**apply_recipe(config_file, given, valid, given_on_command_line(ctx)))
    if not output:
        raise InvalidArgumentError("give an output folder with -o DIR (the sparse model is saved there)")
    check_output_dir(output, overwrite=overwrite, model_source=model)
    command = "ffnkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    doc = run_sparsify(
        model,
        config,
        output,
        evaluate=not no_eval,
        overwrite=overwrite,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        progress=True,
        command=command,
    )
    if json:
        print_json(doc)
        return
    measured = doc["result"]["measured"] or {}
    rows = [
        {"": "FFN weight bytes skipped (held-out)", "value": measured.get("bytes_skipped")},
        {
            "": "zeroed activations (held-out)",
            "value": ", ".join(
                f"{site} {share:.1%}" for site, share in (measured.get("zeroed") or {}).items()
            ),
        },
    ]
    refits = [r["refit"] for r in doc["result"]["layers"] if "refit" in r]
    if refits:
        before, after = (sum(r[k] for r in refits) / len(refits) for k in ("error_before", "error_after"))
        rows.append(
            {
                "": "FFN output error, mean (before → after W_out refit)",
                "value": f"{before:.4f} → {after:.4f}",
            }
        )
    if doc["perplexity_before"] is not None:
        rows += [
            {"": "perplexity before", "value": doc["perplexity_before"]},
            {"": "perplexity after", "value": doc["perplexity_after"]},
        ]
    print_table(f"{rule} at {sparsity:.0%} of FFN weight bytes ({doc['seconds']:.1f} s)", rows, ["", "value"])
    sys.stdout.write(f"saved to {output} (run it with `ffnkit eval {output}` or ffnkit.load)\n")


def run_sparsify(
    model: str,
    config: object,
    output: str,
    *,
    evaluate: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict:
    """Load ``model``, sparsify it with ``config``, measure perplexity before/after, save to ``output``.

    Example:
        >>> doc = run_sparsify("smollm2-135m", SparsityConfig("teal", 0.4), "out/teal40")
    """
    from ffnkit.io import save
    from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, evaluation_set, load_step, measure
    from ffnkit.sparsity import sparsify_

    start = time.perf_counter()
    log = (lambda msg: sys.stderr.write(msg + "\n")) if progress else (lambda msg: None)
    net, tok = load_step(
        PipelineConfig(model=model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    )
    evaluation = evaluation_set(PerplexityProtocol(), tok, corpus=config.corpus) if evaluate else None
    m_before = measure(net, evaluation)
    log(f"calibrating {config.rule} to skip {config.sparsity:.0%} of FFN weight bytes")
    t_step = time.perf_counter()
    result = sparsify_(net, config, tokenizer=tok)
    t_step = time.perf_counter() - t_step
    m_after = measure(net, evaluation)
    before, after = m_before.perplexity, m_after.perplexity
    save(net, tok, output, report=result, overwrite=overwrite)
    _write_record_and_card(
        output,
        {
            "title": f"{config.rule} activation sparsity, {config.sparsity:.0%} of FFN weight bytes skipped",
            "model": model,
            "output": output,
            "command": command,
            "config": {"device": device, "dtype": dtype},
            "steps": [{"method": f"sparsify ({config.rule})", "config": config.to_dict(), "seconds": t_step}],
            "corpus": config.corpus,
            "protocol": m_before.protocol,
            "parameters_before": m_before.parameters,
            "parameters_after": m_after.parameters,
            "perplexity_before": before,
            "perplexity_after": after,
            "result": result.to_dict(),
            "seconds": {"total": time.perf_counter() - start},
        },
    )
    return {
        "model": model,
        "output": output,
        "command": command,
        "rule": config.rule,
        "sparsity": config.sparsity,
        "perplexity_before": before,
        "perplexity_after": after,
        "protocol": PerplexityProtocol().to_dict() if evaluate else None,
        "result": result.to_dict(),
        "seconds": time.perf_counter() - start,
    }


def _write_record_and_card(output: str, record: dict) -> None:
    """run.json (the record) and README.md (its model card) beside the saved model, as compress writes."""
    import json as json_module
    from pathlib import Path

    from ffnkit.card import write_model_card
    from ffnkit.evaluate import environment
    from ffnkit.pipeline import RECORD

    record = {**record, "environment": environment()}
    (Path(output) / RECORD).write_text(json_module.dumps(record, indent=2, default=str) + "\n")
    write_model_card(output, record)
