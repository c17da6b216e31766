"""``ffnkit bench ...``: speed measurements (each command registers itself on ``bench_app``)."""

from __future__ import annotations

import typer

from ffnkit.cli.bench_moe import register_bench_moe

bench_app = typer.Typer(
    help="Speed benchmarks: kernels against the implementations users have today.", no_args_is_help=True
)
register_bench_moe(bench_app)
