"""The typer app. Errors of the FFNKitError family print one line naming the fix and exit with status 2."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

import ffnkit.cli.inspect_corpus  # noqa: F401  (adds stats/spectral/importance/contrast/early-exit to `inspect`)
from ffnkit.cli.bench import bench_app
from ffnkit.cli.common import check_params, quiet_libraries
from ffnkit.cli.compress import compress
from ffnkit.cli.evaluate import eval_
from ffnkit.cli.export import export
from ffnkit.cli.inspect import inspect_app
from ffnkit.cli.models import models_app
from ffnkit.cli.moe import moe_app
from ffnkit.cli.report import report
from ffnkit.cli.sparsify import sparsify
from ffnkit.cli.steer import steer_app

app = typer.Typer(
    name="ffnkit",
    help="Open up the feed-forward (FFN) blocks of Transformer models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(models_app, name="models")
app.command("eval")(eval_)
app.command("report")(report)
app.command("compress")(compress)
app.command("export")(export)
app.command("sparsify")(sparsify)
app.add_typer(inspect_app, name="inspect")
app.add_typer(steer_app, name="steer")
app.add_typer(bench_app, name="bench")
app.add_typer(moe_app, name="moe")


def _version(value: bool) -> None:
    if value:
        from ffnkit import __version__

        sys.stdout.write(f"ffnkit {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print ffnkit's version and stop."),
    ] = False,
) -> None:
    """Open up the feed-forward (FFN) blocks of Transformer models."""


def main() -> None:
    """Console entry point: run the app, turning ffnkit errors into one line and exit status 2."""
    from ffnkit.core.errors import FFNKitError

    quiet_libraries()
    command = check_params(typer.main.get_command(app))
    try:
        command(prog_name="ffnkit")
    except FFNKitError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        sys.stderr.write(f"ffnkit: error: {message}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
