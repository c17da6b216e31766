"""Report section: the quality-vs-compression frontier of the main methods.

Measuring the frontier takes about an hour on two CPU cores (benchmarks/compress_frontier.py,
benchmarks/compress_lowrank.py), far too long for a report, so the section shows the committed results
of those benchmarks when the report is about the model they measured, and says how to rerun them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ffnkit.report import html

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"  # the source tree's results
# same protocol in each (perplexity does not depend on the device); a label's first file wins
FILES = ("compress_frontier_cpu.json", "compress_frontier_sensitivity_h200.json", "compress_lowrank.json")


def _curves() -> tuple[dict[str, dict[float, float]], dict | None, list[str]]:
    """label -> {ratio: perplexity}, the dense result, and the files read."""
    curves: dict[str, dict[float, float]] = defaultdict(dict)
    dense, read = None, []
    for name in FILES:
        path = RESULTS / name
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        read.append(name)
        for row in doc.get("results", []):
            curves[row["label"]].setdefault(row["ratio"], row["perplexity"])
        for row in doc.get("lowrank", []):
            curves[row["method"]].setdefault(row["ratio"], row["perplexity"])
        if isinstance(doc.get("dense"), dict) and dense is None:
            dense = doc["dense"]
    return dict(curves), dense, read


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
    ax.axhline(dense_ppl, color="black", ls=":", label=f"dense ({dense_ppl:.1f})")
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
    title = "Compression frontier"
    curves, dense, read = _curves()
    if ctx.model_name != "smollm2-135m" or not curves or dense is None:
        ctx.json["frontier"] = None
        return title, (
            "<p class='note'>Published frontiers exist for smollm2-135m only. Measure this model's with "
            "<code>python benchmarks/compress_frontier.py --model MODEL</code>, or one point with "
            "<code>ffnkit compress MODEL --method M --ratio R -o DIR --json</code>.</p>"
        )
    ctx.json["frontier"] = {
        "files": [f"benchmarks/results/{f}" for f in read],
        "dense": dense,
        "curves": curves,
    }
    ratios = sorted({r for points in curves.values() for r in points})
    rows = [
        {"method": label, **{f"{100 * r:.0f}%": points.get(r, "") for r in ratios}}
        for label, points in sorted(curves.items(), key=lambda kv: kv[1].get(0.3, float("inf")))
    ]
    img = _plot(curves, dense["perplexity"], ctx.out_dir / "frontier.png")
    return title, (
        f"<p class='note'>From the committed benchmark results ({html.esc(', '.join(read))}): perplexity of the last "
        f"4,096 tokens of Austen's <i>Persuasion</i> in 512-token windows, no healing; dense "
        f"{dense['perplexity']:.2f}. Rerun with <code>python benchmarks/compress_frontier.py</code>.</p>"
        + html.image(img, "compression frontier")
        + html.table(rows, ["method"] + [f"{100 * r:.0f}%" for r in ratios])
    )
