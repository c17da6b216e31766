"""``ffnkit steer ...``: generate with and without steering (neurons, MoE experts, concepts)."""

from __future__ import annotations

from typing import Annotated

import typer

from ffnkit.cli.common import (
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    TrustRemoteCodeOpt,
    console,
    load,
    print_json,
    print_table,
)
from ffnkit.cli.inspect import check_index, parse_ints, parse_words

steer_app = typer.Typer(
    help="Steer FFNs while generating: set/scale/zero neurons, force MoE experts, promote a concept.",
    no_args_is_help=True,
)

PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The prompt to continue.")]
PositionsOpt = Annotated[
    str, typer.Option("--positions", help="all | last (the newest token of each step) | 0,3,7 (absolute).")
]
NewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate (greedy).")]


def _positions(text: str):
    return text if text in ("all", "last") else parse_ints(text, "positions")


def _print_pair(doc: dict) -> None:
    out = console()
    out.print(f"[bold]without steering:[/bold] {doc['prompt']}[cyan]{doc['plain']}[/cyan]")
    out.print(f"[bold]with steering:   [/bold] {doc['prompt']}[magenta]{doc['steered']}[/magenta]")


@steer_app.command("neurons")
def neurons(
    model: ModelArg = "smollm2-135m",
    prompt: PromptOpt = "",
    layer: Annotated[int, typer.Option("--layer", "-l", help="FFN index.")] = 0,
    neuron_ids: Annotated[str, typer.Option("--neurons", "-n", help="Neuron ids, e.g. 7,42.")] = "",
    set_: Annotated[
        float | None, typer.Option("--set", help="Set the activations m_i to this value.")
    ] = None,
    scale: Annotated[float | None, typer.Option("--scale", help="Multiply m_i by this factor.")] = None,
    zero: Annotated[bool, typer.Option("--zero", help="Set m_i to 0 (ablate).")] = False,
    positions: PositionsOpt = "all",
    site: Annotated[str, typer.Option(help="post (m_i, default) or pre.")] = "post",
    max_new_tokens: NewTokensOpt = 20,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Generate with and without setting/scaling/zeroing neurons' activations."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.steering import NeuronEdit, generate_pair

    chosen = [
        (o, v) for o, v in (("set", set_), ("scale", scale), ("zero", 0.0 if zero else None)) if v is not None
    ]
    if len(chosen) != 1:
        raise InvalidArgumentError("give exactly one of --set V, --scale S, --zero")
    ids = parse_ints(neuron_ids)
    if not ids:
        raise InvalidArgumentError("give the neurons to steer: --neurons 7,42")
    if not prompt:
        raise InvalidArgumentError("give a prompt: --prompt 'Once upon a time'")
    check_index(layer, "layer")
    op, value = chosen[0]
    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    from ffnkit.core.runner import check_causal_lm

    check_causal_lm(net, "steer neurons")
    edit = NeuronEdit(
        layer=layer, neurons=ids, op=op, value=value, positions=_positions(positions), site=site
    )
    doc = {"model": model, **generate_pair(net, tok, prompt, [edit], max_new_tokens).to_dict()}
    if json:
        print_json(doc)
        return
    _print_pair(doc)


@steer_app.command("experts")
def experts(
    model: ModelArg = "smollm2-135m",
    prompt: PromptOpt = "",
    layer: Annotated[int, typer.Option("--layer", "-l", help="FFN index of an MoE layer.")] = 0,
    on: Annotated[str | None, typer.Option("--on", help="Experts to force on, e.g. 3,5.")] = None,
    off: Annotated[str | None, typer.Option("--off", help="Experts to force off.")] = None,
    positions: PositionsOpt = "all",
    max_new_tokens: NewTokensOpt = 20,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Generate with and without forcing MoE experts on/off (SteerMoE: edit the router logits)."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.steering import ExpertEdit, generate_pair

    if not prompt:
        raise InvalidArgumentError("give a prompt: --prompt 'Once upon a time'")
    check_index(layer, "layer")
    edit = ExpertEdit(
        layer=layer,
        on=parse_ints(on, "on") or [],
        off=parse_ints(off, "off") or [],
        positions=_positions(positions),
    )
    if not edit.on and not edit.off:
        raise InvalidArgumentError("give experts to force: --on 3 and/or --off 1,2")
    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    from ffnkit.core.runner import check_causal_lm

    check_causal_lm(net, "steer experts")
    doc = {"model": model, **generate_pair(net, tok, prompt, [edit], max_new_tokens).to_dict()}
    if json:
        print_json(doc)
        return
    _print_pair(doc)


@steer_app.command("concept")
def concept(
    model: ModelArg = "smollm2-135m",
    words: Annotated[str, typer.Option("--words", "-w", help="Comma-separated words of the concept.")] = "",
    corpus: CorpusOpt = "shakespeare",
    n_neurons: Annotated[int, typer.Option("--n-neurons", help="Neurons picked by the word search.")] = 10,
    value: Annotated[float, typer.Option("--value", help="Set the picked neurons' m_i to this value.")] = 3.0,
    scale: Annotated[float | None, typer.Option("--scale", help="Scale m_i instead of setting it.")] = None,
    suppress: Annotated[
        bool, typer.Option("--suppress", help="Push the concept down (negated value).")
    ] = False,
    max_tokens: Annotated[int, typer.Option(help="Evaluation tokens (the last N of the split).")] = 1024,
    window: Annotated[int, typer.Option(help="Tokens per prompt window.")] = 128,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Also show a generation.")] = None,
    max_new_tokens: NewTokensOpt = 20,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Promote (or suppress) a concept: set the neurons that project onto the words, report the shift of
    next-token probability mass on the words and the perplexity cost."""
    from ffnkit.core.archs import find_ffns
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.data import evaluation_tokens, load_corpus
    from ffnkit.steering import ConceptConfig, generate_pair, steer_concept

    if not parse_words(words):
        raise InvalidArgumentError("give the concept's words: --words king,queen")
    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    from ffnkit.core.runner import check_causal_lm

    check_causal_lm(net, "steer concept")
    total = sum(f.d_ff for f in find_ffns(net))  # the word search ranks every neuron of every FFN
    if n_neurons > total:
        raise InvalidArgumentError(f"--n-neurons must be in 1–{total} ({model} has {total} FFN neurons)")
    text = load_corpus(corpus)
    tokens = evaluation_tokens(text, tok, max_tokens=max_tokens)
    cfg = ConceptConfig(
        words=parse_words(words),
        n_neurons=n_neurons,
        op="scale" if scale is not None else "set",
        value=scale if scale is not None else value,
        suppress=suppress,
        window=window,
    )
    report = steer_concept(net, tok, tokens, cfg, progress=True)
    doc = {"model": model, "corpus": text.name, **report.to_dict()}
    if prompt:
        doc["generation"] = generate_pair(net, tok, prompt, report.edits, max_new_tokens).to_dict()
    if json:
        print_json(doc)
        return
    print_table(
        f"concept steering: {', '.join(cfg.words)}",
        [
            {"": "plain", "word mass": report.mass_plain, "perplexity": report.ppl_plain},
            {"": "steered", "word mass": report.mass_steered, "perplexity": report.ppl_steered},
        ],
        ["", "word mass", "perplexity"],
    )
    console().print("neurons: " + ", ".join(f"L{n['layer']}/{n['neuron']}" for n in report.neurons))
    if prompt:
        _print_pair(doc["generation"])
