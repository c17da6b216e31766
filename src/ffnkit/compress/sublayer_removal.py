"""Sublayer and block removal for real, the structural part of ``ffnkit.compress.sublayers``.

- a removed **FFN sublayer**: its container (``model.layers.3.mlp``) is replaced by :class:`ZeroFFN`,
  a module without parameters that returns zeros shaped like its input — exactly what FinerCut's
  zeroing hook computes, with the FFN's parameters gone;
- a removed **attention sublayer**: replaced by :class:`ZeroAttention`, which returns
  ``(zeros, None)`` like transformers v5 attention modules, and writes a [B, 1, T, 1] placeholder into
  the KV cache so that the cache's length bookkeeping (``get_seq_length``, used for positions and
  masks during ``generate``) stays right even when layer 0's attention is gone;
- a removed **block** (ShortGPT): deleted from the ModuleList; the later blocks' ``layer_idx``
  attributes (KV-cache slots) are renumbered and ``config.num_hidden_layers`` / ``config.layer_types``
  follow, so the result is a plain, smaller architecture that transformers itself rebuilds.

Every removal is atomic and recorded in ``model.config.ffnkit`` (kinds ``sublayers_removed`` and
``blocks_removed``), which :func:`replay_sublayers` / :func:`replay_blocks` rebuild on ``ffnkit.load``.

Example:
    >>> apply_sublayer_removal_(model, [(3, "attn"), (5, "ffn")])
    >>> delete_blocks_(model, [20])["num_layers_after"]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.blocks import (
    attn_path,
    block_modules,
    blocks,
    ffn_path,
    layer_list,
    num_blocks,
    parameter_count,
)
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError
from ffnkit.core.hf import text_config

__all__ = [
    "BLOCKS_KIND",
    "SUBLAYERS_KIND",
    "ZeroAttention",
    "ZeroFFN",
    "apply_sublayer_removal_",
    "check_block_deletion",
    "delete_blocks_",
    "removed_sublayers",
    "replay_blocks",
    "replay_sublayers",
]

SUBLAYERS_KIND = "sublayers_removed"
BLOCKS_KIND = "blocks_removed"
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


# ----- the replacement modules --------------------------------------------------------------------
class ZeroFFN(nn.Module):
    """A removed FFN: no parameters, returns zeros shaped like its input (the residual passes unchanged).

    Example:
        >>> ZeroFFN(layer=3)(torch.ones(1, 2, 8)).abs().sum()
        tensor(0.)
    """

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = int(layer)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros_like(hidden_states)  # [B, T, d]

    def extra_repr(self) -> str:
        return f"layer={self.layer}, removed by ffnkit"


class ZeroAttention(nn.Module):
    """A removed attention sublayer: returns ``(zeros, None)`` like v5 attention modules.

    It writes a [B, 1, T, 1] zero placeholder into the KV cache (if one is passed) under its
    ``layer_idx``, so the cache keeps counting tokens for this layer (positions and masks read the
    length of layer 0's cache). A pre-allocated static cache sized for the full layer does not accept
    it: use the default dynamic cache.

    Example:
        >>> out, weights = ZeroAttention(layer_idx=0)(hidden_states=torch.ones(1, 2, 8))
    """

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = int(layer_idx)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # [B, T, d]
        if hidden is None:
            raise InvalidArgumentError("ZeroAttention needs the hidden states (first argument)")
        cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
        if cache is not None and hasattr(cache, "update"):
            b, t = hidden.shape[0], hidden.shape[1]
            dummy = hidden.new_zeros(b, 1, t, 1)  # [B, heads=1, T, head_dim=1]
            cache.update(dummy, dummy, self.layer_idx)
        return torch.zeros_like(hidden), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, removed by ffnkit"


def removed_sublayers(model: nn.Module) -> list[dict[str, Any]]:
    """The sublayers this model has lost (scanned from its modules): path, kind, layer.

    Example:
        >>> removed_sublayers(model)
        [{'path': 'model.layers.3.self_attn', 'kind': 'attn', 'layer': 3}]
    """
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, ZeroAttention):
            rows.append({"path": name, "kind": "attn", "layer": mod.layer_idx})
        elif isinstance(mod, ZeroFFN):
            rows.append({"path": name, "kind": "ffn", "layer": mod.layer})
    return rows


# ----- commit (atomic) ----------------------------------------------------------------------------
def _swap_all(swaps: list[tuple[Any, str, Any]]) -> Callable[[], None]:
    """setattr every (obj, name, value), or none (``ffnkit.core.edit``'s transaction); returns the undo."""
    from ffnkit.core.edit import _commit, _Swap

    return _commit([_Swap(obj, name, value) for obj, name, value in swaps])


def _plan_sublayers(model: nn.Module, items: list[tuple[int, str]]) -> list[tuple[Any, str, Any]]:
    """Swaps that replace (block index, "attn"|"ffn") by zero modules."""
    mods = block_modules(model)
    swaps = []
    for layer, kind in items:
        if not 0 <= layer < len(mods):
            raise LayerIndexError(f"layer {layer} is out of range: this model has {len(mods)} blocks")
        rel = attn_path(model) if kind == "attn" else ffn_path(model)
        owner_rel, _, attr = rel.rpartition(".")
        owner = mods[layer].get_submodule(owner_rel) if owner_rel else mods[layer]
        current = getattr(owner, attr, None)
        if current is None:
            raise InvalidArgumentError(f"block {layer} has no {kind} sublayer at {rel!r}")
        if isinstance(current, ZeroAttention | ZeroFFN):
            raise InvalidArgumentError(f"layers.{layer}.{kind} is already removed")
        if kind == "attn":
            idx = getattr(current, "layer_idx", None)
            new: nn.Module = ZeroAttention(layer if idx is None else int(idx))
        else:
            new = ZeroFFN(layer)
        swaps.append((owner, attr, new))
    return swaps


def _records(model: nn.Module) -> dict:
    return copy.deepcopy(getattr(model.config, "ffnkit", None) or {})


def _set_records(model: nn.Module, meta: dict) -> None:
    if meta:
        model.config.ffnkit = meta
    elif hasattr(model.config, "ffnkit"):
        delattr(model.config, "ffnkit")


def _append_change(model: nn.Module, change: dict) -> None:
    from ffnkit.core.edit import record_change, record_structure

    record_change(model, change)
    meta = model.config.ffnkit
    if any(c.get("kind") == "ffn_structure" for c in meta.get("changes", [])):
        record_structure(model)  # the width list now covers the FFNs left (replayed after this change)


def apply_sublayer_removal_(model: nn.Module, items: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Replace sublayers (block index, "attn"|"ffn") by zero modules, record the change; atomic.

    Example:
        >>> apply_sublayer_removal_(model, [(3, "attn"), (5, "ffn")])
    """
    if not items:
        return []
    swaps = _plan_sublayers(model, items)
    rows = []
    for (layer, kind), (owner, attr, _) in zip(items, swaps, strict=True):
        rows.append({"layer": layer, "kind": kind, "parameters": parameter_count(getattr(owner, attr))})
    n_ffn_left = len(blocks(model)) - sum(k == "ffn" for _, k in items)
    if n_ffn_left < 1:
        raise InvalidArgumentError("removal would leave no FFN in the model; keep at least one")
    meta = _records(model)
    names = {id(m): n for n, m in model.named_modules()}
    paths = [f"{names[id(owner)]}.{attr}" if names[id(owner)] else attr for owner, attr, _ in swaps]
    undo = _swap_all(swaps)  # all or none
    try:
        change = {
            "kind": SUBLAYERS_KIND,
            "removed": [
                {"path": p, "kind": k, "layer": int(new.layer_idx if k == "attn" else new.layer)}
                for p, (_, k), (_, _, new) in zip(paths, items, swaps, strict=True)
            ],
        }
        _append_change(model, change)
    except BaseException:
        undo()
        _set_records(model, meta)
        raise
    for row, p in zip(rows, paths, strict=True):
        row["path"] = p
    return rows


def replay_sublayers(model: nn.Module, change: dict) -> None:
    """Replay a ``sublayers_removed`` change on a freshly built model (load)."""
    for row in change.get("removed", []):
        owner_path, _, attr = row["path"].rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        new = ZeroAttention(row["layer"]) if row["kind"] == "attn" else ZeroFFN(row["layer"])
        setattr(owner, attr, new)


def replay_blocks(model: nn.Module, change: dict) -> None:
    """Nothing to rebuild: the saved config already has the smaller number of blocks."""
    n = change.get("num_layers_after")
    if n is not None and num_blocks(model) != int(n):
        raise InvalidArgumentError(
            f"the saved model has {n} blocks but its config builds {num_blocks(model)}"
        )


def _remap_list(values: list, keep: list[int]) -> list:
    return [values[i] for i in keep]


def check_block_deletion(model: nn.Module, layers: list[int]) -> list[int]:
    """The sorted block numbers to delete, or a clear error (checked before anything changes).

    Example:
        >>> check_block_deletion(model, [5, 3, 5])
        [3, 5]
    """
    n = num_blocks(model)
    drop = sorted({int(i) for i in layers})
    for i in drop:
        if not 0 <= i < n:
            raise LayerIndexError(f"block {i} is out of range: this model has {n} blocks (0–{n - 1})")
    if len(drop) >= n:
        raise InvalidArgumentError(f"cannot delete all {n} blocks; keep at least one")
    known = {"ffn_structure", SUBLAYERS_KIND, BLOCKS_KIND}
    changes = (getattr(model.config, "ffnkit", None) or {}).get("changes", [])
    other = sorted({c.get("kind") for c in changes if c.get("kind") not in known})
    if drop and other:
        raise InvalidArgumentError(
            f"delete blocks before other structural changes ({', '.join(other)}): their records name "
            "layers by number"
        )
    return drop


def delete_blocks_(model: nn.Module, layers: list[int]) -> dict[str, Any]:
    """Delete whole blocks: the ModuleList shrinks, ``layer_idx`` and the config follow; atomic.

    Example:
        >>> delete_blocks_(model, [20, 25])["num_layers_after"]
    """
    from ffnkit.core.edit import structure_of

    owner, attr, mlist = layer_list(model)
    n = len(mlist)
    drop = check_block_deletion(model, layers)
    if not drop:
        return {"deleted": [], "num_layers_before": n, "num_layers_after": n}
    meta = _records(model)
    keep = [i for i in range(n) if i not in drop]
    new_list = nn.ModuleList([mlist[i] for i in keep])
    swaps: list[tuple[Any, str, Any]] = [(owner, attr, new_list)]
    for new_i, old_i in enumerate(keep):
        for mod in mlist[old_i].modules():
            if isinstance(getattr(mod, "layer_idx", None), int) and mod.layer_idx != new_i:
                swaps.append((mod, "layer_idx", new_i))
            if isinstance(mod, ZeroFFN) and mod.layer != new_i:
                swaps.append((mod, "layer", new_i))
    cfg = text_config(model)
    swaps.append((cfg, "num_hidden_layers", len(keep)))
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        swaps.append((cfg, "layer_types", _remap_list(cfg.layer_types, keep)))
    if isinstance(getattr(cfg, "mlp_only_layers", None), list):
        remap = {old: new for new, old in enumerate(keep)}
        swaps.append((cfg, "mlp_only_layers", [remap[i] for i in cfg.mlp_only_layers if i in remap]))
    undo = _swap_all(swaps)  # all or none
    try:
        # the records name layers by number: rewrite them in the new numbering (a canonical history)
        prior = [c for c in meta.get("changes", []) if c.get("kind") == BLOCKS_KIND]
        change = {
            "kind": BLOCKS_KIND,
            "deleted": drop,
            "num_layers_before": n,
            "num_layers_after": len(keep),
        }
        changes = [*prior, change]
        zeros = removed_sublayers(model)
        if zeros:
            changes.append({"kind": SUBLAYERS_KIND, "removed": zeros})
        new_meta = dict(meta)
        if any(c.get("kind") == "ffn_structure" for c in meta.get("changes", [])):
            structure = structure_of(model)
            changes.append({"kind": "ffn_structure", **structure})
            new_meta["structure"] = structure
        new_meta["changes"] = changes
        model.config.ffnkit = new_meta
    except BaseException:
        undo()
        _set_records(model, meta)
        raise
    return change
