"""Report section: concept neurons, one expandable panel each (vocabulary projection, top contexts), with
a quality flag on weak matches.

For each concept (a word list of :data:`ffnkit.report.inspect_sections.CONCEPTS`) the neuron whose value
vector promotes the words most (``search_neurons``) gets a panel: the tokens it promotes and suppresses
(``project_neurons``, top 10 each) and the calibration contexts where it fires most. The search always
returns *some* neuron, so each is flagged by ``MATCH_RULE``: the share of the concept's words found
among the neuron's top-10 promoted tokens (a token matches a word when they are equal after dropping
leading spaces, case kept: " May" is the month, " may" the verb). "months" → may/might is flagged weak.

Example:
    >>> match_share(["May", "June"], [{"token": " may"}, {"token": " June"}])
    0.5
"""

from __future__ import annotations

from typing import Any

from ffnkit.core.errors import FFNKitError
from ffnkit.report import html
from ffnkit.report.inspect_sections import CONCEPTS

__all__ = ["MATCH_RULE", "TOP_TOKENS", "match_flag", "match_share", "section_concept_panels"]

TOP_TOKENS = 10
CONTEXTS_PER_NEURON = 5
MATCH_RULE = (
    f"share of the concept's words among the neuron's top-{TOP_TOKENS} promoted tokens (leading spaces "
    "dropped, case kept); match ≥ 0.5, partial ≥ 0.25, weak below: the neuron mostly promotes other tokens"
)


def match_share(words: list[str], promoted: list[dict[str, Any]]) -> float:
    """Share of ``words`` present among the ``promoted`` tokens (``MATCH_RULE``).

    Example:
        >>> match_share(["two", "three"], [{"token": " two"}, {"token": "Two"}])
        0.5
    """
    tokens = {str(t["token"]).lstrip(" Ġ▁") for t in promoted[:TOP_TOKENS]}
    return sum(w.strip() in tokens for w in words) / max(len(words), 1)


def match_flag(share: float) -> str:
    """``match`` (≥ 0.5), ``partial`` (≥ 0.25) or ``weak``.

    Example:
        >>> match_flag(1 / 6)
        'weak'
    """
    return "match" if share >= 0.5 else "partial" if share >= 0.25 else "weak"


def _tokens(items: list[dict[str, Any]]) -> str:
    return "".join(f"<span class='tok'>{html.esc(t['token'])}</span>" for t in items[:TOP_TOKENS])


def _contexts(ctx: Any, wanted: dict[int, list[int]]) -> dict[tuple[int, int], list[dict]]:
    from ffnkit.data import calibration_batches
    from ffnkit.inspect.stats import neuron_stats

    if not wanted:
        return {}
    batches = calibration_batches(ctx.corpus, ctx.tokenizer, n_samples=ctx.samples, seq_len=ctx.seq_len)
    stats = neuron_stats(ctx.model, batches, layers=sorted(wanted), contexts=wanted, k=CONTEXTS_PER_NEURON)
    return {
        (r["layer"], r["neuron"]): r["contexts"] for r in stats.contexts(ctx.tokenizer, batches, window=6)
    }


def section_concept_panels(ctx: Any) -> tuple[str, str]:
    """The concept-neuron section: a sortable summary table, then one ``<details>`` panel per concept."""
    from ffnkit.inspect.vocab import project_neurons, search_neurons

    title = "Concept neurons (vocabulary projection)"
    try:
        found = {
            name: search_neurons(ctx.model, ctx.tokenizer, words, top_n=1, top_k=TOP_TOKENS, ffns=ctx.ffns)
            for name, words in CONCEPTS.items()
        }
    except FFNKitError as err:
        ctx.json["concept_neurons"] = {"skipped": str(err)}
        return title, f"<p class='note'>skipped: {html.esc(err)}</p>"
    hits = {name: res.hits[0] for name, res in found.items() if res.hits}
    wanted: dict[int, list[int]] = {}
    for hit in hits.values():
        if hit.get("expert") is None:
            wanted.setdefault(hit["layer"], []).append(hit["neuron"])
    contexts = _contexts(ctx, wanted)
    entries, rows, panels = {}, [], []
    for name, hit in hits.items():
        key = (hit["layer"], hit["neuron"])
        projection = {"promoted": hit["promoted"], "suppressed": []}
        if hit.get("expert") is None:
            proj = project_neurons(
                ctx.model, layers=hit["layer"], neurons=[hit["neuron"]], top_k=TOP_TOKENS,
                tokenizer=ctx.tokenizer, ffns=ctx.ffns,
            )  # fmt: skip
            row = next(proj.rows())
            projection = {"promoted": row["promoted"], "suppressed": row["suppressed"]}
        share = match_share(CONCEPTS[name], projection["promoted"])
        flag = match_flag(share)
        ctxs = contexts.get(key, [])
        entries[name] = {
            **hit,
            "words": CONCEPTS[name],
            "suppressed": projection["suppressed"],
            "match_share": share,
            "quality": flag,
            "contexts": ctxs,
        }
        rows.append(
            {
                "concept": name,
                "layer": hit["layer"],
                "neuron": hit["neuron"],
                "score": hit["score"],
                "match share": share,
                "quality": flag,
                "promoted": " ".join(repr(t["token"]) for t in projection["promoted"][:8]),
            }
        )
        caveat = (
            "<p class='note'>Weak match: this neuron mostly promotes other tokens than the concept's words; "
            "read it as the nearest neuron the search found, not as a concept neuron.</p>"
            if flag == "weak"
            else ""
        )
        items = "".join(
            f"<li>{html.esc(c['text'])} <span class='note'>(m = {c['value']:.3g})</span></li>" for c in ctxs
        )
        panels.append(
            f"<details class='neuron' id='concept-{html.esc(name)}'><summary><b>{html.esc(name)}</b> — layer "
            f"{hit['layer']}, neuron {hit['neuron']} <span class='flag {flag}'>{flag} "
            f"({share:.0%} of the words)</span></summary>{caveat}"
            f"<p>words: {_tokens([{'token': w} for w in CONCEPTS[name]])}</p>"
            f"<p>promotes: {_tokens(projection['promoted'])}</p>"
            f"<p>suppresses: {_tokens(projection['suppressed'])}</p>"
            f"<p>fires most on ({html.esc(ctx.corpus.name)}, calibration split):</p><ul>{items}</ul></details>"
        )
    first = next(iter(found.values()))
    ctx.json["concept_neurons"] = {
        "rule": first.rule,
        "basis": first.basis,
        "match_rule": MATCH_RULE,
        "corpus": ctx.corpus.name,
        "concepts": entries,
    }
    body = (
        f"<p class='note'>Projection basis: {html.esc(first.basis)}. Each concept's best neuron by the "
        f"z-scored search rule; quality: {html.esc(MATCH_RULE)}. Contexts are the calibration positions "
        "with the largest m_i ([[…]] marks the token). Click a row's concept below for its panel.</p>"
        + html.table(rows, ["concept", "layer", "neuron", "score", "match share", "quality", "promoted"])
        + "".join(panels)
    )
    return title, body
