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
    ConfigOpt,
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    OverwriteOpt,
    SaveDtypeOpt,
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
    "reconstruct": "--reconstruct",
    "bias_compensation": "--bias-compensation",
    "layers": "--layers",
    "align": "--align",
}
# recipe keys of the pipeline (PipelineConfig fields) that compress takes from a --config file
PIPELINE_KEYS = (
    "model",
    "steps",
    "corpus",
    "evaluation",
    "heal",
    "output",
    "device",
    "dtype",
    "save_dtype",
    "measure_before_heal",
    "overwrite",
    "trust_remote_code",
)
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


def _recipe_config(
    recipe: dict[str, Any], method: str | None, fields: dict[str, Any], pipeline: dict[str, Any], where: str
) -> tuple[str, list[Any], dict[str, Any]]:
    """(method, steps, pipeline fields) of a recipe with the command line's values on top: ``fields``
    (method config fields given) and ``pipeline`` (pipeline options given) override the recipe's."""
    from ffnkit.cli.recipe import check_keys
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.pipeline import Step

    if "steps" in recipe:  # a list of steps: method fields at the top level would be ambiguous
        check_keys(recipe, PIPELINE_KEYS, where)
        steps = [s if isinstance(s, dict) else {} for s in recipe["steps"] or []]
        if not steps:
            raise InvalidArgumentError(f"{where}: steps is empty; give at least one {{method, config}}")
        if (fields or method) and len(steps) != 1:
            raise InvalidArgumentError(
                f"{where} has {len(steps)} steps: set their fields in the recipe, not with options"
            )
        if fields or method:
            step = steps[0]
            steps = [{"method": method or step.get("method"), "config": {**step.get("config", {}), **fields}}]
        built = [Step(**s) for s in steps]
        given = {k: recipe[k] for k in PIPELINE_KEYS if k in recipe and k != "steps"}
        return built[0].method, built, {**given, **pipeline}
    chosen = method or recipe.get("method") or "best"
    spec = METHODS.get(chosen)
    check_keys(recipe, [*PIPELINE_KEYS, "method", *spec.fields()], f"{where} (method {chosen})")
    step_fields = {k: v for k, v in recipe.items() if k in spec.fields()}
    step_fields.update(fields)
    given = {k: recipe[k] for k in PIPELINE_KEYS if k in recipe and k != "steps"}
    return chosen, [Step(chosen, step_fields)], {**given, **pipeline}


def compress(
    ctx: typer.Context,
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
    layers: Annotated[
        str | None, typer.Option("--layers", help="Only these FFN indices, e.g. 0-9,20 (default: all).")
    ] = None,
    reconstruct: Annotated[
        bool | None,
        typer.Option(
            "--reconstruct/--no-reconstruct", help="Least-squares refit of the kept W_out columns (pruning)."
        ),
    ] = None,
    bias_compensation: Annotated[
        bool | None,
        typer.Option(
            "--bias-compensation/--no-bias-compensation",
            help="Add the removed neurons' mean output to the bias (pruning; default: on for flap).",
        ),
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
    config_file: ConfigOpt = None,
    list_methods: Annotated[
        bool, typer.Option("--list", help="List the methods and their settings, then stop.")
    ] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    save_dtype: SaveDtypeOpt = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Compress MODEL's FFNs with METHOD at RATIO, save it to DIR, print sizes and perplexity."""
    from ffnkit.cli.inspect import parse_ints
    from ffnkit.cli.recipe import given_on_command_line, read_recipe
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.pipeline import PerplexityProtocol, PipelineConfig

    if list_methods:
        _list_methods(json)
        return
    typed = given_on_command_line(ctx)
    recipe = read_recipe(config_file) if config_file is not None else {}
    chosen = method if "method" in typed or config_file is None else None
    if chosen is not None:
        METHODS.entry(chosen)  # an unknown method lists the known ones, before anything else
    options = {
        "ratio": ratio,
        "allocation": allocation,
        "samples": samples,
        "seq_len": seq_len,
        "bits": bits,
        "reconstruct": reconstruct,
        "bias_compensation": bias_compensation,
        "layers": parse_ints(layers, "layers"),
        "align": align,
    }
    heal_fields = {k: v for k, v in {"max_minutes": heal_minutes, "lr": heal_lr}.items() if v is not None}
    if heal_fields and not heal and "heal" not in recipe:
        flags = ", ".join(HEAL_OPTIONS[k] for k in heal_fields)
        raise InvalidArgumentError(f"{flags} set the healing after compression: add --heal")
    cli = {  # pipeline fields typed on the command line (they override the recipe)
        "model": model,
        "corpus": corpus,
        "output": output or None,
        "device": device,
        "dtype": dtype,
        "save_dtype": save_dtype,
        "overwrite": overwrite,
        "trust_remote_code": trust_remote_code,
    }
    pipeline = {k: v for k, v in cli.items() if k in typed}
    if no_eval:
        pipeline["evaluation"] = None
    if heal or heal_fields:
        pipeline["heal"] = {**(recipe.get("heal") or {}), **heal_fields}
    if config_file is not None:
        given_fields = {k: v for k, v in options.items() if v is not None}
        given_fields.update(parse_settings(settings or []))
        base = chosen or recipe.get("method") or (None if "steps" in recipe else "best")
        if base is not None:  # an option the method lacks fails as without a recipe
            given_fields = method_fields(base, given_fields)
        method, steps, merged = _recipe_config(
            recipe, chosen, given_fields, pipeline, f"--config {config_file}"
        )
    else:
        fields = method_fields(method, options, settings)
        from ffnkit.pipeline import Step

        steps, merged = [Step(method, fields)], pipeline
    merged = {**{k: v for k, v in cli.items()}, **merged}
    merged.setdefault("evaluation", PerplexityProtocol())
    if not merged.get("output"):
        raise InvalidArgumentError("give an output folder with -o DIR (the compressed model is saved there)")
    config = PipelineConfig(steps=steps, **merged)  # every setting is checked here, before the model loads
    command = "ffnkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = _run(config, command)
    step = record.steps[0]
    doc = {
        **record.to_dict(),
        "method": step.method,
        "ratio": step.config.get("ratio"),
        "report": step.report,  # the step's report (also under steps[0].report)
    }
    if json:
        print_json(doc)
        return
    _print_summary(doc, record, str(config.output))


def _run(config: Any, command: str) -> Any:
    """Check the output folder, load, say how long the run will take (stderr), run the pipeline."""
    import time

    from ffnkit.cli.common import warn
    from ffnkit.estimate import estimate_run
    from ffnkit.folders import check_output_dir
    from ffnkit.pipeline import load_step, run_pipeline

    check_output_dir(config.output, overwrite=config.overwrite, model_source=config.model)
    start = time.perf_counter()
    model, tokenizer = load_step(config)
    loaded = time.perf_counter() - start
    warn(estimate_run(model, config).line())
    record = run_pipeline(config, progress=True, command=command, model=model, tokenizer=tokenizer)
    record.seconds["load"] = loaded
    return record


def _print_summary(doc: dict, record: Any, output: str) -> None:
    from ffnkit.sources.models import MODELS

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
    method = doc["method"]
    what = f"{method} at {doc['ratio']:.0%} of FFN parameters" if doc["ratio"] is not None else method
    seconds = record.seconds["steps"] + record.seconds.get("heal", 0.0)
    print_table(f"{what} ({seconds:.1f} s)", rows, ["", "before", "after"])
    if record.model in MODELS and MODELS.entry(record.model).meta.get("dense_note"):
        sys.stdout.write(f"before = {MODELS.entry(record.model).meta['dense_note']}\n")
    sys.stdout.write(
        f"saved to {output} with its model card README.md (load it with `ffnkit eval {output}` or ffnkit.load)\n"
    )
