"""Sublayer and block removal for real: FinerCut's greedy order, ShortGPT's block influence.

The scores come from :mod:`ffnkit.inspect.importance` (FinerCut's JS divergence with zeroing hooks,
ShortGPT's BI); this module then changes the model's structure:

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

What ``ratio`` means (the CLI's R is the share of FFN parameters removed):

- FinerCut, ``kind="ffn"`` or ``"all"``: the greedy order runs until round(ratio × #FFNs) FFN sublayers
  are removed; with ``"all"`` the attention sublayers that come earlier in the order go as well (extra
  savings outside the FFNs). With equal widths, #FFN sublayers removed / #FFNs = FFN parameters removed.
- FinerCut, ``kind="attn"``: round(ratio × #attention sublayers) attention sublayers.
- ShortGPT: round(ratio × #blocks) blocks (``kind="all"``), or the FFN / attention sublayers of the
  round(ratio × #blocks) lowest-BI blocks (``kind="ffn"`` / ``"attn"``).

``count`` instead gives the number of removed candidates directly; ``method="manual"`` removes the
names in ``remove`` (``"layers.3.attn"``, ``"layers.5.ffn"``, ``"layers.7"`` for a whole block).

Saved models replay the change (``ffnkit.io`` kinds ``sublayers_removed`` and ``blocks_removed``).

Example:
    >>> report = remove_sublayers_(model, SublayerConfig("finercut", ratio=0.2, kind="ffn"), tokenizer=tok)
    >>> [r["name"] for r in report.removed][:3], report.parameters_after["ffn"]
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError
from ffnkit.io import register_replay

__all__ = [
    "BLOCKS_KIND",
    "SUBLAYERS_KIND",
    "SublayerConfig",
    "SublayerReport",
    "ZeroAttention",
    "ZeroFFN",
    "finercut_order",
    "remove_sublayers_",
    "removed_sublayers",
]

METHODS = ("finercut", "shortgpt", "manual")
KINDS = ("all", "attn", "ffn")
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


# ----- config and report --------------------------------------------------------------------------
@dataclass
class SublayerConfig(JsonConfig):
    """Which sublayers or blocks to remove (see the module docstring for ``ratio``).

    Example:
        >>> SublayerConfig("shortgpt", ratio=0.2).to_dict()["kind"]
        'all'
    """

    method: str = "finercut"
    ratio: float | None = None  # share of FFN parameters (FFN sublayers / blocks) removed, [0, 1)
    count: int | None = None  # or: the number of candidates removed
    kind: str = "all"  # "all" | "attn" | "ffn"
    remove: list[str] | None = None  # method "manual": ["layers.3.attn", "layers.5.ffn", "layers.7"]
    samples: int = 8  # calibration windows (FinerCut is O(L²) forwards: keep it small)
    seq_len: int = 128
    batch_size: int = 4
    corpus: str = "shakespeare"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.method == "manual":
            if not self.remove:
                raise InvalidArgumentError(
                    "method 'manual' needs remove=[...] names like 'layers.3.attn', 'layers.5.ffn', 'layers.7'"
                )
        elif (self.ratio is None) == (self.count is None):
            raise InvalidArgumentError(
                f"give exactly one of ratio (share of FFN parameters removed) or count for {self.method!r}"
            )
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
                raise InvalidArgumentError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
            if not 0.0 <= float(self.ratio) < 1.0:
                raise InvalidArgumentError(f"ratio must be in [0, 1), got {self.ratio}")
            self.ratio = float(self.ratio)
        if self.count is not None and (
            isinstance(self.count, bool) or int(self.count) != self.count or self.count < 0
        ):
            raise InvalidArgumentError(f"count must be an integer >= 0, got {self.count!r}")
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise InvalidArgumentError("samples and batch_size must be >= 1 and seq_len >= 2")


@dataclass
class SublayerReport:
    """What ``remove_sublayers_`` removed (JSON-ready through ``to_dict``)."""

    transform: str
    method: str
    config: dict[str, Any]
    removed: list[dict[str, Any]]  # name, kind, layer (original numbering), score, parameters
    scores: dict[str, Any] | None  # the FinerCut order / ShortGPT BI per block
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    ffn_ratio_removed: float
    num_layers_before: int
    num_layers_after: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- helpers ------------------------------------------------------------------------------------
def _blocks(model: nn.Module):
    from ffnkit.inspect.importance import blocks

    return blocks(model)


def _layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, ModuleList) of the model's single stack of blocks."""
    from ffnkit.core.archs import _find_layer_lists, resolve_spec

    found = _find_layer_lists(model, resolve_spec(model))
    if len(found) != 1:
        raise InvalidArgumentError("sublayer removal needs a single stack of blocks (a decoder-only model)")
    _, path, mlist = found[0]
    owner_path, _, attr = path.rpartition(".")
    return model.get_submodule(owner_path) if owner_path else model, attr, mlist


def _all_blocks(model: nn.Module) -> list[nn.Module]:
    return list(_layer_list(model)[2])


def _text_config(model: nn.Module) -> Any:
    return getattr(model.config, "text_config", None) or model.config


def _num_layers(model: nn.Module) -> int:
    return len(_layer_list(model)[2])


def _nparams(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _attn_path(model: nn.Module) -> str:
    from ffnkit.core.archs import resolve_spec

    attn = resolve_spec(model).attn
    if not attn:
        raise InvalidArgumentError(f"no attention path known for {model.config.model_type!r}")
    return attn


def _ffn_rel_path(model: nn.Module) -> str:
    """The FFN container's path inside a block; "" (OPT, BERT: the FFN is the block itself) is refused."""
    from ffnkit.core.archs import resolve_spec

    spec = resolve_spec(model)
    block0 = _all_blocks(model)[0]
    for p in spec.ffn:
        if p and _has(block0, p):
            return p
    raise InvalidArgumentError(
        f"{model.config.model_type!r} keeps its FFN inside the block (no FFN module of its own), so an FFN "
        "sublayer cannot be removed alone; remove whole blocks (method 'shortgpt', kind 'all') instead"
    )


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


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
def _swap_all(swaps: list[tuple[Any, str, Any]]) -> None:
    """setattr every (obj, name, value), or none: undo on failure."""
    done = []
    try:
        for obj, name, value in swaps:
            old = getattr(obj, name)
            setattr(obj, name, value)
            done.append((obj, name, old))
    except BaseException:
        for obj, name, old in reversed(done):
            setattr(obj, name, old)
        raise


def _plan_sublayers(model: nn.Module, items: list[tuple[int, str]]) -> list[tuple[Any, str, Any]]:
    """Swaps that replace (block index, "attn"|"ffn") by zero modules."""
    blocks = _all_blocks(model)
    swaps = []
    for layer, kind in items:
        if not 0 <= layer < len(blocks):
            raise LayerIndexError(f"layer {layer} is out of range: this model has {len(blocks)} blocks")
        rel = _attn_path(model) if kind == "attn" else _ffn_rel_path(model)
        owner_rel, _, attr = rel.rpartition(".")
        owner = blocks[layer].get_submodule(owner_rel) if owner_rel else blocks[layer]
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
        rows.append({"layer": layer, "kind": kind, "parameters": _nparams(getattr(owner, attr))})
    n_ffn_left = len(_blocks(model)) - sum(k == "ffn" for _, k in items)
    if n_ffn_left < 1:
        raise InvalidArgumentError("removal would leave no FFN in the model; keep at least one")
    meta = _records(model)
    names = {id(m): n for n, m in model.named_modules()}
    paths = [f"{names[id(owner)]}.{attr}" if names[id(owner)] else attr for owner, attr, _ in swaps]
    olds = [getattr(o, a) for o, a, _ in swaps]
    try:
        _swap_all(swaps)
        change = {
            "kind": SUBLAYERS_KIND,
            "removed": [
                {"path": p, "kind": k, "layer": int(new.layer_idx if k == "attn" else new.layer)}
                for p, (_, k), (_, _, new) in zip(paths, items, swaps, strict=True)
            ],
        }
        _append_change(model, change)
    except BaseException:
        for (o, a, _), old in zip(swaps, olds, strict=True):
            setattr(o, a, old)
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
    if n is not None and _num_layers(model) != int(n):
        raise InvalidArgumentError(
            f"the saved model has {n} blocks but its config builds {_num_layers(model)}"
        )


register_replay(SUBLAYERS_KIND, "ffnkit.compress.sublayers:replay_sublayers")
register_replay(BLOCKS_KIND, "ffnkit.compress.sublayers:replay_blocks")


def _remap_list(values: list, keep: list[int]) -> list:
    return [values[i] for i in keep]


def _check_block_deletion(model: nn.Module, layers: list[int]) -> list[int]:
    """The sorted block numbers to delete, or a clear error (before anything changes)."""
    n = _num_layers(model)
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

    owner, attr, mlist = _layer_list(model)
    n = len(mlist)
    drop = _check_block_deletion(model, layers)
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
    cfg = _text_config(model)
    swaps.append((cfg, "num_hidden_layers", len(keep)))
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        swaps.append((cfg, "layer_types", _remap_list(cfg.layer_types, keep)))
    if isinstance(getattr(cfg, "mlp_only_layers", None), list):
        remap = {old: new for new, old in enumerate(keep)}
        swaps.append((cfg, "mlp_only_layers", [remap[i] for i in cfg.mlp_only_layers if i in remap]))
    olds = [getattr(o, a) for o, a, _ in swaps]
    try:
        _swap_all(swaps)
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
        for (o, a, _), old in zip(reversed(swaps), reversed(olds), strict=True):
            setattr(o, a, old)
        _set_records(model, meta)
        raise
    return change


# ----- scores -------------------------------------------------------------------------------------
class _SuffixRunner:
    """Re-run only the blocks from layer l on, from block inputs captured under the current removals.

    A candidate in block l leaves blocks 0..l-1 unchanged, so FinerCut's trial forwards can start at
    block l (about half the work on average). Used only where a self-check shows that running every
    block from its captured input, then the final norm and the LM head, reproduces the model's logits.
    """

    def __init__(self, model: nn.Module) -> None:
        from ffnkit.core.archs import resolve_spec

        self.model = model
        self.blocks = _all_blocks(model)
        spec = resolve_spec(model)
        self.norm = None
        for name, mod in model.named_modules():
            if any(name == p or name.endswith("." + p) for p in spec.final_norm):
                self.norm = mod
                break
        self.head = model.get_output_embeddings()

    def capture(self, ids: Tensor) -> tuple[Tensor, list[tuple[tuple, dict]]]:
        """Full forward: (log-probs [b, T, V], every block's (args, kwargs))."""
        from ffnkit.inspect.stats import model_forward

        inputs: list[tuple[tuple, dict]] = [((), {})] * len(self.blocks)

        def pre(i: int):
            def hook(mod, args, kwargs):
                inputs[i] = (args, dict(kwargs))

            return hook

        handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            # no KV cache: a cache object in the captured kwargs would grow on every re-run
            logp = torch.log_softmax(model_forward(self.model, ids, use_cache=False).logits.float(), dim=-1)
        finally:
            for h in handles:
                h.remove()
        return logp, inputs

    def run_from(self, layer: int, inputs: list[tuple[tuple, dict]]) -> Tensor:
        """Log-probs [b, T, V] from block ``layer`` on (hooks on the model are active as usual)."""
        args, kwargs = inputs[layer]
        h = args[0] if args else kwargs["hidden_states"]  # [b, T, d]
        for j in range(layer, len(self.blocks)):
            args, kwargs = inputs[j]
            if args:
                out = self.blocks[j](h, *args[1:], **kwargs)
            else:
                out = self.blocks[j](*args, **{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
        if self.norm is not None:
            h = self.norm(h)
        return torch.log_softmax(self.head(h).float(), dim=-1)

    def works(self, ids: Tensor) -> bool:
        if self.norm is None or self.head is None:
            return False
        try:
            logp, inputs = self.capture(ids)
            return bool(torch.allclose(self.run_from(0, inputs), logp, atol=1e-4, rtol=1e-4))
        except Exception:  # any layout this shortcut does not fit: use full forwards
            return False


def finercut_order(
    model: nn.Module,
    batches: Tensor,
    *,
    kind: str = "all",
    ffn_target: int | None = None,
    steps: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
    on_step: Any = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """FinerCut's greedy order restricted to ``kind`` candidates, stopping after ``steps`` removals or
    once ``ffn_target`` FFN sublayers are removed. Reuses ``ffnkit.inspect.importance``'s candidates,
    zeroing hooks and JS divergence (its ``finercut`` scores every kind and a fixed number of steps).
    Trial forwards start at the candidate's block (the blocks before it are unchanged), where a
    self-check allows. ``on_step(result_so_far)`` is called after every step (to save partial orders);
    ``resume``: a partial result of the same call (same model and batches) to continue from.

    Example:
        >>> finercut_order(model, batches, kind="ffn", steps=3)["order"][0]["name"]
    """
    from ffnkit.inspect.importance import _check_lm, _log_probs, js_divergence, remove_sublayers, sublayers
    from ffnkit.inspect.stats import iter_batches

    _check_lm(model, "FinerCut")
    cands = [c for c in sublayers(model) if kind == "all" or c.kind == kind]
    cands = [c for c in cands if not isinstance(c.module, ZeroAttention | ZeroFFN)]
    n_ffn = sum(c.kind == "ffn" for c in cands)
    if ffn_target is not None and not 0 <= ffn_target <= n_ffn:
        raise InvalidArgumentError(f"cannot remove {ffn_target} FFN sublayers: the model has {n_ffn}")
    limit = len(cands) if steps is None else int(steps)
    if not 0 <= limit <= len(cands):
        raise InvalidArgumentError(f"steps must be in 0..{len(cands)} (the candidates), got {steps}")
    device = next(model.parameters()).device
    chunks = [ids.to(device) for _, ids in iter_batches(batches, batch_size)]
    order: list[dict[str, Any]] = []
    result = {
        "method": "finercut",
        "metric": "mean over tokens of JS(original, pruned) next-token distributions, nats",
        "kind": kind,
        "n_candidates": len(cands),
        "calibration": {"samples": int(batches.shape[0]), "seq_len": int(batches.shape[1])},
        "order": order,
    }
    with torch.no_grad():
        reference = [_log_probs(model, ids) for ids in chunks]  # [b, T, V] each
        runner = _SuffixRunner(model)
        fast = runner.works(chunks[0][:1]) if chunks else False
        result["suffix_reuse"] = fast

        removed: list = []
        if resume is not None:  # the greedy order is deterministic: continue an earlier prefix
            by_name = {c.name: c for c in cands}
            for r in resume["order"]:
                if r["name"] not in by_name:
                    raise InvalidArgumentError(f"cannot resume: {r['name']} is not a candidate of this model")
                removed.append(by_name[r["name"]])
                order.append(dict(r))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="finercut", leave=False)
        while len(removed) < limit:
            if ffn_target is not None and sum(c.kind == "ffn" for c in removed) >= ffn_target:
                break
            left = [c for c in cands if c not in removed]
            with remove_sublayers(model, removed):
                inputs = [runner.capture(ids)[1] for ids in chunks] if fast else None
            trials = []
            for c in left:
                total, count = 0.0, 0
                with remove_sublayers(model, [*removed, c]):
                    for k, (ids, ref) in enumerate(zip(chunks, reference, strict=True)):
                        logq = runner.run_from(c.layer, inputs[k]) if fast else _log_probs(model, ids)
                        js = js_divergence(ref, logq)  # [b, T]
                        total += float(js.double().sum())
                        count += js.numel()
                trials.append(total / count)
                if bar is not None:
                    bar.update(1)
            best = min(range(len(left)), key=lambda i: trials[i])  # first minimum: deterministic
            removed.append(left[best])
            order.append({"step": len(removed), **left[best].to_dict(), "js": trials[best]})
            if on_step is not None:
                on_step(result)
        if bar is not None:
            bar.close()
    return result


def _calibration(config: SublayerConfig, calibration: Tensor | None, tokenizer: Any) -> Tensor:
    from ffnkit.data import calibration_ids

    return calibration_ids(config, calibration, tokenizer, what=f"method {config.method!r}")


def _parse_manual(names: list[str], n_blocks: int) -> tuple[list[tuple[int, str]], list[int]]:
    items, blocks = [], []
    for name in names:
        parts = str(name).split(".")
        ok = len(parts) in (2, 3) and parts[0] == "layers" and parts[1].lstrip("-").isdigit()
        if not ok or (len(parts) == 3 and parts[2] not in ("attn", "ffn")):
            raise InvalidArgumentError(
                f"cannot read {name!r}: use 'layers.<i>.attn', 'layers.<i>.ffn' or 'layers.<i>' (a block)"
            )
        i = int(parts[1])
        if not 0 <= i < n_blocks:
            raise LayerIndexError(
                f"layer {i} is out of range: this model has {n_blocks} blocks (0–{n_blocks - 1})"
            )
        if len(parts) == 2:
            blocks.append(i)
        else:
            items.append((i, parts[2]))
    if len(set(items)) != len(items) or len(set(blocks)) != len(blocks):
        raise InvalidArgumentError("a sublayer or block is named twice in remove=[...]")
    return items, blocks


def _how_many(config: SublayerConfig, n: int, what: str) -> int:
    k = round(config.ratio * n) if config.ratio is not None else int(config.count)
    if k > n:
        raise InvalidArgumentError(f"count {k} is more than the {n} {what} of this model")
    return k


# ----- the transform ------------------------------------------------------------------------------
def remove_sublayers_(
    model: nn.Module,
    config: SublayerConfig,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    order: dict[str, Any] | None = None,
    progress: bool = False,
) -> SublayerReport:
    """Remove attention / FFN sublayers or whole blocks for real (parameters drop); atomic.

    ``order``: a precomputed :func:`finercut_order` or ``block_influence`` result on this unmodified
    model, to apply several ratios without rescoring (FinerCut's greedy order is nested: the first
    k steps of a longer run are the run of k steps).

    Example:
        >>> rep = remove_sublayers_(model, SublayerConfig("shortgpt", ratio=0.2), tokenizer=tok)
        >>> rep.num_layers_after, rep.parameters_after["total"] < rep.parameters_before["total"]
    """
    from ffnkit.core.archs import find_ffns
    from ffnkit.evaluate import count_parameters

    start = time.perf_counter()
    before = count_parameters(model, find_ffns(model))
    n_blocks = _num_layers(model)
    blocks = _blocks(model)
    n_ffn = len(blocks)
    scores: dict[str, Any] | None = None
    items: list[tuple[int, str]] = []
    drop_blocks: list[int] = []
    notes: list[str] = []
    score_of: dict[tuple[int, str], float] = {}
    if config.method == "manual":
        items, drop_blocks = _parse_manual(list(config.remove or []), n_blocks)
    elif config.method == "finercut":
        if config.kind == "attn":
            k, target = _how_many(config, n_ffn, "attention sublayers"), None
        elif config.ratio is not None:
            k, target = None, round(config.ratio * n_ffn)
        else:
            k, target = _how_many(config, n_ffn * (2 if config.kind == "all" else 1), "sublayers"), None
        if target is not None and target >= n_ffn:
            raise InvalidArgumentError(f"ratio {config.ratio} would remove every FFN; use a smaller ratio")
        if k == 0 or target == 0:
            scores = {"method": "finercut", "order": []}
        else:
            if order is None:
                ids = _calibration(config, calibration, tokenizer)
                order = finercut_order(
                    model,
                    ids,
                    kind=config.kind,
                    ffn_target=target,
                    steps=k,
                    batch_size=config.batch_size,
                    progress=progress,
                )
            rows = [r for r in order["order"] if config.kind == "all" or r["kind"] == config.kind]
            chosen, n_f = [], 0
            for r in rows:
                if k is not None and len(chosen) >= k:
                    break
                if target is not None and n_f >= target:
                    break
                chosen.append(r)
                n_f += r["kind"] == "ffn"
            if (k is not None and len(chosen) < k) or (target is not None and n_f < target):
                raise InvalidArgumentError("the given FinerCut order is too short for this ratio/count")
            items = [(int(r["layer"]), r["kind"]) for r in chosen]
            score_of = {(int(r["layer"]), r["kind"]): float(r["js"]) for r in chosen}
            scores = {**order, "order": rows}
    else:  # shortgpt
        k = _how_many(config, n_blocks, "blocks")
        if config.kind in ("all", "ffn") and k >= n_ffn:
            raise InvalidArgumentError(f"ratio/count would remove all {n_ffn} blocks; use a smaller one")
        if order is None:
            from ffnkit.inspect.importance import block_influence

            order = (
                block_influence(
                    model, _calibration(config, calibration, tokenizer), batch_size=config.batch_size
                )
                if k > 0
                else {"method": "shortgpt", "layers": [], "ranking": []}
            )
        scores = order
        lowest = [int(i) for i in order["ranking"][:k]]
        bi = {int(r["layer"]): float(r["bi"]) for r in order.get("layers", [])}
        if config.kind == "all":
            drop_blocks = lowest
            score_of = {(i, "block"): bi.get(i, float("nan")) for i in lowest}
        else:
            items = [(i, config.kind) for i in lowest]
            score_of = {(i, config.kind): bi.get(i, float("nan")) for i in lowest}
        notes.append("BI = block influence of the whole block (ShortGPT); lowest first")
    if drop_blocks:
        _check_block_deletion(model, drop_blocks)  # fail before the sublayers change
    removed = apply_sublayer_removal_(model, items)
    for r in removed:
        r["name"] = f"layers.{r['layer']}.{r['kind']}"
        r["score"] = score_of.get((r["layer"], r["kind"]))
    if drop_blocks:
        block_params = {i: _nparams(_all_blocks(model)[i]) for i in drop_blocks}
        delete_blocks_(model, drop_blocks)
        removed += [
            {
                "name": f"layers.{i}",
                "kind": "block",
                "layer": i,
                "parameters": block_params[i],
                "score": score_of.get((i, "block")),
            }
            for i in sorted(drop_blocks)
        ]
    after = count_parameters(model, find_ffns(model))
    report = SublayerReport(
        transform="remove_sublayers",
        method=config.method,
        config=config.to_dict(),
        removed=removed,
        scores=scores,
        parameters_before=before,
        parameters_after=after,
        ffn_ratio_removed=1 - after["ffn"] / before["ffn"] if before["ffn"] else 0.0,
        num_layers_before=n_blocks,
        num_layers_after=_num_layers(model),
        seconds=time.perf_counter() - start,
        notes=notes,
    )
    model.ffnkit_reports = [*list(getattr(model, "ffnkit_reports", []) or []), report.to_dict()]
    return report


# ----- `ffnkit compress` methods (registered by ffnkit.cli.compress) ------------------------------
def cli_finercut(model: nn.Module, tokenizer: Any, opts: Any) -> SublayerReport:
    """``--method finercut``: remove the FFN sublayers FinerCut's greedy order picks, R = FFN share.

    FinerCut costs O(L²) forwards: calibration is capped at 8 windows of 128 tokens.
    """
    config = SublayerConfig(
        "finercut",
        ratio=opts.ratio,
        kind="ffn",
        samples=min(opts.samples, 8),
        seq_len=min(opts.seq_len, 128),
        corpus=opts.corpus,
        seed=opts.seed,
    )
    return remove_sublayers_(model, config, tokenizer=tokenizer, progress=opts.progress)


def cli_shortgpt(model: nn.Module, tokenizer: Any, opts: Any) -> SublayerReport:
    """``--method shortgpt``: delete the round(R × L) blocks of lowest block influence."""
    config = SublayerConfig(
        "shortgpt",
        ratio=opts.ratio,
        samples=opts.samples,
        seq_len=opts.seq_len,
        corpus=opts.corpus,
        seed=opts.seed,
    )
    return remove_sublayers_(model, config, tokenizer=tokenizer, progress=opts.progress)
