"""``ffnkit compress MODEL --method M --ratio R -o DIR``: compress, report, save a loadable folder.

A thin layer over :func:`ffnkit.pipeline.run_pipeline`. The methods, their help and their settings come
from :data:`ffnkit.compress.registry.METHODS`: every option below whose name is a field of the chosen
method's config maps onto that field 1:1 (``--seq-len`` → ``seq_len``); ``--set FIELD=VALUE`` reaches
any other field; an option the method's config lacks is a one-line error naming the methods it
applies to. Options left out take the method's own defaults.
"""

from __future__ import annotations

import json as json_module
import shlex
import sys
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
from ffnkit.compress.registry import METHODS

# CLI option -> config field; options left at None were not given
METHOD_OPTIONS = {
    "ratio": "--ratio",
    "allocation": "--allocation",
    "samples": "--samples",
    "seq_len": "--seq-len",
    "bits": "--bits",
    "align": "--align",
}
HEAL_OPTIONS = {"max_minutes": "--heal-minutes", "lr": "--heal-lr"}


def method_fields(method: str, options: dict[str, Any], settings: list[str] | None = None) -> dict[str, Any]:
    """The config fields of ``method`` that the command line gave: the options not None, then ``--set``.

    An option the method's config lacks (or fixes) is a one-line error naming the methods it applies to.

    Example:
        >>> method_fields("svd-llm", {"ratio": 0.3, "allocation": "global", "bits": None})
        {'ratio': 0.3, 'allocation': 'global'}
    """
    from ffnkit.compress.registry import methods_with_field
    from ffnkit.core.errors import InvalidArgumentError

    spec = METHODS.get(method)
    given = {k: v for k, v in options.items() if v is not None}
    given.update(parse_settings(settings or []))
    fields, fixed = spec.fields(), spec.fixed_fields()
    for name in given:
        if name in fields:
            continue
        flag = METHOD_OPTIONS.get(name, f"--set {name}")
        why = (
            f"method {method!r} fixes {name}={fixed[name]!r}"
            if name in fixed
            else f"method {method!r} has no {name}"
        )
        others = methods_with_field(name)
        where = f"it applies to: {', '.join(others)}" if others else f"its settings: {', '.join(fields)}"
        raise InvalidArgumentError(f"{flag} does not apply here: {why}; {where}")
    return given


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """``["reconstruct=true", "layers=[0,1]"]`` → ``{"reconstruct": True, "layers": [0, 1]}`` (JSON values,
    or plain strings where the value is not JSON; dashes in names become underscores).

    Example:
        >>> parse_settings(["keep-lowest=0.02", "mapping=symmetric"])
        {'keep_lowest': 0.02, 'mapping': 'symmetric'}
    """
    from ffnkit.core.errors import InvalidArgumentError

    out: dict[str, Any] = {}
    for item in settings:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise InvalidArgumentError(f"--set takes FIELD=VALUE (e.g. --set reconstruct=true), got {item!r}")
        try:
            value = json_module.loads(raw)
        except ValueError:
            value = raw
        out[name.strip().replace("-", "_")] = value
    return out


def _method_help() -> str:
    return f"One of: {', '.join(METHODS)} (--list shows what each does and its settings)."


def _list_methods(as_json: bool) -> None:
    rows = [
        {"name": n, "help": METHODS.help(n), "settings": ", ".join(m.fields())} for n, m in METHODS.items()
    ]
    if as_json:
        print_json({"methods": rows})
        return
    print_table(
        "compression methods (--set FIELD=VALUE reaches every setting)", rows, ["name", "help", "settings"]
    )


def compress(
    model: ModelArg = "smollm2-135m",
    method: Annotated[str, typer.Option("--method", "-m", help=_method_help())] = "best",
    ratio: Annotated[
        float | None,
        typer.Option(
            "--ratio", "-r", help="Share of FFN parameters removed, [0, 1) (the method's default: 0.3)."
        ),
    ] = None,
    output: Annotated[
        str, typer.Option("--output", "-o", help="Folder to save the compressed model in.")
    ] = "",
    allocation: Annotated[
        str | None, typer.Option(help="How the ratio is shared between layers: uniform, global, sensitivity.")
    ] = None,
    samples: Annotated[int | None, typer.Option(help="Calibration windows (default: the method's).")] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per calibration window (default: the method's).")
    ] = None,
    corpus: CorpusOpt = "shakespeare",
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip perplexity before/after.")] = False,
    heal: Annotated[
        bool, typer.Option("--heal", help="Then distil towards the original on calibration text (≤10 min).")
    ] = False,
    bits: Annotated[
        int | None, typer.Option(help="Bits per FFN weight (method quantize), 2-8; default 4.")
    ] = None,
    align: Annotated[
        int | None,
        typer.Option(
            help="Round each kept FFN width to a multiple of N (best's default: 32, whole blocks of "
            "llama.cpp's Q8_0/Q4_0; 256 for its k-quants; 1: exact widths)."
        ),
    ] = None,
    heal_minutes: Annotated[
        float | None, typer.Option(help="Time budget of --heal, minutes (default 10).")
    ] = None,
    heal_lr: Annotated[
        float | None, typer.Option(help="Peak learning rate of --heal (default 3e-4).")
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="FIELD=VALUE of the method's config (JSON value), repeatable: --set reconstruct=true.",
        ),
    ] = None,
    list_methods: Annotated[
        bool, typer.Option("--list", help="List the methods and their settings, then stop.")
    ] = False,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Compress MODEL's FFNs with METHOD at RATIO, save it to DIR, print sizes and perplexity."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, Step, run_pipeline

    if list_methods:
        _list_methods(json)
        return
    METHODS.entry(method)  # an unknown method lists the known ones, before anything else
    options = {
        "ratio": ratio,
        "allocation": allocation,
        "samples": samples,
        "seq_len": seq_len,
        "bits": bits,
        "align": align,
    }
    fields = method_fields(method, options, settings)
    heal_fields = {k: v for k, v in {"max_minutes": heal_minutes, "lr": heal_lr}.items() if v is not None}
    if heal_fields and not heal:
        flags = ", ".join(HEAL_OPTIONS[k] for k in heal_fields)
        raise InvalidArgumentError(f"{flags} set the healing after compression: add --heal")
    if not output:
        raise InvalidArgumentError("give an output folder with -o DIR (the compressed model is saved there)")
    config = PipelineConfig(  # every setting is checked here, before the model loads
        model=model,
        steps=[Step(method, fields)],
        corpus=corpus,
        evaluation=None if no_eval else PerplexityProtocol(),
        heal=heal_fields if heal else None,
        output=output,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
    )
    command = "ffnkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = run_pipeline(config, progress=not json, command=command)
    step = record.steps[0]
    doc = {
        **record.to_dict(),
        "method": method,
        "ratio": step.config.get("ratio"),
        "report": step.report,  # the step's report (also under steps[0].report)
    }
    if json:
        print_json(doc)
        return
    rows = [
        {
            "": "parameters (total)",
            "before": record.parameters_before["total"],
            "after": record.parameters_after["total"],
        },
        {
            "": "parameters (FFN)",
            "before": record.parameters_before["ffn"],
            "after": record.parameters_after["ffn"],
        },
    ]
    if record.perplexity_before is not None:
        rows.append({"": "perplexity", "before": record.perplexity_before, "after": record.perplexity_after})
    what = f"{method} at {doc['ratio']:.0%} of FFN parameters" if doc["ratio"] is not None else method
    seconds = record.seconds["steps"] + record.seconds.get("heal", 0.0)
    print_table(f"{what} ({seconds:.1f} s)", rows, ["", "before", "after"])
    sys.stdout.write(f"saved to {output} (load it with `ffnkit eval {output}` or ffnkit.load)\n")
