"""Matplotlib figures for the report, written as PNG files (small, committed-size)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no screen: render to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parameter_breakdown(parts: dict[str, int], path: Path) -> Path:
    """Horizontal bar of parameters by part of the model (embeddings, attention, FFN, other)."""
    fig, ax = plt.subplots(figsize=(7, 2.2))
    total = sum(parts.values())
    left = 0
    colours = ["#8da0cb", "#fc8d62", "#66c2a5", "#e5c494", "#b3b3b3"]
    for (name, n), colour in zip(parts.items(), colours, strict=False):
        ax.barh([0], [n], left=left, color=colour, label=f"{name} ({100 * n / total:.1f}%)")
        left += n
    ax.set_yticks([])
    ax.set_xlabel("parameters")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(parts), frameon=False, fontsize=8)
    return _save(fig, path)


def sparsity_by_layer(rows: list[dict], path: Path) -> Path:
    """Per layer: mean firing rate and activation sparsity at each ε."""
    rows = [r for r in rows if "mean_firing_rate" in r]
    x = [r["index"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(x, [r["mean_firing_rate"] for r in rows], "o-", color="black", label="mean firing rate")
    for eps in rows[0]["activation_sparsity"]:
        ax.plot(
            x,
            [r["activation_sparsity"][eps] for r in rows],
            ".--",
            label=f"share inactive at {eps} (|m| ≤ {eps}·mean|m|)",
        )
    ax.set_xlabel("FFN (layer)")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def firing_rate_heatmap(rows: list[dict], path: Path) -> Path:
    """Layers × firing-rate bins: how many neurons of each layer fire at each rate."""
    rows = [r for r in rows if "firing_rate_histogram" in r]
    grid = np.array([r["firing_rate_histogram"] for r in rows], dtype=float)  # [layers, bins]
    grid = grid / grid.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(7, 0.18 * len(rows) + 1.4))
    im = ax.imshow(
        grid, aspect="auto", cmap="viridis", extent=(0, 1, rows[-1]["index"] + 0.5, rows[0]["index"] - 0.5)
    )
    ax.set_xlabel("firing rate (share of tokens on which the neuron fires)")
    ax.set_ylabel("FFN (layer)")
    fig.colorbar(im, ax=ax, label="share of the layer's neurons")
    return _save(fig, path)


def expert_load_heatmap(rows: list[dict], path: Path) -> Path:
    """MoE layers × experts: each expert's load relative to a perfectly balanced router (1 = its fair
    share top_k / E; rows are ``moe_stats(...).to_dict()["layers"]``)."""
    grid = np.array([[v * r["experts"] / r["top_k"] for v in r["load"]] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(rows) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [str(r["layer"]) for r in rows], fontsize=7)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("FFN (layer)")
    fig.colorbar(im, ax=ax, label="load / fair share")
    return _save(fig, path)


def router_balance(rows: list[dict], path: Path) -> Path:
    """Per MoE layer: load imbalance (max/mean, coefficient of variation) and normalised router entropy."""
    x = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(x, [r["imbalance"]["max_over_mean"] for r in rows], "o-", label="max load / mean load")
    ax.plot(x, [r["imbalance"]["cv"] for r in rows], "s--", label="coefficient of variation of load")
    ax.plot(x, [r["entropy"]["mean_normalised"] for r in rows], "^:", label="router entropy / ln E")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("FFN (layer)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def moe_frontier(curves: dict[str, dict[float, float]], dense: float | None, path: Path) -> Path:
    """Perplexity against the share of FFN neurons active per token, one curve per split/router."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, points in sorted(curves.items()):
        xs = sorted(points)
        ax.plot([100 * v for v in xs], [points[v] for v in xs], "o-", ms=4, label=label)
    if dense is not None:
        ax.axhline(dense, color="black", ls=":", label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("FFN neurons active per token (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
