"""``ffnkit report MODEL -o DIR``: the self-contained HTML page and its JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ffnkit.cli.common import (
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    OverwriteOpt,
    TrustRemoteCodeOpt,
    load,
    print_json,
)


def report(
    model: ModelArg = "smollm2-135m",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for report.html, report.json, PNGs.")
    ] = Path("ffnkit-report"),
    corpus: CorpusOpt = "shakespeare",
    samples: Annotated[int, typer.Option(help="Calibration sequences for activation statistics.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Write an HTML report of MODEL's FFNs: table, parameter share, sparsity, firing rates, perplexity."""
    from ffnkit.folders import check_output_dir
    from ffnkit.report import build_report

    # files are written into the folder (nothing is deleted): refuse a non-empty one without --overwrite
    check_output_dir(out, overwrite=overwrite, model_source=model, needed_bytes=0, replace=False)
    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    doc = build_report(
        model,
        out,
        corpus=corpus,
        samples=samples,
        seq_len=seq_len,
        model=net,
        tokenizer=tok,
        progress=True,
    )
    if json:
        print_json(doc)
        return
    ppl = doc.get("perplexity") or {}
    print(
        f"wrote {out / 'report.html'} and {out / 'report.json'}"
        + (f" (perplexity {ppl['perplexity']:.2f} on {corpus})" if ppl else "")
    )
