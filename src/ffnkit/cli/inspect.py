"""``ffnkit inspect ...``: look inside FFN neurons (vocabulary projection, search, prediction trace).

Other inspect commands (stats, spectral, ...) live in ``cli/inspect_corpus.py`` and register onto
``inspect_app`` by importing it.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ffnkit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    TrustRemoteCodeOpt,
    console,
    load,
    print_json,
    print_table,
    renamed,
)

inspect_app = typer.Typer(
    help="Inspect FFN neurons: vocabulary projection, neuron search, prediction trace, statistics.",
    no_args_is_help=True,
)


def parse_ints(text: str | None, what: str = "neurons") -> list[int] | None:
    """'1,2,5-7' → [1, 2, 5, 6, 7]; None stays None.

    Indices count from 0: a negative index or a descending range (5-2) is an error, for layers,
    neurons and experts alike (the CLI never counts from the end).

    Example:
        >>> parse_ints("1,2,5-7")
        [1, 2, 5, 6, 7]
    """
    import re

    from ffnkit.core.errors import InvalidArgumentError

    if text is None or text.strip() == "":
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("-"):
            raise InvalidArgumentError(
                f"--{what} counts from 0 and takes no negative index ({part}); give e.g. 0,3 or 2-5"
            )
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise InvalidArgumentError(f"--{what} takes integers like 1,2,5-7; got {text!r}")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise InvalidArgumentError(f"--{what}: the range {part} runs backwards; write {hi}-{lo}")
        out.extend(range(lo, hi + 1))
    return out


def check_index(value: int, what: str) -> int:
    """A single index option (``--layer 3``): counts from 0, like :func:`parse_ints`.

    Example:
        >>> check_index(3, "layer")
        3
    """
    from ffnkit.core.errors import InvalidArgumentError

    if value < 0:
        raise InvalidArgumentError(f"--{what} counts from 0 and takes no negative index ({value})")
    return value


def one_word(text: str | None, what: str) -> str | None:
    """A single-word option such as ``trace --target``: empty, several words or a comma list is an error
    (it would otherwise silently become the first token of something else).

    Example:
        >>> one_word(" Paris", "target")
        ' Paris'
    """
    from ffnkit.core.errors import InvalidArgumentError

    if text is None:
        return None
    word = text.strip()
    if not word:
        raise InvalidArgumentError(f"--{what} is empty; give one word, e.g. --{what} Paris")
    if "," in word or any(c.isspace() for c in word):
        raise InvalidArgumentError(
            f"--{what} takes one word, got {text!r}; run once per word (several targets are not traced together)"
        )
    return text


def parse_targets(text: str | None) -> list[str]:
    """``trace --target``: one word or a comma list (``Thursday,Friday``); each word is traced.

    Example:
        >>> parse_targets("Thursday, Friday")
        ['Thursday', 'Friday']
    """
    from ffnkit.core.errors import InvalidArgumentError

    if text is None:
        return []
    words = [w.strip() for w in text.split(",")]
    if not any(words):
        raise InvalidArgumentError("--target is empty; give a word, e.g. --target Paris (or Paris,London)")
    if any(not w for w in words):
        raise InvalidArgumentError(f"--target {text!r} has an empty item; give e.g. Thursday,Friday")
    for w in words:
        one_word(w, "target")
    return words if len(words) > 1 else [text]


def merge_traces(docs: list[dict]) -> dict:
    """One trace document from the traces of the same prompt for several targets: the first trace, with
    ``targets`` (each target's logit and probability) and, per layer, ``targets`` (each one's effects).
    One target: the trace as it is.

    Example:
        >>> merge_traces([t1, t2])["targets"][1]["token"]
        ' Friday'
    """
    if len(docs) == 1:
        return docs[0]
    doc = dict(docs[0])
    doc["targets"] = [d["target"] for d in docs]
    doc["layers"] = [
        {**lt, "targets": [d["layers"][i]["target"] for d in docs]} for i, lt in enumerate(docs[0]["layers"])
    ]
    return doc


def parse_words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def _toks(items: list[dict], n: int = 8) -> str:
    return " ".join(repr(t["token"]) for t in items[:n])


@inspect_app.command("neurons")
def neurons(
    model: ModelArg = "smollm2-135m",
    layer: Annotated[
        str | None, typer.Option("--layer", "-l", help="FFN index(es), e.g. 3 or 0-5 (default: all).")
    ] = None,
    neuron_ids: Annotated[
        str | None, typer.Option("--neurons", "-n", help="Neuron ids, e.g. 7,42 (default: all).")
    ] = None,
    experts: Annotated[
        str | None, typer.Option("--experts", help="MoE layers: expert ids (default: all).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Tokens per direction.")] = 10,
    no_norm: Annotated[
        bool, typer.Option("--no-norm", help="Project the raw v_i (E v_i), not g ⊙ v_i.")
    ] = False,
    chunk_size: Annotated[int, typer.Option(help="Neurons per matrix product (bounds memory).")] = 512,
    vocab_chunk: Annotated[
        int | None, typer.Option(help="Also stream over the vocabulary in blocks.")
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Top-k tokens each neuron's value vector promotes and suppresses (vocabulary projection)."""
    from ffnkit.core.archs import find_ffns, select_ffns
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.inspect.vocab import project_neurons

    layers, ids, expert_ids = (
        parse_ints(layer, "layer"),
        parse_ints(neuron_ids),
        parse_ints(experts, "experts"),
    )
    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if expert_ids and not any(f.kind == "moe" for f in select_ffns(find_ffns(net), layers)):
        raise InvalidArgumentError(
            f"--experts applies to mixture-of-experts layers; {model} has none there (drop --experts)"
        )
    proj = project_neurons(
        net,
        layers=layers,
        neurons=ids,
        experts=expert_ids,
        top_k=top_k,
        use_gain=not no_norm,
        chunk_size=chunk_size,
        vocab_chunk=vocab_chunk,
        tokenizer=tok,
        progress=True,
    )
    if json:
        print_json({"model": model, **proj.to_dict()})
        return
    rows = [
        {
            "layer": r["layer"],
            "expert": "" if r["expert"] is None else r["expert"],
            "neuron": r["neuron"],
            "promoted": _toks(r["promoted"], top_k),
            "suppressed": _toks(r["suppressed"], top_k),
        }
        for r in proj.rows()
    ]
    cols = ["layer", "neuron", "promoted", "suppressed"]
    if any(r["expert"] != "" for r in rows):
        cols.insert(1, "expert")
    print_table(f"vocabulary projection: {proj.basis}", rows, cols)


@inspect_app.command("search")
def search(
    model: ModelArg = "smollm2-135m",
    words: Annotated[
        str, typer.Option("--words", "-w", help="Comma-separated words, e.g. Monday,Tuesday.")
    ] = "",
    tokens: Annotated[
        str | None, typer.Option("--tokens", "-t", hidden=True, help="Old name of --words.")
    ] = None,
    layer: Annotated[str | None, typer.Option("--layer", "-l", help="Search only these FFN indices.")] = None,
    top: Annotated[int, typer.Option("--top", help="Neurons to return.")] = 10,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Tokens shown per neuron.")] = 10,
    no_norm: Annotated[bool, typer.Option("--no-norm", help="Use the raw v_i, not g ⊙ v_i.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Neurons whose vocabulary projection promotes the given words most."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.inspect.vocab import search_neurons

    words, layers = parse_words(renamed(words, tokens, "--tokens", "--words")), parse_ints(layer, "layer")
    if not words:
        raise InvalidArgumentError("give the words to search for: --words Monday,Tuesday")
    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    res = search_neurons(
        net,
        tok,
        words,
        layers=layers,
        top_n=top,
        top_k=top_k,
        use_gain=not no_norm,
    )
    if json:
        print_json({"model": model, **res.to_dict()})
        return
    rows = [
        {
            "layer": h["layer"],
            "expert": "" if h["expert"] is None else h["expert"],
            "neuron": h["neuron"],
            "score": h["score"],
            "promoted": _toks(h["promoted"], top_k),
        }
        for h in res.hits
    ]
    cols = ["layer", "neuron", "score", "promoted"]
    if any(r["expert"] != "" for r in rows):
        cols.insert(1, "expert")
    print_table(f"neurons promoting {', '.join(res.words)}", rows, cols)
    sys.stderr.write(f"score: {res.rule}\n")


@inspect_app.command("trace")
def trace_cmd(
    model: ModelArg = "smollm2-135m",
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to trace.")] = "",
    target: Annotated[
        str | None,
        typer.Option("--target", help="Word(s) whose logit to attribute, comma-separated: Thursday,Friday."),
    ] = None,
    layer: Annotated[str | None, typer.Option("--layer", "-l", help="FFN indices (default: all).")] = None,
    position: Annotated[int, typer.Option(help="Token position to trace (default: the last).")] = -1,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Tokens shown per list.")] = 5,
    top_neurons: Annotated[int, typer.Option(help="Sub-updates shown per layer.")] = 5,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Per layer: logit-lens tokens before/after the FFN, dominant sub-updates, effects on a target."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.inspect.tracing import trace

    if not prompt:
        raise InvalidArgumentError("give a prompt: --prompt 'The capital of France is'")
    targets = parse_targets(target)
    layers = parse_ints(layer, "layer")
    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    docs = [
        trace(
            net,
            tok,
            prompt,
            target=t,
            layers=layers,
            position=position,
            top_k=top_k,
            top_neurons=top_neurons,
        ).to_dict()
        for t in (targets or [None])
    ]
    doc = merge_traces(docs)
    if json:
        print_json({"model": model, **doc})
        return
    out = console()
    out.print(f"prediction after {doc['tokens'][doc['position']]!r}: {_toks(doc['prediction'], top_k)}")
    for tg in doc.get("targets") or ([doc["target"]] if doc["target"] else []):
        out.print(f"target {tg['token']!r} (id {tg['id']}): logit {tg['logit']:.3f}, prob {tg['prob']:.4f}")
    rows = []
    for lt in doc["layers"]:
        row = {
            "layer": lt["layer"],
            "before": _toks(lt["before"], 3),
            "after": _toks(lt["after"], 3),
            "top sub-updates (neuron: pushes)": "; ".join(
                f"{'' if s['expert'] is None else str(s['expert']) + '/'}{s['neuron']}: {' '.join(repr(x) for x in s['pushes'][:3])}"
                for s in lt["sub_updates"][:3]
            ),
        }
        for tg in lt.get("targets") or ([lt["target"]] if lt["target"] else []):
            row[f"Δlogit({tg['token'].strip() or tg['token']!r})"] = tg["ffn_total"]
        rows.append(row)
    print_table("prediction trace", rows, list(rows[0]))
