"""``ffnkit moe stats|contrast|steer``: read and steer mixture-of-experts models.

Plain functions plus :func:`register_moe_inspect`, which adds them to a typer app (the ``moe`` group of
``cli/moe.py``). Every command validates its options before loading the model; a dense model gets a
one-line error ("... is not a mixture of experts") and exit status 2.
"""

from __future__ import annotations

import re
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
    print_json,
    print_table,
)
from ffnkit.cli.inspect import parse_ints

LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers", "--layer", "-l", help="FFN indices (e.g. 0,2 or 1-3); default: every MoE layer."
    ),
]
SetOpt = Annotated[
    str,
    typer.Option(
        help="A text file (one prompt a line), or the prompt itself (several: separate with ' || ')."
    ),
]


def parse_experts(text: str | None, flag: str) -> dict[int, list[int]]:
    """'0:1,0:3,2:5' → {0: [1, 3], 2: [5]} (FFN index : expert); None or '' → {}.

    Example:
        >>> parse_experts("0:1,2:5", "--on")
        {0: [1], 2: [5]}
    """
    from ffnkit.core.errors import InvalidArgumentError

    out: dict[int, list[int]] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+):(\d+)", part)
        if m is None:
            raise InvalidArgumentError(
                f"{flag} takes LAYER:EXPERT pairs counted from 0, e.g. 0:3,1:5; got {part!r}"
            )
        layer, expert = int(m[1]), int(m[2])
        if expert not in out.setdefault(layer, []):
            out[layer].append(expert)
    return out


def prompt_set(value: str, flag: str) -> list[str]:
    """A prompt set from ``--a`` / ``--b``: an existing text file, else the prompts themselves.

    Example:
        >>> prompt_set("I love it || What a day", "--a")
        ['I love it', 'What a day']
    """
    from pathlib import Path

    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.inspect.contrast import read_prompts

    if Path(value).is_file():
        return read_prompts(value)
    if re.fullmatch(r"\S+\.(txt|text|lst)", value.strip()):
        raise InvalidArgumentError(
            f"{flag} {value}: file not found; give a text file or the prompts themselves"
        )
    prompts = [p.strip() for p in value.split("||") if p.strip()]
    if not prompts:
        raise InvalidArgumentError(f"{flag} is empty: give a text file or prompts separated by ' || '")
    return prompts


def _load_moe(model: str, layers: list[int] | None, trust_remote_code: bool, device: str, dtype: str):
    from ffnkit.inspect.moe import moe_ffns
    from ffnkit.sources.models import load_model

    net, tok = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    moe_ffns(net, layers, name=model)  # a dense model (or only dense layers chosen): one-line error
    return net, tok


def stats(
    model: ModelArg = "smollm2-135m",
    corpus: CorpusOpt = "shakespeare",
    layers: LayersOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration windows (sequences).")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 8,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", help="Tokens per expert's vocabulary projection.")
    ] = 8,
    neurons: Annotated[
        int, typer.Option("--neurons", help="Also project each expert's N largest value vectors (0: none).")
    ] = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Per-expert load, co-selection, router entropy, imbalance, and each expert's vocabulary projection."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.data import calibration_batches, load_corpus
    from ffnkit.evaluate import environment
    from ffnkit.inspect.moe import expert_vocab, moe_stats

    chosen = parse_ints(layers, "layers")
    if neurons < 0:
        raise InvalidArgumentError(f"--neurons must be >= 0, got {neurons}")
    net, tok = _load_moe(model, chosen, trust_remote_code, device, dtype)
    text = load_corpus(corpus)
    batches = calibration_batches(text, tok, n_samples=samples, seq_len=seq_len, seed=0)
    res = moe_stats(net, batches, layers=chosen, batch_size=batch_size, progress=not json)
    vocab = expert_vocab(net, tok, layers=chosen, top_k=top_k, neurons=neurons)
    doc = {
        "model": model,
        "corpus": text.name,
        "calibration": {"samples": int(batches.shape[0]), "seq_len": int(batches.shape[1])},
        "split": text.split_info(),
        **res.to_dict(),
        "vocab": vocab.to_dict(),
        "environment": environment(),
    }
    if json:
        print_json(doc)
        return
    rows = []
    for lay in doc["layers"]:
        load = lay["load"]
        rows.append(
            {
                "layer": lay["layer"],
                "experts": lay["experts"],
                "top_k": lay["top_k"],
                "entropy (nats)": lay["entropy"]["mean_nats"],
                "entropy / ln E": lay["entropy"]["mean_normalised"],
                "max/mean": lay["imbalance"]["max_over_mean"],
                "cv": lay["imbalance"]["cv"],
                "busiest": f"{max(range(len(load)), key=load.__getitem__)} ({max(load):.3f})",
                "idlest": f"{min(range(len(load)), key=load.__getitem__)} ({min(load):.3f})",
                "shared gate": "" if lay["shared_gate"] is None else lay["shared_gate"],
            }
        )
    print_table(f"routing over {res.n_tokens} tokens of {text.name}", rows, list(rows[0]))
    out = console()
    for lay in doc["layers"]:
        out.print(f"layer {lay['layer']} load: " + " ".join(f"{v:.3f}" for v in lay["load"]), markup=False)
    for row in vocab.experts:
        toks = " ".join(repr(t["token"]) for t in row["promoted"])
        out.print(f"L{row['layer']} expert {row['expert']}: {toks}", markup=False)


def contrast(
    model: ModelArg = "smollm2-135m",
    a: Annotated[
        str, typer.Option("--a", help="Set A: a text file (one prompt a line) or prompts (' || ').")
    ] = "",
    b: Annotated[
        str, typer.Option("--b", help="Set B: a text file (one prompt a line) or prompts (' || ').")
    ] = "",
    layers: LayersOpt = None,
    top: Annotated[int, typer.Option("--top", help="Experts listed towards each set.")] = 10,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """SteerMoE's risk difference: P(expert chosen | token of A) − P(… | B) for every expert, ranked."""
    from ffnkit.evaluate import environment
    from ffnkit.inspect.moe_contrast import expert_contrast

    set_a, set_b = prompt_set(a, "--a"), prompt_set(b, "--b")
    chosen = parse_ints(layers, "layers")
    net, tok = _load_moe(model, chosen, trust_remote_code, device, dtype)
    res = expert_contrast(net, tok, set_a, set_b, layers=chosen)
    doc = {
        "model": model,
        "a": a,
        "b": b,
        **res.to_dict(),
        "toward_a": res.ranked("a")[:top],
        "toward_b": res.ranked("b")[:top],
        "environment": environment(),
    }
    if json:
        print_json(doc)
        return
    cols = ["layer", "expert", "p_a", "p_b", "delta"]
    print_table(f"experts of A ({res.tokens['a']} vs {res.tokens['b']} tokens)", doc["toward_a"], cols)
    print_table("experts of B", doc["toward_b"], cols)


def steer(
    model: ModelArg = "smollm2-135m",
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt to continue.")] = "",
    on: Annotated[
        str | None, typer.Option("--on", help="Experts forced on, LAYER:EXPERT pairs (0:3,1:5).")
    ] = None,
    off: Annotated[str | None, typer.Option("--off", help="Experts forced off, LAYER:EXPERT pairs.")] = None,
    weight: Annotated[
        float | None,
        typer.Option("--weight", help="Routing weight of each forced-on expert (default: router's)."),
    ] = None,
    positions: Annotated[str, typer.Option("--positions", help="all | last | 0,3,7 (absolute).")] = "all",
    a: Annotated[
        str | None,
        typer.Option("--a", help="Steer towards this prompt set (file or ' || ' prompts), against --b."),
    ] = None,
    b: Annotated[str | None, typer.Option("--b", help="The prompt set to steer away from.")] = None,
    activate: Annotated[int, typer.Option("--activate", help="With --a/--b: experts of A forced on.")] = 0,
    deactivate: Annotated[
        int, typer.Option("--deactivate", help="With --a/--b: experts of B forced off.")
    ] = 0,
    per_layer: Annotated[
        bool,
        typer.Option(
            "--per-layer", help="With --a/--b: pick --activate/--deactivate experts in every layer."
        ),
    ] = False,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Tokens to generate (greedy).")
    ] = 20,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Greedy generation with and without forcing experts on/off (SteerMoE), side by side.

    Experts come from --on/--off, and/or from a contrast: with --a/--b, the --activate experts most
    favoured by A (largest risk difference) are forced on and the --deactivate most favoured by B off."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.core.runner import check_causal_lm
    from ffnkit.steering import ExpertEdit, generate_pair

    if not prompt:
        raise InvalidArgumentError("give a prompt: --prompt 'Once upon a time'")
    if max_new_tokens < 1:
        raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    forced_on, forced_off = parse_experts(on, "--on"), parse_experts(off, "--off")
    sets = None
    if a is not None or b is not None:
        if a is None or b is None:
            raise InvalidArgumentError("steering from a contrast needs both prompt sets: --a ... --b ...")
        if activate < 0 or deactivate < 0 or activate + deactivate == 0:
            raise InvalidArgumentError("with --a/--b, give --activate N and/or --deactivate N (N >= 1)")
        sets = prompt_set(a, "--a"), prompt_set(b, "--b")
    elif activate or deactivate or per_layer:
        raise InvalidArgumentError(
            "--activate/--deactivate/--per-layer pick experts from a contrast: give --a and --b"
        )
    if not forced_on and not forced_off and sets is None:
        raise InvalidArgumentError(
            "give experts to force: --on 0:3 and/or --off 1:2 (LAYER:EXPERT), or --a/--b"
        )
    if weight is not None and not forced_on and (sets is None or not activate):
        raise InvalidArgumentError("--weight applies to experts forced on: give --on LAYER:EXPERT too")
    where = positions if positions in ("all", "last") else parse_ints(positions, "positions")
    net, tok = _load_moe(
        model, sorted(set(forced_on) | set(forced_off)) or None, trust_remote_code, device, dtype
    )
    check_causal_lm(net, "moe steer")
    contrast_doc = None
    if sets is not None:
        from ffnkit.inspect.moe_contrast import expert_contrast

        res = expert_contrast(net, tok, *sets)
        for edit in res.edits("a", activate=activate, deactivate=deactivate, per_layer=per_layer):
            for e in edit.on:
                if e not in forced_on.setdefault(edit.layer, []):
                    forced_on[edit.layer].append(e)
            for e in edit.off:
                if e not in forced_off.setdefault(edit.layer, []):
                    forced_off[edit.layer].append(e)
        contrast_doc = {"a": a, "b": b, "tokens": res.tokens, "activate": activate, "deactivate": deactivate}
    edits = [
        ExpertEdit(
            layer=layer,
            on=forced_on.get(layer, []),
            off=forced_off.get(layer, []),
            positions=where,
            weight=weight if forced_on.get(layer) else None,
        )
        for layer in sorted(set(forced_on) | set(forced_off))
        if forced_on.get(layer) or forced_off.get(layer)
    ]
    if not edits:
        raise InvalidArgumentError("the contrast of --a and --b favours no expert (every difference is 0)")
    doc = {"model": model, **generate_pair(net, tok, prompt, edits, max_new_tokens).to_dict()}
    if contrast_doc is not None:
        doc["contrast"] = contrast_doc
    if json:
        print_json(doc)
        return
    out = console()
    out.print(f"[bold]without steering:[/bold] {doc['prompt']}[cyan]{doc['plain']}[/cyan]")
    out.print(f"[bold]with steering:   [/bold] {doc['prompt']}[magenta]{doc['steered']}[/magenta]")


def register_moe_inspect(app: typer.Typer) -> None:
    """Add ``stats``, ``contrast`` and ``steer`` to ``app`` (the ``ffnkit moe`` group).

    Example:
        >>> moe_app = typer.Typer(); register_moe_inspect(moe_app)
    """
    app.command("stats")(stats)
    app.command("contrast")(contrast)
    app.command("steer")(steer)
