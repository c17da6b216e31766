"""``ffnkit report MODEL -o DIR``: the self-contained HTML page and its JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ffnkit.cli.common import CorpusOpt, JsonOpt, ModelArg, print_json


def report(
    model: ModelArg = "smollm2-135m",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for report.html, report.json, PNGs.")
    ] = Path("ffnkit-report"),
    corpus: CorpusOpt = "shakespeare",
    samples: Annotated[int, typer.Option(help="Calibration sequences for activation statistics.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    json: JsonOpt = False,
) -> None:
    """Write an HTML report of MODEL's FFNs: table, parameter share, sparsity, firing rates, perplexity."""
    from ffnkit.report import build_report

    doc = build_report(model, out, corpus=corpus, samples=samples, seq_len=seq_len, progress=not json)
    if json:
        print_json(doc)
        return
    ppl = doc.get("perplexity") or {}
    print(
        f"wrote {out / 'report.html'} and {out / 'report.json'}"
        + (f" (perplexity {ppl['perplexity']:.2f} on {corpus})" if ppl else "")
    )
