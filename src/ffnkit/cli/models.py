"""``ffnkit models MODEL``: every FFN of a model in one table."""

from __future__ import annotations

from ffnkit.cli.common import JsonOpt, ModelArg, TrustRemoteCodeOpt, print_json, print_table


def models(
    model: ModelArg = "smollm2-135m", trust_remote_code: TrustRemoteCodeOpt = False, json: JsonOpt = False
) -> None:
    """List every FFN block: layer, kind, widths, activation, parameters and FLOPs per token."""
    from ffnkit.core.archs import find_ffns
    from ffnkit.evaluate import count_parameters
    from ffnkit.sources.models import load_model

    net, _ = load_model(model, trust_remote_code=trust_remote_code)
    ffns = find_ffns(net)
    rows = [f.describe() for f in ffns]
    doc = {
        "model": model,
        "family": ffns[0].family,
        "model_type": getattr(net.config, "model_type", None),
        "parameters": count_parameters(net, ffns),
        "ffns": rows,
    }
    if json:
        print_json(doc)
        return
    cols = ["index", "name", "kind", "d_model", "d_ff", "activation", "params", "flops_per_token"]
    if any(f.kind == "moe" for f in ffns):
        cols += ["experts", "top_k", "shared_expert_d_ff"]
    print_table(f"{model}: {len(ffns)} FFNs ({doc['family']})", rows, cols)
    p = doc["parameters"]
    print(f"parameters: {p['total']:,} total, {p['ffn']:,} in FFNs ({100 * p['ffn_share']:.1f}%)")
