"""What every command shares: options, JSON output, tables, and one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
ModelArg = Annotated[
    str,
    typer.Argument(help="Built-in name (smollm2-135m, minilm-l6), hub id, local folder, or ffnkit output."),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run the model's own Python code (auto_map in its config). Off: such models are refused.",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace a non-empty output folder (never the input model's folder or the ffnkit cache).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help="Where the model runs: cpu, cuda, cuda:N or auto (the first GPU if any, else cpu)."
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Dtype the model is loaded and run in: float32, bfloat16, float16 or auto (the checkpoint's).",
    ),
]
SaveDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--save-dtype",
        help="Dtype of the saved weights: float32, bfloat16 or float16 (default: the --dtype it ran in).",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="A recipe file (JSON; YAML when PyYAML is installed): its keys are the config's fields; "
        "options given on the command line override it.",
    ),
]
CorpusOpt = Annotated[
    str,
    typer.Option(
        "--corpus", "-c", help="Built-in corpus (shakespeare, austen), a text file or folder, or hf:NAME."
    ),
]


# The least-squares W_out refit of `sparsify` and `moe convert` (one solver, ffnkit.core.lstsq): its on/off
# flag and its ridge; each command says what it refits and its own default.
REFIT_RIDGE_HELP = "Ridge of the refit, x the mean Gram diagonal (> 0; less pays with more tokens)."


def refit_flag(what: str) -> Any:
    """The ``--refit/--no-refit`` option, ``what`` saying what the refit changes."""
    return typer.Option("--refit/--no-refit", help=f"Least-squares refit of {what}.")


def print_json(doc: dict) -> None:
    """The only thing a --json run writes to stdout (progress and logs go to stderr): strict JSON, so a
    NaN/±inf in a result becomes ``null`` and ``non_finite`` lists where and what it was."""
    from ffnkit.core.config import finite_json, jsonable

    clean, notes = finite_json(jsonable(doc))
    if notes:
        clean["non_finite"] = notes
    sys.stdout.write(json.dumps(clean, indent=2, default=str, allow_nan=False) + "\n")


# the smallest value of count-like options, whatever the command (checked before any work starts)
MINIMUMS = {
    "--samples": 1,
    "--seq-len": 2,
    "--batch-size": 1,
    "--window": 1,
    "--stride": 1,
    "--chunk-size": 1,
    "--vocab-chunk": 1,
    "--top": 1,
    "--top-k": 1,
    "--top-contexts": 1,
    "--top-neurons": 1,
    "--max-tokens": 1,
    "--eval-tokens": 1,
    "--max-new-tokens": 0,
    "--n-neurons": 1,
    "--steps": 1,
}


def _check_save_dtype(value: str | None, flag: str) -> str | None:
    from ffnkit.core.device import check_dtype
    from ffnkit.core.errors import InvalidArgumentError

    name = check_dtype(value, flag)
    if name in ("auto", "float64"):
        raise InvalidArgumentError(f"{flag} takes float32, bfloat16 or float16, got {value!r}")
    return name


def _check_device(value: str | None, flag: str) -> str | None:
    from ffnkit.core.device import check_device, resolve_device

    name = check_device(value, flag)
    if name is not None and name != "cpu":
        resolve_device(name, flag)  # a GPU this machine lacks fails now, before any loading
    return name


def _check_dtype(value: str | None, flag: str) -> str | None:
    from ffnkit.core.device import check_dtype
    from ffnkit.core.errors import InvalidArgumentError

    name = check_dtype(value, flag)
    if name == "float64":
        raise InvalidArgumentError(f"{flag} takes float32, bfloat16, float16 or auto, got {value!r}")
    return name


# options that every command shares by name: checked (and canonicalised, bf16 -> bfloat16) when parsed,
# before the command starts; a new command that declares one of these flags gets its check for free
VALIDATORS = {"--device": _check_device, "--dtype": _check_dtype, "--save-dtype": _check_save_dtype}


def load(model: str, *, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) of a command: :func:`ffnkit.sources.models.load_model` on ``--device`` in
    ``--dtype`` (both already checked by :func:`check_params`).

    Example:
        >>> net, tok = load("smollm2-135m", device="cpu", dtype="bfloat16")
    """
    from ffnkit.sources.models import load_model

    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def warn(message: str) -> None:
    """A one-line note on stderr (stdout stays the command's output, strict JSON with ``--json``).

    Example:
        >>> warn("--tokens is now --words")
    """
    sys.stderr.write(f"ffnkit: {message}\n")


def renamed(new_value: Any, old_value: Any, old_flag: str, new_flag: str) -> Any:
    """The value of an option that was renamed: ``new_flag``'s, or the old (hidden) flag's with a warning.

    Example:
        >>> renamed(None, "Monday,Tuesday", "--tokens", "--words")  # warns on stderr
        'Monday,Tuesday'
    """
    from ffnkit.core.errors import InvalidArgumentError

    if old_value is None:
        return new_value
    if new_value:
        raise InvalidArgumentError(f"give {new_flag} only ({old_flag} is its old name)")
    warn(f"{old_flag} is deprecated; use {new_flag}")
    return old_value


def check_text(value: str, flag: str) -> None:
    """Refuse text that is not valid UTF-8 (bytes the shell passed undecodable, kept as surrogates).

    Example:
        >>> check_text("Once upon a time", "--prompt")
    """
    from ffnkit.core.errors import InvalidArgumentError

    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{flag} is not valid UTF-8 text (byte {exc.start}); give text, not binary data"
        ) from None


def check_params(command):
    """Make every option and argument of ``command`` and its subcommands refuse NaN/±inf, and the
    count-like options of :data:`MINIMUMS` refuse values below their minimum: one check for all,
    run on the parsed values before the command starts (nothing is loaded yet).

    Example:
        >>> check_params(typer.main.get_command(app))(["steer", "neurons", "--set", "nan"])  # exit 2
    """
    from ffnkit.core.config import check_finite
    from ffnkit.core.errors import InvalidArgumentError

    for param in command.params:
        inner = param.callback

        def checked(ctx, param, value, inner=inner):
            flag = (param.opts or [param.name])[0]
            check_finite(value, flag)
            if isinstance(value, str):
                check_text(value, flag)
            if flag in VALIDATORS:
                value = VALIDATORS[flag](value, flag)
            low = MINIMUMS.get(flag)
            if low is not None and isinstance(value, int) and not isinstance(value, bool) and value < low:
                raise InvalidArgumentError(f"{flag} must be >= {low}, got {value}")
            return inner(ctx, param, value) if inner is not None else value

        param.callback = checked
    for sub in getattr(command, "commands", {}).values():
        check_params(sub)
    return command


def console():
    from rich.console import Console

    # piped output (CI logs, files) would otherwise be cut at 80 columns
    return Console() if sys.stdout.isatty() else Console(width=160)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for c in columns:
        left = c in ("name", "kind", "activation", "stack", "help", "settings", "source", "family", "option")
        table.add_column(c, justify="left" if left else "right")
    for r in rows:  # cells are text, not rich markup ("W_in[i]" stays as it is)
        table.add_row(
            *[
                escape(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")))
                for c in columns
            ]
        )
    console().print(table)


def quiet_libraries() -> None:
    """transformers' own info and warnings go to stderr; keep them to errors so tables stay readable."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading weights" bars on every load; ffnkit shows its own progress
    quiet_torchao()


def quiet_torchao() -> None:
    """transformers imports torchao whenever it is installed (its quantizer registry), and torchao then
    warns on every command about optional CUDA kernels (``Failed to load ... .so``) and registers enums
    with torch's pytree (``... is an Enum subclass``): nothing the user did or can fix, so keep them to
    errors. Set before anything imports torchao.

    Example:
        >>> quiet_torchao()
    """
    import logging as std_logging

    for name in ("torchao", "torch.utils._pytree"):
        std_logging.getLogger(name).setLevel(std_logging.ERROR)
