"""``ffnkit inspect stats|spectral|importance|contrast|early-exit``: corpus-level inspection commands.

They register onto the ``inspect_app`` group of ``cli/inspect.py``; ``cli/main.py`` imports this module.
Every command runs on the corpus' calibration split (``--samples`` windows of ``--seq-len`` tokens) and
takes ``--json`` (one JSON document on stdout; progress bars on stderr).
"""

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
    load,
    print_json,
    print_table,
)
from ffnkit.cli.inspect import inspect_app, parse_ints
from ffnkit.core.criteria import ACTIVE_THRESHOLD

SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration windows (sequences).")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")]
PlotOpt = Annotated[str | None, typer.Option("--plot", help="Write a PNG plot to this file.")]
ThresholdOpt = Annotated[
    float,
    typer.Option(
        "--threshold", help="A neuron fires on a token when |m_i| > this × the layer's mean |m| on it."
    ),
]


def plot_target(plot: str | None) -> str | None:
    """Where --plot writes: its folder is created now, before any work (a file in the way is an error).

    Example:
        >>> plot_target("plots/spectral.png")  # creates plots/
        'plots/spectral.png'
    """
    from pathlib import Path

    from ffnkit.core.errors import InvalidArgumentError

    if plot is None:
        return None
    parent = Path(plot).expanduser().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InvalidArgumentError(f"--plot {plot}: {parent} is a file, not a folder") from None
    except OSError as exc:
        raise InvalidArgumentError(f"--plot {plot}: cannot create {parent} ({exc.strerror})") from None
    if Path(plot).is_dir():
        raise InvalidArgumentError(f"--plot {plot} is a folder; give a file name such as {plot}/plot.png")
    return plot


def _setup(
    model: str,
    corpus: str,
    samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
):
    from ffnkit.data import calibration_batches, load_corpus

    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    text = load_corpus(corpus)
    return net, tok, text, calibration_batches(text, tok, n_samples=samples, seq_len=seq_len, seed=seed)


def _base(model: str, text, batches) -> dict:
    from ffnkit.evaluate import environment

    return {
        "model": model,
        "corpus": text.name,
        "calibration": {"samples": int(batches.shape[0]), "seq_len": int(batches.shape[1])},
        "split": text.split_info(),
        "environment": environment(),
    }


@inspect_app.command("stats")
def stats(
    model: ModelArg = "smollm2-135m",
    corpus: CorpusOpt = "shakespeare",
    layer: Annotated[
        str | None, typer.Option("--layer", help="FFN index (or comma list) to measure; default: all.")
    ] = None,
    neurons: Annotated[
        str | None, typer.Option("--neurons", help="Neurons (comma list) of --layer whose contexts to show.")
    ] = None,
    top_contexts: Annotated[int, typer.Option("--top-contexts", help="Contexts kept per neuron.")] = 5,
    window: Annotated[int, typer.Option("--window", help="Tokens of context each side.")] = 8,
    threshold: ThresholdOpt = ACTIVE_THRESHOLD,
    samples: SamplesOpt = 32,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Per-neuron firing rate, mean and variance of m_i; top-activating corpus contexts of chosen neurons."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.inspect.stats import neuron_stats

    layers = parse_ints(layer, "layer")
    chosen = parse_ints(neurons, "neurons")
    if chosen and (not layers or len(layers) != 1):
        raise InvalidArgumentError("--neurons needs exactly one --layer, e.g. --layer 3 --neurons 17,42")
    net, tok, text, batches = _setup(
        model, corpus, samples, seq_len, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    res = neuron_stats(
        net,
        batches,
        layers=layers,
        threshold=threshold,
        contexts={layers[0]: chosen} if chosen else None,
        k=top_contexts,
        batch_size=batch_size,
        progress=True,
    )
    doc = _base(model, text, batches)
    doc.update(res.to_dict())
    if chosen:
        doc["neurons"] = [
            {
                **row,
                "firing_rate": float(res.layers[row["layer"]]["firing_rate"][row["neuron"]]),
                "mean": float(res.layers[row["layer"]]["mean"][row["neuron"]]),
                "var": float(res.layers[row["layer"]]["var"][row["neuron"]]),
            }
            for row in res.contexts(tok, batches, window)
        ]
        if json and len(res.layers) == 1:  # one layer: also give every neuron's numbers
            (idx,) = res.layers
            doc["per_neuron"] = {k: v.tolist() for k, v in res.layers[idx].items()}
    if json:
        print_json(doc)
        return
    cols = ["layer", "d_ff", "mean_firing_rate", "dead_share", "always_on_share", "mean_var"]
    print_table(f"neuron statistics ({res.n_tokens} tokens)", doc["layers"], cols)
    for row in doc.get("neurons", []):
        print(f"\nlayer {row['layer']} neuron {row['neuron']}: firing rate {row['firing_rate']:.3f}")
        for c in row["contexts"]:
            print(f"  {c['value']:8.3f}  {' '.join(c['text'].split())}")


@inspect_app.command("spectral")
def spectral(
    model: ModelArg = "smollm2-135m",
    corpus: CorpusOpt = "shakespeare",
    layer: Annotated[
        str | None, typer.Option("--layer", help="FFN indices (comma list); default all.")
    ] = None,
    plot: PlotOpt = None,
    samples: SamplesOpt = 32,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Hard rank, soft rank, concentration and utilisation of each layer's activation covariance."""
    from ffnkit.inspect.spectral import plot_spectral, spectral_utilisation

    layers, plot = parse_ints(layer, "layer"), plot_target(plot)
    net, _, text, batches = _setup(
        model, corpus, samples, seq_len, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    res = spectral_utilisation(net, batches, layers=layers, batch_size=batch_size, progress=True)
    doc = {**_base(model, text, batches), **res.to_dict()}
    if plot:
        doc["plot"] = str(plot_spectral(res, plot))
    if json:
        print_json(doc)
        return
    cols = ["layer", "d_ff", "hard_rank", "soft_rank", "utilisation", "top1pct_share", "hard_soft_ratio"]
    print_table("spectral utilisation of the post-activation covariance", res.layers, cols)
    if plot:
        print(f"plot: {doc['plot']}")


@inspect_app.command("importance")
def importance(
    model: ModelArg = "smollm2-135m",
    corpus: CorpusOpt = "shakespeare",
    method: Annotated[str, typer.Option("--method", help="finercut or shortgpt.")] = "finercut",
    steps: Annotated[
        int | None, typer.Option("--steps", help="FinerCut: stop after N removals (default: all).")
    ] = None,
    plot: PlotOpt = None,
    samples: SamplesOpt = 4,
    seq_len: SeqLenOpt = 128,
    batch_size: BatchOpt = 4,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Sublayer importance: FinerCut's greedy removal order (JS divergence) or ShortGPT block influence."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.inspect.importance import block_influence, finercut, plot_importance

    if method not in ("finercut", "shortgpt"):
        raise InvalidArgumentError(f"--method must be finercut or shortgpt, got {method!r}")
    plot = plot_target(plot)
    net, _, text, batches = _setup(
        model, corpus, samples, seq_len, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if method == "finercut":
        res = finercut(net, batches, steps=steps, batch_size=batch_size, progress=True)
    else:
        res = block_influence(net, batches, batch_size=batch_size, progress=True)
    doc = {**_base(model, text, batches), **res.to_dict()}
    if plot:
        doc["plot"] = str(plot_importance(res, plot))
    if json:
        print_json(doc)
        return
    if method == "finercut":
        print_table("FinerCut greedy removal order", res.order, ["step", "name", "kind", "js"])
    else:
        print_table("ShortGPT block influence", res.layers, ["layer", "name", "bi"])
    if plot:
        print(f"plot: {doc['plot']}")


@inspect_app.command("contrast")
def contrast(
    model: ModelArg = "smollm2-135m",
    a: Annotated[str, typer.Option("--a", help="Text file, one prompt per line (set a).")] = ...,
    b: Annotated[str, typer.Option("--b", help="Text file, one prompt per line (set b).")] = ...,
    top: Annotated[int, typer.Option("--top", help="Neurons (and experts) to report.")] = 20,
    threshold: ThresholdOpt = ACTIVE_THRESHOLD,
    rank_by: Annotated[str, typer.Option("--rank-by", help="delta or cohens_d.")] = "delta",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Neurons (and MoE experts) whose activation differs most between two prompt sets."""
    from ffnkit.evaluate import environment
    from ffnkit.inspect.contrast import contrast as run

    net, tok = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    res = run(net, tok, a, b, top=top, threshold=threshold, rank_by=rank_by)
    doc = {"model": model, "a": a, "b": b, **res.to_dict(), "environment": environment()}
    if json:
        print_json(doc)
        return
    cols = ["layer", "neuron", "p_a", "p_b", "delta", "cohens_d"]
    print_table(
        f"neurons that differ most ({res.tokens['a']} vs {res.tokens['b']} tokens)", res.neurons, cols
    )
    if res.experts:
        cols = ["layer", "expert", "p_a", "p_b", "delta", "cohens_d"]
        print_table("experts that differ most", res.experts, cols)


@inspect_app.command("early-exit")
def early_exit(
    model: ModelArg = "smollm2-135m",
    corpus: CorpusOpt = "shakespeare",
    target: Annotated[float, typer.Option("--target", help="Top-1 agreement to keep on calibration.")] = 0.95,
    eval_tokens: Annotated[
        int, typer.Option("--eval-tokens", help="Last N tokens of the evaluation split to measure on.")
    ] = 2048,
    samples: SamplesOpt = 8,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchOpt = 4,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Saturation layers (logit lens) and a confidence exit rule calibrated on calibration, measured on evaluation."""
    from ffnkit.core.errors import InvalidArgumentError
    from ffnkit.data import evaluation_tokens
    from ffnkit.inspect.early_exit import early_exit as run

    if not 0.0 < target <= 1.0:
        raise InvalidArgumentError(f"--target is a top-1 agreement in (0, 1], got {target}; e.g. 0.95")
    net, tok, text, batches = _setup(
        model, corpus, samples, seq_len, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    ev = evaluation_tokens(text, tok, max_tokens=eval_tokens)
    n = ev.numel() // seq_len
    if n == 0:
        ev_batches = ev[None]
    else:
        ev_batches = ev[: n * seq_len].reshape(n, seq_len)  # [n, seq_len]
    res = run(net, batches, ev_batches, target=target, batch_size=batch_size, progress=True)
    doc = {**_base(model, text, batches), "evaluation_tokens": int(ev_batches.numel()), **res.to_dict()}
    if json:
        print_json(doc)
        return
    rows = [
        {"rule": name, "split": split, **getattr(r, split).to_dict()}
        for name, r in res.rules.items()
        for split in ("calibration", "evaluation")
    ]
    cols = [
        "rule",
        "split",
        "threshold",
        "min_layer",
        "stable",
        "agreement",
        "layers_saved",
        "mean_exit_layer",
    ]
    print_table(f"early-exit rules (target agreement {target}, calibrated on calibration)", rows, cols)
    sat = res.saturation
    mean = "n/a" if sat.mean_saturation_layer is None else f"{sat.mean_saturation_layer:.2f}"
    print(
        f"saturation layer on evaluation: mean {mean} of {sat.n_layers}, "
        f"oracle saving {sat.oracle_layers_saved:.1%}"
    )
