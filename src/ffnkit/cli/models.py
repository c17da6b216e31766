"""``ffnkit models``: the built-in models (name, family, size, source); ``ffnkit models show MODEL``: every
FFN of one model. ``ffnkit models MODEL`` (the older form) still shows that model's FFNs."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from ffnkit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    TrustRemoteCodeOpt,
    load,
    print_json,
    print_table,
)


class ShowByDefault(TyperGroup):
    """``ffnkit models NAME`` means ``ffnkit models show NAME``: a first argument that is not a
    subcommand is a model (so the older form keeps working)."""

    def resolve_command(self, ctx, args):  # noqa: D102  (click's hook)
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show", *args]
        return super().resolve_command(ctx, args)


models_app = typer.Typer(
    cls=ShowByDefault,
    invoke_without_command=True,
    help="List the built-in models; `models show MODEL` lists one model's FFNs.",
)


@models_app.callback()
def list_models(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """The built-in models: name, family, parameters, source, whether they are in the cache."""
    if ctx.invoked_subcommand is not None:
        return
    from ffnkit.sources.models import builtin_info

    rows = builtin_info()
    if json:
        print_json({"models": rows})
        return
    table = [
        {**r, "parameters": f"{r['parameters'] / 1e6:.1f}M" if r["parameters"] else "", "cached": r["cached"]}
        for r in rows
    ]
    print_table(
        "built-in models (any hub id or local folder also works)",
        table,
        ["name", "family", "kind", "parameters", "source", "cached"],
    )
    notes = [f"{r['name']}: {r['dense_note']}" for r in rows if r["dense_note"]]
    for note in notes:
        print(f"note: {note}")
    print("`ffnkit models show NAME` lists a model's FFNs.")


@models_app.command("show")
def show(
    model: ModelArg = "smollm2-135m",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """List every FFN block of MODEL: layer, kind, widths, activation, parameters and FLOPs per token."""
    from ffnkit.core.archs import find_ffns
    from ffnkit.evaluate import count_parameters

    net, _ = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    ffns = find_ffns(net)
    rows = [f.describe() for f in ffns]
    doc = {
        "model": model,
        "family": ffns[0].family,
        "model_type": getattr(net.config, "model_type", None),
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        "parameters": count_parameters(net, ffns),
        "ffns": rows,
    }
    if json:
        print_json(doc)
        return
    cols = ["index", "name", "kind", "d_model", "d_ff", "activation", "params", "flops_per_token"]
    if any(f.kind == "moe" for f in ffns):
        cols += ["experts", "top_k", "shared_expert_d_ff"]
    print_table(f"{model}: {len(ffns)} FFNs ({doc['family']})", rows, cols)
    p = doc["parameters"]
    print(f"parameters: {p['total']:,} total, {p['ffn']:,} in FFNs ({100 * p['ffn_share']:.1f}%)")
