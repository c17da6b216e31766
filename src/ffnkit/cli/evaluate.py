"""``ffnkit eval MODEL --corpus NAME``: perplexity under the documented protocol (and optional speed)."""

from __future__ import annotations

from typing import Annotated

import typer

from ffnkit.cli.common import CorpusOpt, JsonOpt, ModelArg, TrustRemoteCodeOpt, print_json, print_table


def eval_(
    model: ModelArg = "smollm2-135m",
    corpus: CorpusOpt = "shakespeare",
    window: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[int | None, typer.Option(help="Window stride (default: window, no overlap).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Score the last N tokens of the evaluation split.")] = 4096,
    speed: Annotated[bool, typer.Option("--speed", help="Also measure decode speed (batch 1).")] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Perplexity of MODEL on the evaluation split of a corpus (JSON has the protocol and the split)."""
    from ffnkit.core.archs import find_ffns
    from ffnkit.data import evaluation_tokens, load_corpus
    from ffnkit.evaluate import count_parameters, decode_speed, environment, perplexity
    from ffnkit.sources.models import load_model

    net, tok = load_model(model, trust_remote_code=trust_remote_code)
    text = load_corpus(corpus)
    tokens = evaluation_tokens(text, tok, max_tokens=max_tokens)
    result = perplexity(net, tokens, window=window, stride=stride, progress=not json)
    doc = {
        "model": model,
        "corpus": text.name,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "protocol": result.protocol,
        "split": text.split_info(),
        "parameters": count_parameters(net, find_ffns(net)),
        "environment": environment(),
    }
    if speed:
        doc["decode_speed"] = decode_speed(net, tok)
    if json:
        print_json(doc)
        return
    row = {"model": model, "corpus": text.name, "perplexity": result.perplexity, **result.protocol}
    print_table("perplexity", [row], list(row))
    if speed:
        print(f"decode speed: {doc['decode_speed']['tokens_per_s']:.1f} tokens/s (batch 1)")
