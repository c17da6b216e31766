"""``ffnkit bench moe``: time ffnkit's expert executor against transformers' own experts implementations.

Registered on the ``bench`` group by :func:`register_bench_moe`. The measurement is
:func:`ffnkit.kernels.moe_bench.bench_experts` (the code of ``benchmarks/moe_kernel.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ffnkit.cli.common import JsonOpt, OverwriteOpt, print_json, print_table


def bench_moe(
    device: Annotated[
        str, typer.Option(help="cpu (float32, OLMoE-like small shape) or cuda (OLMoE shapes, bf16).")
    ] = "cpu",
    tokens: Annotated[
        str | None,
        typer.Option(help="Comma-separated token counts (default cpu: 1,16,256,2048; cuda: 1..16384)."),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Timed rounds per size (median reported), 1-50.")] = 5,
    threads: Annotated[int, typer.Option(help="CPU threads (the issue's CPU target uses 2).")] = 2,
    calibrate: Annotated[
        bool,
        typer.Option("--calibrate", help="cuda: first pick the Triton routes' thresholds and tile configs."),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder to write moe_kernel.json into (optional).")
    ] = None,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
) -> None:
    """Time one MoE experts layer: transformers' eager / batched_mm / grouped_mm against ffnkit's, with floors."""
    import json as jsonlib

    import torch

    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.folders import atomic_folder, check_output_dir
    from ffnkit.kernels.moe_bench import bench_experts
    from ffnkit.kernels.moe_bench import calibrate as run_calibration

    if device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda but no CUDA device is visible: use --device cpu")
    sizes = None
    if tokens:
        try:
            sizes = tuple(int(s) for s in tokens.split(",") if s.strip())
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1 or max(sizes) > 1 << 20:
            raise InvalidArgumentError(
                f"--tokens must be comma-separated counts in [1, 1048576], got {tokens!r}"
            )
    if not 1 <= rounds <= 50:
        raise InvalidArgumentError(f"--rounds must be in [1, 50], got {rounds}")
    if not 1 <= threads <= 1024:
        raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
    if out is not None:
        check_output_dir(out, overwrite=overwrite, needed_bytes=0, replace=False)
    if device == "cpu":
        torch.set_num_threads(threads)

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    calibration = run_calibration(sizes) if calibrate and device == "cuda" else None
    doc = bench_experts(device, sizes, rounds=rounds, progress=say)
    if calibration is not None:
        doc["calibration"] = calibration
    doc["command"] = " ".join(["ffnkit", *sys.argv[1:]])
    if out is not None:
        with atomic_folder(out) as tmp:
            (Path(tmp) / "moe_kernel.json").write_text(jsonlib.dumps(doc, indent=2) + "\n")
    if json:
        print_json(doc)
        return
    impls = list(dict.fromkeys(n for r in doc["results"] for n in r["us"] if not n.startswith("route_")))
    rows = [
        {
            "routing": r["routing"],
            "tokens": r["tokens"],
            **{n: f"{r['us'][n]:.0f}" if n in r["us"] else r["status"].get(n, "-")[:12] for n in impls},
            "floor": f"{r['roofline_us']:.0f}",
            "speedup": f"{r.get('speedup_vs_best_transformers', float('nan')):.2f}x",
        }
        for r in doc["results"]
    ]
    print_table(
        "one experts layer, microseconds per call", rows, ["routing", "tokens", *impls, "floor", "speedup"]
    )


def register_bench_moe(app: typer.Typer) -> None:
    """Add ``moe`` to a ``bench`` command group.

    Example:
        >>> bench_app = typer.Typer()
        >>> register_bench_moe(bench_app)
    """
    app.command("moe")(bench_moe)


__all__ = ["bench_moe", "register_bench_moe"]
