"""Report section: the quality-vs-compression frontier of the main methods.

Measuring the frontier takes about an hour on two CPU cores (benchmarks/compress_frontier.py,
benchmarks/compress_lowrank.py), far too long for a report, so the section shows the committed results
of those benchmarks, marked "published in benchmarks/results (machine …)", only when they exist (a
source checkout: ``pip install`` does not ship them), the report is about the model they measured, and
the report's corpus is the one they were measured on (so every number of a report is on one corpus).
Otherwise the section is skipped with a note saying why and how to get it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ffnkit.report import html

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"  # the source tree's results
# same protocol in each (perplexity does not depend on the device); a label's first file wins
FILES = ("compress_frontier_cpu.json", "compress_frontier_sensitivity_h200.json", "compress_lowrank.json")


def _corpus_of(doc: dict) -> str | None:
    """The evaluation corpus a benchmark file measured perplexity on."""
    evaluation = doc.get("evaluation")
    if isinstance(evaluation, dict) and evaluation.get("corpus"):
        return str(evaluation["corpus"])
    protocol = doc.get("protocol")
    if isinstance(protocol, dict) and protocol.get("corpus"):
        return str(protocol["corpus"]).split()[0]  # "austen (evaluation split: ...)"
    return None


def _machine(doc: dict) -> str:
    env = doc.get("environment") or {}
    return str(env.get("device_name") or f"{env.get('cpu_count')} CPU cores, torch {env.get('torch')}")


def _curves(
    corpus: str | None = None,
) -> tuple[dict[str, dict[float, float]], dict | None, list[str], dict[str, str]]:
    """label -> {ratio: perplexity}, the dense result, the files read and file -> machine (only files
    measured on ``corpus`` when given)."""
    curves: dict[str, dict[float, float]] = defaultdict(dict)
    dense, read, machines = None, [], {}
    for name in FILES:
        path = RESULTS / name
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        if corpus is not None and _corpus_of(doc) != corpus:
            continue
        read.append(name)
        machines[name] = _machine(doc)
        for row in doc.get("results", []):
            curves[row["label"]].setdefault(row["ratio"], row["perplexity"])
        for row in doc.get("lowrank", []):
            curves[row["method"]].setdefault(row["ratio"], row["perplexity"])
        if isinstance(doc.get("dense"), dict) and dense is None:
            dense = doc["dense"]
    return dict(curves), dense, read, machines


def _plot(curves: dict[str, dict[float, float]], dense_ppl: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: more curves than the default cycle has
    for i, (label, points) in enumerate(sorted(curves.items())):
        xs = sorted(points)
        best = label == "flap/sensitivity+refit"  # ffnkit's ``best`` (compress.prune.BEST)
        ax.plot(
            [100 * x for x in xs],
            [points[x] for x in xs],
            marker="os^Dv<>p"[i % 8],
            color="black" if best else colors[i % len(colors)],
            label=f"{label} (best)" if best else label,
            lw=2.5 if best else 1.2,
            ms=4,
        )
    ax.axhline(dense_ppl, color="black", ls=":", label=f"dense = dequantised 4-bit GGUF ({dense_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_ylim(dense_ppl * 0.9, dense_ppl * 40)
    ax.set_xlabel("FFN parameters removed (%)")
    ax.set_ylabel("perplexity (Persuasion, log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section_frontier(ctx) -> tuple[str, str]:
    from ffnkit.sources.models import DEQUANTISED_NOTE

    title = "Compression frontier"
    corpus = getattr(ctx.corpus, "name", None)
    measure = (
        "Measure it with <code>python benchmarks/compress_frontier.py --model MODEL</code> (a source "
        "checkout), or one point with <code>ffnkit compress MODEL --method M --ratio R -o DIR --json</code>."
    )
    if ctx.model_name != "smollm2-135m":
        ctx.json["frontier"] = {"skipped": "published for smollm2-135m only"}
        return title, f"<p class='note'>Skipped: a frontier is published for smollm2-135m only. {measure}</p>"
    if not RESULTS.is_dir() or not any((RESULTS / f).is_file() for f in FILES):
        ctx.json["frontier"] = {"skipped": "benchmark results not installed"}
        return title, (
            "<p class='note'>Skipped: the published frontier lives in <code>benchmarks/results/</code> of "
            f"ffnkit's source tree, which <code>pip install</code> does not ship. {measure}</p>"
        )
    curves, dense, read, machines = _curves(corpus)
    if not curves or dense is None:
        ctx.json["frontier"] = {"skipped": f"no published frontier on corpus {corpus}"}
        return title, (
            f"<p class='note'>Skipped: the published frontier was measured on <b>austen</b> (Persuasion), "
            f"and this report's numbers are on <b>{html.esc(corpus)}</b>; one report, one corpus. Run "
            "<code>ffnkit report smollm2-135m --corpus austen</code> to see it here. "
            f"{measure}</p>"
        )
    where = "; ".join(f"benchmarks/results/{f} (machine: {machines[f]})" for f in read)
    ctx.json["frontier"] = {
        "source": "published",
        "files": [f"benchmarks/results/{f}" for f in read],
        "machines": machines,
        "corpus": corpus,
        "dense": dense,
        "dense_note": DEQUANTISED_NOTE,
        "curves": curves,
    }
    ratios = sorted({r for points in curves.values() for r in points})
    rows = [
        {"method": label, **{f"{100 * r:.0f}%": points.get(r, "") for r in ratios}}
        for label, points in sorted(curves.items(), key=lambda kv: kv[1].get(0.3, float("inf")))
    ]
    img = _plot(curves, dense["perplexity"], ctx.out_dir / "frontier.png")
    return title, (
        f"<p class='note'><b>Published in benchmarks/results, not measured by this report</b>: "
        f"{html.esc(where)}. Perplexity of the last 4,096 tokens of Austen's <i>Persuasion</i> in 512-token "
        f"windows, no healing; dense {dense['perplexity']:.2f}, where dense = {html.esc(DEQUANTISED_NOTE)}. "
        "Rerun with <code>python benchmarks/compress_frontier.py</code>.</p>"
        + html.image(img, "compression frontier")
        + html.table(rows, ["method"] + [f"{100 * r:.0f}%" for r in ratios])
    )
