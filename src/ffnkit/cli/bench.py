"""``ffnkit bench sparsity`` (and ``bench moe``, registered from cli/bench_moe.py): the sparse-FFN kernels against the dense FFN, side by side in one process.

A thin layer over :func:`ffnkit.kernels.benchmark.bench_sparsity` (the function benchmarks/sparse_kernel.py
also runs): every option is checked before any weight is made; ``--json`` prints the whole record (machine,
versions, copy bandwidth, one row per variant and point) on stdout, progress goes to stderr.

Example:
    ffnkit bench sparsity --shape qwen2.5-0.5b --levels 0.5 --batch 1 --json
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ffnkit.cli.bench_moe import register_bench_moe
from ffnkit.cli.common import JsonOpt, print_json, print_table

bench_app = typer.Typer(
    help="Speed benchmarks: kernels against the implementations users have today.", no_args_is_help=True
)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    from ffnkit.core.errors import InvalidArgumentError

    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"{flag} takes comma-separated numbers, e.g. 0.25,0.5, got {text!r}"
        ) from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from ffnkit.core.errors import InvalidArgumentError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidArgumentError(f"{flag} takes comma-separated integers, e.g. 1,4, got {text!r}") from None


@bench_app.command("sparsity")
def sparsity(
    shape: Annotated[
        str, typer.Option("--shape", help="llama3-8b, qwen2.5-0.5b, or D,F (d_model, d_ff).")
    ] = "qwen2.5-0.5b",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="float32, bfloat16 or float16 (default: cpu float32, cuda bfloat16)."),
    ] = None,
    levels: Annotated[
        str, typer.Option("--levels", help="Shares of FFN weight bytes skipped, in [0, 1), comma-separated.")
    ] = "0,0.25,0.4,0.5,0.65,0.8,0.9",
    batch: Annotated[
        str, typer.Option("--batch", help="Batch sizes (rows per call), comma-separated.")
    ] = "1",
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="Timed rounds per point (cpu 15, cuda 20).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (default: torch's).")] = None,
    union: Annotated[
        bool,
        typer.Option(
            "--union/--no-union", help="Also time per-row active sets (where batching stops paying)."
        ),
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Time dense vs gather / torch gather / CATS threshold / TEAL kernels of one FFN shape."""
    import torch

    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.kernels.benchmark import SparsityBenchConfig, bench_sparsity, parse_shape, summary_rows

    d, f = parse_shape(shape)
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
    cfg = SparsityBenchConfig(
        d_model=d,
        d_ff=f,
        device=device,
        dtype=dtype or ("bfloat16" if device == "cuda" else "float32"),
        levels=_floats(levels, "--levels"),
        batches=_ints(batch, "--batch"),
        rounds=rounds,
        union=union,
    )
    if threads is not None:
        torch.set_num_threads(threads)

    def log(row: dict) -> None:
        sys.stderr.write(json.dumps(row) + "\n")

    record = bench_sparsity(cfg, log)
    record["command"] = "ffnkit bench sparsity " + " ".join(sys.argv[3:])
    if as_json:
        print_json(record)
        return
    cols = [
        "section",
        "variant",
        "batch",
        "bytes_skipped",
        "median_us",
        "speedup_vs_dense",
        "time_over_bound",
    ]
    title = f"sparse FFN d={d} d_ff={f} {cfg.dtype} on {device} (copy {record['copy_bandwidth_GBps']} GB/s)"
    print_table(title, summary_rows(record), cols)


register_bench_moe(bench_app)
