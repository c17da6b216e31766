"""``ffnkit report``: one HTML page plus JSON describing a model's FFNs.

Sections: the model's FFN table, where the parameters are, per-layer firing rates and activation
sparsity on calibration text, and perplexity on the corpus' evaluation split. Later capabilities add
sections with ``SECTIONS.register(name, fn)``: a function (context) -> (heading, html) that may also
write into ``context["json"]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ffnkit.core.archs import find_ffns, resolve_spec
from ffnkit.core.criteria import ACTIVE_RULE
from ffnkit.core.ffn import FFN
from ffnkit.core.progress import ProgressLike
from ffnkit.core.registry import Registry
from ffnkit.core.runner import is_causal_lm
from ffnkit.report import html, plots
from ffnkit.report.concepts_section import section_concept_panels
from ffnkit.report.frontier import section_frontier
from ffnkit.report.inspect_sections import section_importance, section_spectral
from ffnkit.report.sparsity_section import section_sparsity
from ffnkit.report.stats import SPARSITY_EPS, activation_stats


@dataclass
class ReportContext:
    model_name: str
    model: nn.Module
    tokenizer: object
    ffns: list[FFN]
    corpus: object | None
    out_dir: Path
    samples: int
    seq_len: int
    progress: ProgressLike
    json: dict = field(default_factory=dict)


def section_overview(ctx: ReportContext) -> tuple[str, str]:
    from ffnkit.evaluate import count_parameters, environment

    spec = resolve_spec(ctx.model)
    counts = count_parameters(ctx.model, ctx.ffns)
    attention = sum(
        p.numel()
        for name, mod in ctx.model.named_modules()
        if spec.attn and name.endswith("." + spec.attn)
        for p in mod.parameters()
    )
    parts = {
        "embeddings": counts["embedding"],
        "attention": attention,
        "FFN": counts["ffn"],
        "other (norms, pooler)": max(counts["total"] - counts["embedding"] - attention - counts["ffn"], 0),
    }
    kinds = sorted({f.kind for f in ctx.ffns})
    overview = {
        "model": ctx.model_name,
        "family": ctx.ffns[0].family,
        "ffns": len(ctx.ffns),
        "kinds": ", ".join(kinds),
        "d_model": ctx.ffns[0].d_model,
        "parameters": counts["total"],
        "ffn_parameters": counts["ffn"],
        "ffn_share": counts["ffn_share"],
        "ffn_share_non_embedding": counts.get("ffn_share_non_embedding"),
    }
    ctx.json.update(overview=overview, parameters=parts, environment=environment())
    img = plots.parameter_breakdown(parts, ctx.out_dir / "parameters.png")
    return "Overview", html.key_values(overview) + html.image(img, "parameters by part")


def section_ffn_table(ctx: ReportContext) -> tuple[str, str]:
    rows = [f.describe() for f in ctx.ffns]
    ctx.json["ffns"] = rows
    cols = ["index", "name", "kind", "d_model", "d_ff", "activation", "params", "flops_per_token"]
    if any(f.kind == "moe" for f in ctx.ffns):
        cols += ["experts", "top_k", "shared_expert_d_ff"]
    return "FFN blocks", html.table(rows, cols)


def section_activations(ctx: ReportContext) -> tuple[str, str]:
    from ffnkit.data import calibration_batches

    batches = calibration_batches(
        ctx.corpus, ctx.tokenizer, n_samples=ctx.samples, seq_len=ctx.seq_len, seed=0
    )
    rows = activation_stats(ctx.model, ctx.ffns, batches, progress=ctx.progress)
    ctx.json["activations"] = {
        "calibration": {"samples": ctx.samples, "seq_len": ctx.seq_len, "tokens": ctx.samples * ctx.seq_len},
        "definitions": {
            "firing": f"a neuron fires on a token when it is active: {ACTIVE_RULE}, threshold 0.1",
            "activation_sparsity[eps]": "share of entries of m (the input of W_out) that are not active at "
            "threshold eps: |m_i| <= eps * mean_j |m_j| on their token, read off a histogram of "
            "log10(|m_i| / mean_j |m_j|)",
        },
        "layers": rows,
    }
    dense = [r for r in rows if "mean_firing_rate" in r]
    if not dense:
        return (
            "Activations",
            "<p class='note'>Every FFN is a mixture of experts; per-neuron statistics skipped.</p>",
        )
    cols = ["index", "mean_firing_rate", "dead_neurons", "always_on_neurons", "mean_abs_m"]
    table_rows = [
        {**r, **{f"sparsity@{e:g}": r["activation_sparsity"][f"{e:g}"] for e in SPARSITY_EPS}} for r in dense
    ]
    cols += [f"sparsity@{e:g}" for e in SPARSITY_EPS]
    body = (
        f"<p class='note'>{ctx.samples} × {ctx.seq_len} calibration tokens of <b>{html.esc(ctx.corpus.name)}</b>. "
        "A neuron <i>fires</i> on a token when |m<sub>i</sub>| exceeds 0.1 × the layer's mean |m| on that "
        "token; sparsity@ε is the share of entries of m at most ε × that mean.</p>"
        + html.image(plots.sparsity_by_layer(dense, ctx.out_dir / "sparsity.png"), "sparsity by layer")
        + html.image(
            plots.firing_rate_heatmap(dense, ctx.out_dir / "firing_rates.png"), "firing-rate histograms"
        )
        + html.table(table_rows, cols)
    )
    return "Activations", body


def section_perplexity(ctx: ReportContext) -> tuple[str, str]:
    from ffnkit.data import evaluation_tokens
    from ffnkit.evaluate import perplexity

    if not is_causal_lm(ctx.model):
        ctx.json["perplexity"] = None
        return "Perplexity", "<p class='note'>Not a causal language model: perplexity does not apply.</p>"
    tokens = evaluation_tokens(ctx.corpus, ctx.tokenizer)
    result = perplexity(ctx.model, tokens, progress=ctx.progress)
    entry = {"perplexity": result.perplexity, "protocol": result.protocol, "split": ctx.corpus.split_info()}
    ctx.json["perplexity"] = entry
    from ffnkit.sources.models import MODELS

    note = MODELS.entry(ctx.model_name).meta.get("dense_note") if ctx.model_name in MODELS else None
    entry["dense_note"] = note  # the default model's "dense" numbers are of the dequantised 4-bit GGUF
    return "Perplexity", html.key_values({"perplexity": result.perplexity, **result.protocol}) + (
        f"<p class='note'>Evaluation split of <b>{html.esc(ctx.corpus.name)}</b>: "
        f"{html.esc(', '.join(ctx.corpus.evaluation_docs))}.{' Dense = ' + html.esc(note) + '.' if note else ''}</p>"
    )


# section name -> function (context) -> (heading, html), in page order; a section may also write into
# ctx.json. Add one with SECTIONS.register("name", fn) (or a lazy "module:function" string).
SECTIONS: Registry[Callable[[ReportContext], tuple[str, str]]] = Registry("report section")
SECTIONS.register("overview", section_overview, help="model, family, parameter share")
SECTIONS.register("ffn_table", section_ffn_table, help="every FFN: widths, activation, parameters")
SECTIONS.register("activations", section_activations, help="firing rates and sparsity on calibration text")
SECTIONS.register(
    "concept_neurons", section_concept_panels, help="neurons that promote concept words, a panel each"
)
SECTIONS.register("spectral", section_spectral, help="spectral utilisation of the FFN matrices")
SECTIONS.register("importance", section_importance, help="block influence and FinerCut order")
SECTIONS.register("perplexity", section_perplexity, help="perplexity on the evaluation split")
SECTIONS.register("frontier", section_frontier, help="the compression frontier of the benchmarks")
SECTIONS.register(
    "moe", "ffnkit.report.moe_section:section_moe", help="expert routing, or the moefication frontier"
)
SECTIONS.register("sparsity", section_sparsity, help="the activation-sparsity frontier of the benchmarks")


def build_report(
    model_name: str = "smollm2-135m",
    out_dir: str | Path = "ffnkit-report",
    *,
    corpus: str = "shakespeare",
    samples: int = 16,
    seq_len: int = 256,
    model: nn.Module | None = None,
    tokenizer=None,
    progress: ProgressLike = True,
) -> dict:
    """Write ``report.html`` and ``report.json`` (plus the PNGs) into out_dir; return the JSON.

    Example:
        >>> build_report("smollm2-135m", "ffnkit-report")["perplexity"]["perplexity"]
    """
    from ffnkit.data import load_corpus
    from ffnkit.sources.models import load_model

    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = load_model(model_name)
    ctx = ReportContext(
        model_name=model_name,
        model=model,
        tokenizer=tokenizer,
        ffns=find_ffns(model),
        corpus=load_corpus(corpus),
        out_dir=out,
        samples=samples,
        seq_len=seq_len,
        progress=progress,
    )
    with torch.no_grad():
        sections = [section(ctx) for _, section in SECTIONS.items()]
    ctx.json["seconds"] = round(time.time() - start, 1)
    (out / "report.json").write_text(json.dumps(ctx.json, indent=2, default=str))
    (out / "report.html").write_text(html.page(f"ffnkit report: {model_name}", sections))
    return ctx.json
