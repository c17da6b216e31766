"""Recording FFN structure in ``model.config.ffnkit``: the per-layer widths, added biases and the list of
structural changes that ``ffnkit.io.load`` replays (kind → function in its registry).

``config.ffnkit = {"original": {...}, "structure": {...}, "changes": [...]}``. Where every FFN of a kind
has one width, the config's own width key is set too, so plain transformers rebuilds the model.

Example:
    >>> keep_neurons_(find_ffns(model)[3], torch.arange(1024), model=model)   # records through here
    >>> structure_of(model)["d_ff"][3]
    1024
"""

from __future__ import annotations

import copy

from torch import nn

from ffnkit.core.ffn import FFN
from ffnkit.core.hf import text_config

__all__ = ["config_snapshot", "record_change", "record_structure", "restore_config", "structure_of"]

# config keys that hold the FFN width, by model type (default: intermediate_size)
_DENSE_KEY = {"gpt2": "n_inner", "opt": "ffn_dim", "t5": "d_ff"}
_EXPERT_KEY = {"qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size"}
_SHARED_KEY = "shared_expert_intermediate_size"


def config_snapshot(model: nn.Module) -> dict:
    """The config's width keys and ``config.ffnkit`` (deep-copied), for :func:`restore_config` after a
    failed edit."""

    wc = text_config(model)
    names = (*_DENSE_KEY.values(), "intermediate_size", *_EXPERT_KEY.values(), _SHARED_KEY)
    keys = {k: getattr(wc, k) for k in names if hasattr(wc, k)}
    return {"ffnkit": copy.deepcopy(getattr(model.config, "ffnkit", None)), "keys": keys}


def restore_config(model: nn.Module, snap: dict) -> None:
    """Put back what :func:`config_snapshot` saw."""
    if snap["ffnkit"] is None:
        if hasattr(model.config, "ffnkit"):
            delattr(model.config, "ffnkit")
    else:
        model.config.ffnkit = snap["ffnkit"]
    wc = text_config(model)
    for k, v in snap["keys"].items():
        setattr(wc, k, v)


def structure_of(model: nn.Module, ffns: list[FFN] | None = None) -> dict:
    """The FFN structure as JSON: per FFN its width, the shared expert's width, and whether W_out has a bias.

    Example:
        >>> structure_of(model)["d_ff"][:3]
        [1536, 1536, 1536]
    """
    from ffnkit.core.archs import find_ffns

    ffns = ffns if ffns is not None else find_ffns(model)
    return {
        "d_ff": [f.d_ff for f in ffns],
        "shared_d_ff": [f.shared.d_ff if f.shared is not None else None for f in ffns],
        "bias_out": [f.kind != "moe" and f.bias_out is not None for f in ffns],
    }


def record_structure(model: nn.Module) -> dict:
    """Write the current per-FFN widths (and added biases) into ``model.config.ffnkit``.

    ``config.ffnkit = {"original": {...}, "structure": {...}, "changes": [...]}``; where every FFN of a
    kind has one width, the config's own width key (``intermediate_size``, ``n_inner``, ``ffn_dim``,
    ``d_ff``, ``moe_intermediate_size``) is set too, so plain transformers can rebuild the model.

    Example:
        >>> record_structure(model)["structure"]["d_ff"]
    """
    from ffnkit.core.archs import find_ffns

    ffns = find_ffns(model)
    now = structure_of(model, ffns)
    meta = dict(getattr(model.config, "ffnkit", None) or {})
    if "original" not in meta:
        # first edit: what the unmodified architecture looks like (from the config's own keys)
        meta["original"] = {"config_widths": config_snapshot(model)["keys"]}
    meta["structure"] = now
    meta.setdefault("changes", [])
    model.config.ffnkit = meta
    record_change(model, {"kind": "ffn_structure", **now})
    family = getattr(model.config, "model_type", "")
    wc = text_config(model)
    dense = {f.d_ff for f in ffns if f.kind != "moe"}
    expert = {f.d_ff for f in ffns if f.kind == "moe"}
    shared = {f.shared.d_ff for f in ffns if f.kind == "moe" and f.shared is not None}
    dense_key = _DENSE_KEY.get(family, "intermediate_size")
    expert_key = _EXPERT_KEY.get(family, "intermediate_size")
    if len(dense) == 1 and hasattr(wc, dense_key) and (not expert or expert_key != dense_key):
        setattr(wc, dense_key, dense.pop())
    if len(expert) == 1 and hasattr(wc, expert_key):
        setattr(wc, expert_key, expert.pop())
    if len(shared) == 1 and hasattr(wc, _SHARED_KEY):
        setattr(wc, _SHARED_KEY, shared.pop())
    return meta


def record_change(model: nn.Module, change: dict) -> None:
    """Append a JSON-ready structural change ``{"kind": ..., ...}`` to ``model.config.ffnkit["changes"]``.

    ``ffnkit.io.load`` replays changes in order through its replay registry (kind → function).
    Consecutive ``ffn_structure`` records collapse into the last one (replaying it is idempotent).

    Example:
        >>> record_change(model, {"kind": "ffn_structure", **structure_of(model)})
    """
    meta = dict(getattr(model.config, "ffnkit", None) or {})
    changes = list(meta.get("changes", []))
    if changes and changes[-1].get("kind") == change.get("kind") == "ffn_structure":
        changes[-1] = change
    else:
        changes.append(change)
    meta["changes"] = changes
    model.config.ffnkit = meta
