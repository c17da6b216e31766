"""Report section on mixtures of experts.

For an MoE model: routing on the calibration text (:func:`ffnkit.inspect.moe.moe_stats`): a layers ×
experts load heatmap, load imbalance and router entropy per layer, and the vocabulary projection of each
layer's busiest experts. For a dense model: the published moefication frontier
(``benchmarks/results/moe_frontier*.json``, written by the MoE conversion benchmark) when one was
committed, labelled with the machine and command that measured it; otherwise a note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ffnkit.core.errors import FFNKitError
from ffnkit.report import html, plots

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"  # the source tree's results
BUSIEST = 3  # experts per layer whose vocabulary projection the page shows
VOCAB_TOKENS = 8
TITLE = "Mixture of experts"


def _note(text: str) -> str:
    return f"<p class='note'>{html.esc(text)}</p>"


def section_moe(ctx) -> tuple[str, str]:
    """MoE routing statistics (MoE models) or the published moefication frontier (dense models)."""
    if not any(f.kind == "moe" for f in ctx.ffns):
        return _dense_frontier(ctx)
    from ffnkit.data import calibration_batches
    from ffnkit.inspect.moe import expert_vocab, moe_stats

    batches = calibration_batches(
        ctx.corpus, ctx.tokenizer, n_samples=ctx.samples, seq_len=ctx.seq_len, seed=0, progress=ctx.progress
    )
    stats = moe_stats(ctx.model, batches, progress=ctx.progress)
    layers = []
    for row in stats.to_dict()["layers"]:
        row.pop("coselection")  # E × E per layer: `ffnkit moe stats --json` has it
        layers.append(row)
    entry: dict[str, Any] = {
        "calibration": {"samples": ctx.samples, "seq_len": ctx.seq_len, "tokens": stats.n_tokens},
        "definitions": stats.definitions,
        "layers": layers,
    }
    vocab_rows, vocab_note = [], ""
    try:
        for row in layers:
            busiest = sorted(range(row["experts"]), key=lambda e: -row["load"][e])[:BUSIEST]
            vocab = expert_vocab(
                ctx.model, ctx.tokenizer, layers=[row["layer"]], experts=busiest, top_k=VOCAB_TOKENS
            )
            for v in vocab.experts:
                vocab_rows.append({**v, "load": row["load"][v["expert"]]})
        entry["busiest_experts"] = {"basis": vocab.basis, "experts": vocab_rows}
    except FFNKitError as err:  # encoder-only models have no unembedding
        entry["busiest_experts"] = {"skipped": str(err)}
        vocab_note = _note(f"vocabulary projection skipped: {err}")
    ctx.json["moe"] = entry
    table = [
        {
            "layer": r["layer"],
            "experts": r["experts"],
            "top_k": r["top_k"],
            "entropy / ln E": r["entropy"]["mean_normalised"],
            "max/mean load": r["imbalance"]["max_over_mean"],
            "cv of load": r["imbalance"]["cv"],
            "shared gate": "" if r["shared_gate"] is None else r["shared_gate"],
        }
        for r in layers
    ]
    vocab_table = [
        {
            "layer": v["layer"],
            "expert": v["expert"],
            "load": v["load"],
            "promoted (mean value vector)": " ".join(repr(t["token"]) for t in v["promoted"]),
        }
        for v in vocab_rows
    ]
    body = (
        _note(
            f"Routing of {stats.n_tokens} calibration tokens of {ctx.corpus.name}. Load = share of tokens whose "
            "top-k holds the expert (sums to k); imbalance = max/mean of the load and its coefficient of "
            "variation; entropy of the router's softmax over experts, divided by ln E (1 = uniform)."
        )
        + html.image(plots.expert_load_heatmap(layers, ctx.out_dir / "moe_load.png"), "expert load")
        + html.image(plots.router_balance(layers, ctx.out_dir / "moe_balance.png"), "router balance")
        + html.table(table, list(table[0]))
        + (
            _note(
                f"The {BUSIEST} busiest experts of each layer: tokens promoted by their mean value vector "
                "(vocabulary projection through the final norm's gain)."
            )
            + html.table(vocab_table, list(vocab_table[0]))
            if vocab_table
            else vocab_note
        )
    )
    return TITLE, body


def published_frontiers(results: Path | None = None) -> list[tuple[str, dict]]:
    """(file name, document) of every committed ``moe_frontier*.json``, sorted by name.

    Example:
        >>> [name for name, _ in published_frontiers()]      # e.g. ['moe_frontier_cpu.json']
    """
    folder = RESULTS if results is None else results
    out = []
    for path in sorted(folder.glob("moe_frontier*.json")) if folder.is_dir() else []:
        try:
            out.append((path.name, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # a broken file is not a frontier
    return out


def _machine(doc: dict) -> str:
    env = doc.get("environment") if isinstance(doc.get("environment"), dict) else {}
    machine = doc.get("machine", env.get("machine", env.get("device", env.get("gpu"))))
    if isinstance(machine, dict):
        machine = ", ".join(f"{k}: {v}" for k, v in machine.items() if isinstance(v, str | int | float))
    return str(machine) if machine else "machine not recorded"


def frontier_curves(doc: dict) -> tuple[dict[str, dict[float, float]], float | None]:
    """label (split/router) -> {active share: perplexity}, and the dense perplexity, from a frontier
    document whose rows carry an active share (``active``/``active_fraction``/``active_share``) and
    ``perplexity``.

    Example:
        >>> frontier_curves({"results": [{"split": "kmeans", "active": 0.5, "perplexity": 40.0}]})
        ({'kmeans': {0.5: 40.0}}, None)
    """
    curves: dict[str, dict[float, float]] = {}
    rows = doc.get("results", doc.get("frontier", []))
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        x = next((row[k] for k in ("active", "active_fraction", "active_share") if k in row), None)
        y = row.get("perplexity")
        if not isinstance(x, int | float) or not isinstance(y, int | float):
            continue
        label = "/".join(
            str(row[k]) for k in ("label", "split", "router", "method") if isinstance(row.get(k), str)
        ) + ("+refit" if row.get("refit") is True else "")  # refitted and plain rows of one plan
        curves.setdefault(label or "moefied", {})[float(x)] = float(y)
    dense = doc.get("dense")
    dense_ppl = dense.get("perplexity") if isinstance(dense, dict) else dense
    return curves, float(dense_ppl) if isinstance(dense_ppl, int | float) else None


def _dense_frontier(ctx) -> tuple[str, str]:
    docs = [(n, d) for n, d in published_frontiers() if d.get("model") in (None, ctx.model_name)]
    docs = [(n, d, *frontier_curves(d)) for n, d in docs]
    docs = [x for x in docs if x[2]]
    if not docs:
        ctx.json["moe"] = None
        return TITLE, _note(
            "Dense model: no published moefication frontier for it (benchmarks/results/moe_frontier*.json). "
            "Convert it with `ffnkit moe convert MODEL --active F -o DIR` and measure with `ffnkit eval DIR`."
        )
    parts, entry = [], []
    for name, doc, curves, dense in docs:
        machine, command = _machine(doc), doc.get("command")
        entry.append(
            {
                "file": f"benchmarks/results/{name}",
                "machine": machine,
                "command": command,
                "dense": dense,
                "curves": curves,
            }
        )
        shares = sorted({x for points in curves.values() for x in points})
        rows = [
            {"split/router": k, **{f"{100 * s:g}%": p.get(s, "") for s in shares}}
            for k, p in sorted(curves.items())
        ]
        img = plots.moe_frontier(curves, dense, ctx.out_dir / f"{Path(name).stem}.png")
        parts.append(
            _note(
                f"Published result, not measured for this report: benchmarks/results/{name}, measured on "
                f"{machine}"
                + (f" with `{command}`" if command else "")
                + (f"; dense perplexity {dense:.2f}." if dense else ".")
            )
            + html.image(img, "moefication frontier")
            + html.table(rows, list(rows[0]))
        )
    ctx.json["moe"] = {"published_frontiers": entry}
    return TITLE, "".join(parts)
