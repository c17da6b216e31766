"""``ffnkit export MODEL --format gguf|hf -o OUT``: a file llama.cpp / ollama runs, or a plain transformers
folder, from any ffnkit output of a Llama-family model (a thin layer over :mod:`ffnkit.export`)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ffnkit.cli.common import JsonOpt, ModelArg, print_json, print_table


def export(
    model: ModelArg = "smollm2-135m",
    format: Annotated[
        str,
        typer.Option("--format", "-f", help="gguf (llama.cpp, ollama) or hf (plain transformers folder)."),
    ] = "gguf",
    output: Annotated[str, typer.Option("--output", "-o", help="The .gguf file, or the folder for hf.")] = "",
    dtype: Annotated[
        str,
        typer.Option(
            help="gguf: auto (F16; ffnkit-quantised FFNs as Q8_0/Q5/Q4), f32, f16, bf16, q8_0, q5_0, q5_1, "
            "q4_0, q4_1. hf: auto (f32), f32, f16, bf16."
        ),
    ] = "auto",
    pad: Annotated[
        bool,
        typer.Option("--pad", help="hf: zero-pad per-layer FFN widths to the widest (exact, not smaller)."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output (never the input or the cache).")
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Export MODEL (an ffnkit output folder or a built-in name) for llama.cpp (GGUF) or plain transformers."""
    from ffnkit.export import ExportConfig, check_export_output, export_model

    config = ExportConfig(format=format, output=output, dtype=dtype, overwrite=overwrite, pad=pad)
    check_export_output(config, model)  # every refusal before the model loads
    if not json:
        sys.stderr.write(f"exporting {model} as {format} ({dtype}) ...\n")
    result = export_model(model, config)
    if json:
        print_json(result)
        return
    rows = [
        {"": k, "value": result[k]} for k in ("path", "architecture", "file_type", "bytes") if k in result
    ]
    if format == "gguf":
        widths = result["widths"]
        rows.append({"": "FFN widths", "value": f"{min(widths)}…{max(widths)} ({len(widths)} blocks)"})
        if result["fallback"]:
            rows.append({"": "F16 fallback (rows not whole blocks of 32)", "value": len(result["fallback"])})
    else:
        rows += [{"": k, "value": result[k]} for k in ("intermediate_size", "num_hidden_layers", "padded")]
    print_table(f"export ({result['seconds']:.1f} s)", rows, ["", "value"])
    for warning in result.get("warnings", []):
        sys.stderr.write(f"warning: {warning}\n")
