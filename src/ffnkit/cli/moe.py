"""``ffnkit moe convert|upcycle MODEL ... -o DIR``: dense FFNs → mixtures of experts, saved loadable
(``moe stats|contrast|steer`` come from cli/moe_inspect.py).

A thin layer over :func:`ffnkit.pipeline.run_pipeline` with one step, ``moefy`` (:class:`MoEfyConfig`)
or ``upcycle`` (:class:`UpcycleConfig`); every option maps onto a config field and is checked (with the
output folder) before the model loads. ``ffnkit eval DIR`` runs the saved model.
"""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Any

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
from ffnkit.cli.moe_inspect import register_moe_inspect

moe_app = typer.Typer(
    help="Mixture of experts: convert dense FFNs into experts, upcycle; expert load, contrast and steering.",
    no_args_is_help=True,
)

OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Folder to save the converted model in.")]
NoEvalOpt = Annotated[bool, typer.Option("--no-eval", help="Skip perplexity before/after.")]


def _run(
    model: str,
    method: str,
    fields: dict[str, Any],
    output: str,
    corpus: str,
    no_eval: bool,
    overwrite: bool,
    trust_remote_code: bool,
    json: bool,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    from ffnkit.compress.registry import METHODS
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, Step, run_pipeline

    if not output:
        raise InvalidArgumentError("give an output folder with -o DIR (the converted model is saved there)")
    METHODS.get(method).build(fields)  # every option is checked here, before the model loads
    config = PipelineConfig(
        model=model,
        steps=[Step(method, fields)],
        corpus=corpus,
        evaluation=None if no_eval else PerplexityProtocol(),
        output=output,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        device=device,
        dtype=dtype,
    )
    command = "ffnkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = run_pipeline(config, progress=True, command=command)
    report = record.steps[0].report
    doc = {**record.to_dict(), "method": method, "report": report}
    if json:
        print_json(doc)
        return
    rows = [
        {
            "": "parameters (FFN)",
            "before": record.parameters_before["ffn"],
            "after": record.parameters_after["ffn"],
        },
        {"": "active FFN fraction", "before": 1.0, "after": report.get("active_fraction")},
    ]
    sizes = report.get("sizes") or {}
    if sizes.get("experts") is not None:  # moefy: the resolved (auto or given) sizes
        shape = (
            f"{sizes['experts']} × {sizes['expert_size']} + {sizes['shared']} shared, top-{sizes['top_k']}"
        )
        rows.append({"": "experts per FFN", "before": "dense", "after": shape})
    if record.perplexity_before is not None:
        rows.append({"": "perplexity", "before": record.perplexity_before, "after": record.perplexity_after})
    print_table(f"{method} ({record.seconds['steps']:.1f} s)", rows, ["", "before", "after"])
    sys.stdout.write(f"saved to {output} (run it with `ffnkit eval {output}` or ffnkit.load)\n")


def _with_recipe(ctx: typer.Context, method: str, fields: dict[str, Any], config_file: Any) -> dict[str, Any]:
    """``fields`` over a ``--config`` recipe of ``method``'s config fields (typed options win)."""
    from ffnkit.cli.recipe import apply_recipe, given_on_command_line
    from ffnkit.compress.registry import METHODS

    return apply_recipe(config_file, fields, METHODS.get(method).fields(), given_on_command_line(ctx))


@moe_app.command("convert")
def convert(
    ctx: typer.Context,
    model: ModelArg = "smollm2-135m",
    active: Annotated[
        float | None,
        typer.Option("--active", "-F", help="Share of FFN neurons active per token, (0, 1] (default 0.5)."),
    ] = None,
    experts: Annotated[
        int | None,
        typer.Option(
            "--experts",
            "-E",
            help="Experts per FFN (must divide d_ff − shared). Default auto: experts of width "
            "ceil((d_ff − d_ff//6)/80), at most 80 (d_ff 1536: 80 of 16); with --shared, the most experts "
            "≤ 80 dividing d_ff − shared.",
        ),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="How neurons are grouped: kmeans, coact or random (default coact).")
    ] = None,
    router: Annotated[
        str, typer.Option(help="Router: mlp (trained on calibration text) or centroid.")
    ] = "mlp",
    shared: Annotated[
        int | None,
        typer.Option(
            help="Neurons of an always-on shared expert (the most-firing). Default auto: about d_ff/6 plus "
            "what the experts leave over (d_ff 1536: 256), or 0 when --experts is given."
        ),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Experts per token (instead of --active).")
    ] = None,
    zero_experts: Annotated[
        int, typer.Option(help="MoE++ zero experts (skip low-mass experts), ≤ top-k.")
    ] = 0,
    allocation: Annotated[
        str, typer.Option(help="uniform (one top-k) or global (top-k per layer by the router's mass recall).")
    ] = "uniform",
    router_target: Annotated[
        str | None,
        typer.Option(help="What the mlp router ranks: mass (Σ|m|) or norm (‖expert output‖; default)."),
    ] = None,
    router_steps: Annotated[
        int | None, typer.Option(help="Training steps of the mlp router (default 200).")
    ] = None,
    router_batch: Annotated[
        int | None, typer.Option(help="Calibration tokens per router training step (default 1024).")
    ] = None,
    router_hidden: Annotated[
        int | None, typer.Option(help="Hidden width of the mlp router (default 256).")
    ] = None,
    refit: Annotated[
        bool,
        refit_flag(
            "the experts' down projections with the routing in the loop (conversions that read calibration text)"
        ),
    ] = True,
    refit_ridge: Annotated[float | None, typer.Option(help=REFIT_RIDGE_HELP + " Default 0.3.")] = None,
    refit_tokens: Annotated[
        int | None, typer.Option(help="Calibration tokens per layer of the refit (default 16384).")
    ] = None,
    samples: Annotated[int | None, typer.Option(help="Calibration windows (default 64).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per calibration window (default 256).")] = None,
    output: OutputOpt = "",
    corpus: CorpusOpt = "shakespeare",
    no_eval: NoEvalOpt = False,
    config_file: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Split every dense FFN of MODEL into experts with a router (MoEfication), save it to DIR."""
    given = {
        "experts": experts,
        "split": split,
        "shared": shared,
        "router_target": router_target,
        "router_steps": router_steps,
        "router_batch": router_batch,
        "router_hidden": router_hidden,
        "refit_ridge": refit_ridge,
        "refit_tokens": refit_tokens,
        "samples": samples,
        "seq_len": seq_len,
        "active": active,
        "top_k": top_k,
    }
    # options left out keep MoEfyConfig's defaults (None = auto sizes), so the two cannot drift apart
    fields = {
        "router": router,
        "zero_experts": zero_experts,
        "allocation": allocation,
        "refit": refit,
        **{k: v for k, v in given.items() if v is not None},
    }
    fields = _with_recipe(ctx, "moefy", fields, config_file)
    _run(model, "moefy", fields, output, corpus, no_eval, overwrite, trust_remote_code, json, device, dtype)


@moe_app.command("upcycle")
def upcycle(
    ctx: typer.Context,
    model: ModelArg = "smollm2-135m",
    experts: Annotated[int, typer.Option("--experts", "-E", help="Experts per FFN.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts per token.")] = 2,
    granular: Annotated[
        bool,
        typer.Option("--granular", help="Experts are slices of the FFN (equal to it at init), not copies."),
    ] = False,
    output: OutputOpt = "",
    corpus: CorpusOpt = "shakespeare",
    no_eval: NoEvalOpt = False,
    config_file: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Upcycle every dense FFN of MODEL into experts (copies or slices) with a new router, save to DIR."""
    fields = _with_recipe(
        ctx, "upcycle", {"experts": experts, "top_k": top_k, "granular": granular}, config_file
    )
    _run(model, "upcycle", fields, output, corpus, no_eval, overwrite, trust_remote_code, json, device, dtype)


register_moe_inspect(moe_app)
