"""Report sections from ``ffnkit.inspect``: the concept word lists (their section is
``report/concepts_section.py``), spectral utilisation, and sublayer importance (ShortGPT block influence, FinerCut's first greedy steps).

Each section degrades to a note where a method does not apply (encoder-only models have no unembedding,
MoE layers have no per-neuron activations).
"""

from __future__ import annotations

from ffnkit.core.errors import FFNKitError
from ffnkit.report import html

# Word lists whose promoting neurons make good examples: each is a concept a reader recognises at once.
CONCEPTS: dict[str, list[str]] = {
    "numbers": ["two", "three", "four", "five", "six", "seven"],
    "weekdays": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
    "months": ["January", "February", "March", "April", "May", "June"],
    "colours": ["red", "blue", "green", "yellow", "black", "white"],
    "family": ["mother", "father", "brother", "sister", "son", "daughter"],
}
FINERCUT_STEPS = 3


def _note(text: str) -> str:
    return f"<p class='note'>{html.esc(text)}</p>"


def section_spectral(ctx) -> tuple[str, str]:
    from ffnkit.data import calibration_batches
    from ffnkit.inspect.spectral import plot_spectral, spectral_utilisation

    title = "Spectral utilisation"
    batches = calibration_batches(ctx.corpus, ctx.tokenizer, n_samples=ctx.samples, seq_len=ctx.seq_len)
    try:
        result = spectral_utilisation(ctx.model, batches, layers_per_pass=8, progress=ctx.progress)
    except FFNKitError as err:
        ctx.json["spectral"] = {"skipped": str(err)}
        return title, _note(f"skipped: {err}")
    ctx.json["spectral"] = result.to_dict()
    img = plot_spectral(result, ctx.out_dir / "spectral.png")
    formulas = "".join(f"<li><b>{html.esc(k)}</b>: {html.esc(v)}</li>" for k, v in result.formulas.items())
    cols = ["layer", "hard_rank", "soft_rank", "utilisation", "lambda_max_share", "top1pct_share"]
    return title, (
        _note(
            f"Eigenvalues of the covariance of m (site post) over {ctx.samples * ctx.seq_len} calibration "
            "tokens; with fewer tokens than neurons the ranks are lower bounds."
        )
        + html.image(img, "spectral utilisation")
        + f"<ul class='note'>{formulas}</ul>"
        + html.table(result.layers, cols)
    )


def section_importance(ctx) -> tuple[str, str]:
    from ffnkit.data import calibration_batches
    from ffnkit.inspect.importance import block_influence, finercut, plot_importance

    title = "Sublayer importance"
    batches = calibration_batches(ctx.corpus, ctx.tokenizer, n_samples=min(ctx.samples, 4), seq_len=128)
    try:
        bi = block_influence(ctx.model, batches)
    except FFNKitError as err:
        ctx.json["importance"] = {"skipped": str(err)}
        return title, _note(f"skipped: {err}")
    body = _note("ShortGPT block influence BI = 1 − mean cos(x_in, x_out) per block (low = removable).")
    body += html.image(plot_importance(bi, ctx.out_dir / "block_influence.png"), "block influence")
    entry = {"shortgpt": bi.to_dict()}
    try:
        fc = finercut(ctx.model, batches[:1], steps=FINERCUT_STEPS)
        entry["finercut"] = fc.to_dict()
        body += _note(
            f"FinerCut's first {FINERCUT_STEPS} greedy removals (JS divergence of next-token distributions, "
            "nats); the full order: ffnkit inspect importance MODEL --method finercut."
        )
        body += html.table(fc.order, ["step", "name", "js"])
    except FFNKitError as err:
        entry["finercut"] = {"skipped": str(err)}
        body += _note(f"FinerCut skipped: {err}")
    ctx.json["importance"] = entry
    return title, body
