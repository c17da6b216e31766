"""Sublayer and block removal for real, the structural part of ``ffnkit.compress.sublayers``.

- a removed **FFN sublayer**: its container (``model.layers.3.mlp``) is replaced by ``ZeroFFN``,
  a module without parameters that returns zeros shaped like its input — exactly what FinerCut's
  zeroing hook computes, with the FFN's parameters gone;
- a removed **attention sublayer**: replaced by ``ZeroAttention``, which returns
  ``(zeros, None)`` like transformers v5 attention modules, and writes a [B, 1, T, 1] placeholder into
  the KV cache so that the cache's length bookkeeping (``get_seq_length``, used for positions and
  masks during ``generate``) stays right even when layer 0's attention is gone;
- a removed **block** (ShortGPT): deleted from the ModuleList; the later blocks' ``layer_idx``
  attributes (KV-cache slots) are renumbered and ``config.num_hidden_layers`` / ``config.layer_types``
  follow, so the result is a plain, smaller architecture that transformers itself rebuilds.

Both modules live in :mod:`ffnkit.modules.zero`. Every removal commits through one
:class:`~ffnkit.core.transaction.Transaction` (atomic) and is recorded in ``model.config.ffnkit`` (kinds
``sublayers_removed`` and ``blocks_removed``), which :func:`replay_sublayers` / :func:`replay_blocks`
rebuild on ``ffnkit.load``.

Example:
    >>> apply_sublayer_removal_(model, [(3, "attn"), (5, "ffn")])
    >>> delete_blocks_(model, [20])["num_layers_after"]
"""

from __future__ import annotations

from typing import Any

from torch import nn

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
from ffnkit.core.transaction import Transaction
from ffnkit.modules.zero import ZeroAttention, ZeroFFN

__all__ = [
    "BLOCKS_KIND",
    "SUBLAYERS_KIND",
    "apply_sublayer_removal_",
    "check_block_deletion",
    "delete_blocks_",
    "removed_sublayers",
    "replay_blocks",
    "replay_sublayers",
]

SUBLAYERS_KIND = ZeroFFN.change_kind  # "sublayers_removed"
BLOCKS_KIND = "blocks_removed"


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
    names = {id(m): n for n, m in model.named_modules()}
    paths = [f"{names[id(owner)]}.{attr}" if names[id(owner)] else attr for owner, attr, _ in swaps]
    with Transaction(model) as tx:  # all or none
        for owner, attr, new in swaps:
            tx.swap(owner, attr, new)
        removed = [new.to_record(p) for p, (_, _, new) in zip(paths, swaps, strict=True)]
        tx.record({"kind": SUBLAYERS_KIND, "removed": removed})
        tx.record_structure(if_recorded=True)  # the width list now covers the FFNs left
    for row, p in zip(rows, paths, strict=True):
        row["path"] = p
    return rows


def replay_sublayers(model: nn.Module, change: dict) -> None:
    """Replay a ``sublayers_removed`` change on a freshly built model (load)."""
    for row in change.get("removed", []):
        (ZeroAttention if row["kind"] == "attn" else ZeroFFN).replay(model, row)


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
    meta = dict(getattr(model.config, "ffnkit", None) or {})
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
    with Transaction(model) as tx:  # all or none
        for obj, attr, value in swaps:
            tx.swap(obj, attr, value)
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
        if any(c.get("kind") == "ffn_structure" for c in meta.get("changes", [])):
            structure = structure_of(model)
            changes.append({"kind": "ffn_structure", **structure})
            tx.set_meta("structure", structure)
        tx.set_meta("changes", changes)
    return change
