"""``ffnkit moe ...``: mixture-of-experts commands (reading and steering: cli/moe_inspect.py)."""

from __future__ import annotations

import typer

from ffnkit.cli.moe_inspect import register_moe_inspect

moe_app = typer.Typer(
    help="Mixture-of-experts models: expert load and routing statistics, contrastive experts, steering.",
    no_args_is_help=True,
)
register_moe_inspect(moe_app)
