"""Report section: the quality-versus-sparsity frontier of every activation-sparsity rule.

Measuring it takes far too long for a report (benchmarks/sparsity_frontier.py), so the section shows the
committed result file when the report is about the model it measured, and says where it was published
and on which machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from ffnkit.report import html

_RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
# The H200 frontier of every rule; the later files re-measured stat-topk after its fix, added the 65 and
# 80% levels (with best+heal) that the first run's time limit cut, and re-measured every rule with best's
# W_out refit (beside best[no refit]); later files' rows win.
RESULT = _RESULTS / "sparsity_frontier_h200.json"
RESULT_FIXES = (
    _RESULTS / "sparsity_frontier_stat_h200.json",
    _RESULTS / "sparsity_frontier_high_h200.json",
    _RESULTS / "sparsity_frontier_refit_h200.json",
)


def published_frontier() -> dict:
    """The committed frontier document, rows of :data:`RESULT_FIXES` replacing the same (rule, level).

    Example:
        >>> len(published_frontier()["results"]) > 0
        True
    """
    doc = json.loads(RESULT.read_text())
    rows = {(r["rule"], r["sparsity"]): r for r in doc.get("results", [])}
    for path in RESULT_FIXES:
        if path.is_file():
            rows.update(
                {(r["rule"], r["sparsity"]): r for r in json.loads(path.read_text()).get("results", [])}
            )
    return {**doc, "results": list(rows.values())}


def frontier_rows(doc: dict, corpus: str) -> tuple[list[dict], list[str]]:
    """Table rows (one per rule) of perplexity × dense and held-out bytes skipped at each level.

    Example:
        >>> rows, columns = frontier_rows(json.loads(RESULT.read_text()), "austen")
    """
    levels = sorted({r["sparsity"] for r in doc.get("results", [])})
    columns = [f"{100 * lv:.0f}%" for lv in levels]
    rows: dict[str, dict] = {}
    for r in doc.get("results", []):
        row = rows.setdefault(r["rule"], {"rule": r["rule"]})
        ev = r.get("evaluation", {}).get(corpus)
        cell = (
            "n/a"
            if ev is None
            else f"{ev['perplexity']:.2f} (×{ev['perplexity_vs_dense']:.3f}, {ev['bytes_skipped']:.0%})"
        )
        row[f"{100 * r['sparsity']:.0f}%"] = cell
    return list(rows.values()), columns


def section_sparsity(ctx) -> tuple[str, str]:
    """(heading, html) of the sparsity frontier, from the committed benchmark JSON."""
    title = "Activation sparsity frontier"
    if ctx.model_name != "smollm2-135m" or not RESULT.is_file():
        ctx.json["sparsity_frontier"] = None
        return title, (
            "<p class='note'>Published for smollm2-135m only. Measure one point with "
            "<code>ffnkit sparsify MODEL --rule best --sparsity 0.4 -o DIR --json</code>.</p>"
        )
    doc = published_frontier()
    corpus = next(iter(doc.get("dense", {}).get("perplexity", {"austen": None})))
    rows, columns = frontier_rows(doc, corpus)
    env = doc.get("environment", {})
    files = [f"benchmarks/results/{p.name}" for p in (RESULT, *RESULT_FIXES) if p.is_file()]
    vs_dense: dict = {}  # corpus -> level -> rule -> perplexity x dense, from the merged rows
    for r in doc["results"]:
        for c, ev in r.get("evaluation", {}).items():
            vs_dense.setdefault(c, {}).setdefault(str(r["sparsity"]), {})[r["rule"]] = ev[
                "perplexity_vs_dense"
            ]
    # later files' rows replace the same (rule, level) of earlier ones
    ctx.json["sparsity_frontier"] = {"files": files, "vs_dense": vs_dense}
    machine = f"{env.get('processor') or env.get('machine')}, {env.get('threads')} threads, torch {env.get('torch')}"
    return title, (
        f"<p class='note'>Published in {html.esc(', '.join(files))}, later files' rows replacing the same rule "
        f"and level (machine: {html.esc(machine)}; "
        f"complete: {html.esc(doc.get('complete'))}). Perplexity on {html.esc(corpus)} "
        f"({html.esc(doc['evaluation'][corpus]['tokens'])} tokens, 512-token windows; dense "
        f"{doc['dense']['perplexity'][corpus]:.2f}), × dense, and the share of FFN weight bytes a decode step "
        "skips, measured on the same text. Columns: the target share.</p>"
        + html.table(rows, ["rule", *columns])
    )
