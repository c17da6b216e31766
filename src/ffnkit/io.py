"""save / load of changed models: safetensors + config + tokenizer, and ``ffnkit.json`` with every change.

A saved folder is a normal transformers folder (``save_pretrained``) plus ``ffnkit.json``::

    {"format": 1, "ffnkit_version": "0.1.0", "base_model": "smollm2-135m",
     "model_class": "LlamaForCausalLM", "changes": [...structural changes...], "reports": [...]}

Loading rebuilds the architecture from the config, replays the structural changes as *shapes only*
(through :mod:`ffnkit.core.edit`), then loads the state dict, so logits are reproduced exactly. Where
the result is a standard architecture (e.g. every FFN pruned to one width: just a smaller
``intermediate_size``), plain ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads it too.

Later transforms add their structural change kind with one entry in the :data:`REPLAYS` registry (or
a call to :func:`register_replay`): ``kind -> "module:function"`` (imported lazily) or a callable
``fn(model, change_dict)`` that reshapes a freshly built model.

Example:
    >>> prune_(model, PruneConfig("flap", 0.3), tokenizer=tok)
    >>> save(model, tok, "out/flap30")
    >>> model2, tok2 = load("out/flap30")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffnkit.core.errors import SavedModelError
from ffnkit.core.registry import Registry

__all__ = ["FORMAT", "REPLAYS", "load", "register_replay", "save"]

FORMAT = 1
MANIFEST = "ffnkit.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# structural change kind -> replay function fn(model, change) (a callable or "module:function", imported
# when a saved folder needs it)
REPLAYS: Registry[Callable[[nn.Module, dict], None]] = Registry(
    "structural change kind",
    error=SavedModelError,
    hint="this ffnkit cannot rebuild it: update ffnkit (or register_replay the kind's module)",
)
REPLAYS.register("ffn_structure", "ffnkit.core.edit:replay_structure", help="FFN widths and biases")
REPLAYS.register("ffn_lowrank", "ffnkit.compress.lowrank:replay_lowrank", help="low-rank factor shapes")
REPLAYS.register("sublayers_removed", "ffnkit.compress.sublayers:replay_sublayers", help="removed sublayers")
REPLAYS.register("blocks_removed", "ffnkit.compress.sublayers:replay_blocks", help="removed blocks")
REPLAYS.register("ffn_quantized", "ffnkit.compress.quantize:replay_quantized", help="packed integer weights")


def register_replay(kind: str, fn: Callable[[nn.Module, dict], None] | str, help: str = "") -> None:
    """Teach ``load`` how to rebuild the shapes of a structural change ``kind``.

    Example:
        >>> register_replay("ffn_lowrank", "ffnkit.compress.lowrank:replay_lowrank")
    """
    REPLAYS.register(kind, fn, help=help)


def _replay_fn(kind: str) -> Callable[[nn.Module, dict], None]:
    return REPLAYS.get(kind)


def _version() -> str:
    from ffnkit import __version__

    return __version__


def save(model: nn.Module, tokenizer: Any, path: str | Path, report: Any = None) -> Path:
    """Save a (changed) model, its tokenizer and ``ffnkit.json`` into folder ``path``.

    ``report`` (a report object with ``to_dict()`` or a dict) is appended to the reports the model
    already carries (``model.ffnkit_reports``: those of earlier transforms and of the loaded folder).

    Example:
        >>> report = prune_(model, PruneConfig("wanda-sp", 0.2), tokenizer=tok)
        >>> save(model, tok, "pruned", report=report)
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SavedModelError(f"{path} exists and is not a folder; choose another output path")
    path.mkdir(parents=True, exist_ok=True)
    reports = list(getattr(model, "ffnkit_reports", []) or [])
    if report is not None:
        doc = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        if doc not in reports:
            reports.append(doc)
    meta = getattr(model.config, "ffnkit", None) or {}
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    manifest = {
        "format": FORMAT,
        "ffnkit_version": _version(),
        "base_model": getattr(model, "ffnkit_name", None) or getattr(model.config, "_name_or_path", None),
        "model_class": type(model).__name__,
        "changes": meta.get("changes", []),
        "reports": reports,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def _read_manifest(path: Path) -> dict:
    try:
        doc = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SavedModelError(
            f"{path / MANIFEST} is unreadable ({type(exc).__name__}); save the model again with ffnkit.save"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("changes", []), list):
        raise SavedModelError(
            f"{path / MANIFEST} is not an ffnkit manifest (no 'changes' list); save the model again"
        )
    return doc


def _model_class(config: Any, name: str | None):
    import transformers

    cls = getattr(transformers, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return cls
    from ffnkit.models import _auto_class

    return _auto_class(config)


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise SavedModelError(f"{path} is not a folder; give the folder written by ffnkit.save")
    if not (path / "config.json").is_file():
        raise SavedModelError(
            f"{path} has no config.json; it is not a saved model (save it with ffnkit.save)"
        )
    if not any((path / w).is_file() for w in _WEIGHTS):
        raise SavedModelError(
            f"{path} has no weights (model.safetensors); save the model again with ffnkit.save"
        )


def load(path: str | Path) -> tuple[nn.Module, Any]:
    """Load a folder written by :func:`save`: (model in eval mode, tokenizer), logits exactly as saved.

    Example:
        >>> model, tok = load("pruned")
        >>> model.config.ffnkit["structure"]["d_ff"][:3]
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    _check_folder(path)
    manifest = _read_manifest(path) if (path / MANIFEST).is_file() else {"changes": []}
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise SavedModelError(f"{path}/config.json is unreadable ({exc}); save the model again") from None
    changes = manifest.get("changes") or (getattr(config, "ffnkit", None) or {}).get("changes", [])
    for change in changes:
        if not isinstance(change, dict) or "kind" not in change:
            raise SavedModelError(f"{path / MANIFEST}: a change without a 'kind'; save the model again")
        _replay_fn(change["kind"])  # fail early on a kind this ffnkit does not know
    cls = _model_class(config, manifest.get("model_class"))
    model = _from_pretrained_replayed(cls, path, config, changes)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    model.ffnkit_reports = list(manifest.get("reports", []))
    model.ffnkit_name = manifest.get("base_model") or str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None  # a model saved without its tokenizer
    return model, tokenizer


def _replay_all(model: nn.Module, changes: list[dict], path: Path) -> None:
    for change in changes:
        try:
            _replay_fn(change["kind"])(model, change)
        except SavedModelError:
            raise
        except Exception as exc:
            raise SavedModelError(
                f"{path}: could not rebuild change {change['kind']!r} ({exc}); the folder does not match "
                "its config — save the model again"
            ) from None


def _from_pretrained_replayed(cls: type, path: Path, config: Any, changes: list[dict]) -> nn.Module:
    """``cls.from_pretrained`` where the freshly built model is reshaped by the changes before loading.

    transformers builds the model (on the meta device) and then loads the checkpoint with its own key
    renaming and tensor conversions; a subclass with the same name replays the structural changes at the
    end of ``__init__``, so the loader sees the saved shapes.
    """
    if not changes:
        rebuilt = cls
    else:

        def __init__(self, config, *args, **kwargs):  # noqa: N807
            cls.__init__(self, config, *args, **kwargs)
            _replay_all(self, changes, path)

        rebuilt = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    from safetensors import SafetensorError  # a truncated or garbled model.safetensors

    from ffnkit.models import _quiet_progress

    restore = _quiet_progress()  # transformers' "Loading weights" bar on every load
    try:
        model, info = rebuilt.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    except SavedModelError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SavedModelError(
            f"{path}: the weights do not load into the rebuilt model ({first}); save the model again"
        ) from None
    finally:
        restore()
    model.__class__ = cls  # a plain class again (pickling, isinstance by name)
    bad = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if bad:
        detail = "; ".join(f"{k}: {sorted(map(str, info[k]))[:3]}" for k in bad)
        raise SavedModelError(
            f"{path}: the weights do not match the rebuilt model ({detail}); the folder is corrupt or "
            "from another ffnkit version — save the model again"
        )
    return model
