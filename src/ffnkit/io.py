"""save / load of changed models: safetensors + config + tokenizer, and ``ffnkit.json`` with every change.

A saved folder is a normal transformers folder (``save_pretrained``) plus ``ffnkit.json``::

    {"format": 1, "ffnkit_version": "0.1.0", "base_model": "smollm2-135m",
     "model_class": "LlamaForCausalLM", "changes": [...structural changes...], "reports": [...],
     "files": {"model.safetensors": 538090408}}

Loading rebuilds the architecture from the config, replays the structural changes as *shapes only*
(through :mod:`ffnkit.core.edit`), then loads the state dict, so logits are reproduced exactly. Where
the result is a standard architecture (e.g. every FFN pruned to one width: just a smaller
``intermediate_size``), plain ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads it too;
otherwise (per-layer widths, low-rank, quantised, removed sublayers) ``config.json`` says
``"model_type": "ffnkit"`` and plain transformers refuses the folder instead of loading random weights.

Saving is atomic (:mod:`ffnkit.folders`); a folder whose ``config.json`` records ffnkit changes never
loads without its ``ffnkit.json``, and missing or unexpected weights are always an error.

Later transforms add their structural change kind with one entry in the :data:`REPLAYS` registry (or
a call to :func:`register_replay`): ``kind -> "module:function"`` (imported lazily) or a callable
``fn(model, change_dict)`` that reshapes a freshly built model.

Example:
    >>> prune_(model, PruneConfig("flap", 0.3), tokenizer=tok)
    >>> save(model, tok, "out/flap30")
    >>> model2, tok2 = load("out/flap30")
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffnkit.core.errors import SavedModelError
from ffnkit.core.hf import auto_model_class, quiet_loading
from ffnkit.core.registry import Registry

__all__ = [
    "FFNKIT_MODEL_TYPE",
    "FORMAT",
    "REPLAYS",
    "check_remote_code",
    "load",
    "read_config_dict",
    "records_ffnkit_changes",
    "register_replay",
    "save",
]

FORMAT = 1
MANIFEST = "ffnkit.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_WEIGHT_EXTS = (".safetensors", ".bin", ".index.json")
# config.json's model_type for a folder only ffnkit can rebuild: plain AutoConfig refuses it loudly
FFNKIT_MODEL_TYPE = "ffnkit"

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
REPLAYS.register("ffn_moe", "ffnkit.moe.convert:replay_moe", help="mixture-of-experts blocks")
REPLAYS.register("ffn_drelu", "ffnkit.sparsity.drelu:replay_drelu", help="dReLU FFNs")
REPLAYS.register("ffn_sparsity", "ffnkit.sparsity.transform:replay_sparsity", help="sparse FFN thresholds")


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


def save(
    model: nn.Module, tokenizer: Any, path: str | Path, report: Any = None, *, overwrite: bool = False
) -> Path:
    """Save a (changed) model, its tokenizer and ``ffnkit.json`` into folder ``path``, atomically.

    ``report`` (a report object with ``to_dict()`` or a dict) is appended to the reports the model
    already carries (``model.ffnkit_reports``: those of earlier transforms and of the loaded folder).
    A non-empty ``path`` is refused unless ``overwrite=True``; the ffnkit cache is always refused
    (:func:`ffnkit.folders.check_output_dir`). Everything is written beside ``path`` and renamed into place
    (:func:`ffnkit.folders.atomic_folder`), so a kill or a full disk leaves the old folder or none, never
    half of one. A model whose changes plain transformers cannot rebuild gets ``model_type: "ffnkit"`` in
    its ``config.json``, so ``AutoModel*.from_pretrained`` refuses it instead of loading random weights.

    Example:
        >>> report = prune_(model, PruneConfig("wanda-sp", 0.2), tokenizer=tok)
        >>> save(model, tok, "pruned", report=report)
    """
    from ffnkit.folders import atomic_folder, check_output_dir, recover

    path = Path(path).expanduser()
    recover(path)  # a save of this folder that was killed: finish or undo it first
    check_output_dir(path, overwrite=overwrite, needed_bytes=_state_bytes(model))
    reports = list(getattr(model, "ffnkit_reports", []) or [])
    if report is not None:
        doc = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        if doc not in reports:
            reports.append(doc)
    meta = getattr(model.config, "ffnkit", None) or {}
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta.get("changes") and not _plain_loadable(model):
            _mark_ffnkit_only(tmp / "config.json")
        manifest = {
            "format": FORMAT,
            "ffnkit_version": _version(),
            "base_model": getattr(model, "ffnkit_name", None) or getattr(model.config, "_name_or_path", None),
            "model_class": type(model).__name__,
            "changes": meta.get("changes", []),
            "reports": reports,
            # what a complete folder holds: load refuses one that lost a weight file
            "files": {
                p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name.endswith(_WEIGHT_EXTS)
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors ``save_pretrained`` writes (tied tensors once)."""
    seen: dict[tuple, int] = {}
    for name, t in model.state_dict().items():
        try:
            key: tuple = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        except (RuntimeError, NotImplementedError):  # a tensor subclass without plain storage
            key = (name,)
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def _plain_loadable(model: nn.Module) -> bool:
    """Whether plain transformers rebuilds exactly this model from its config: the class built from the
    config alone (no replayed changes) has the same tensor names and shapes."""
    import copy

    try:
        with torch.device("meta"):
            plain = type(model)(copy.deepcopy(model.config))
    except Exception:
        return False
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return want == {k: tuple(v.shape) for k, v in plain.state_dict().items()}


def _mark_ffnkit_only(config_json: Path) -> None:
    """Make plain ``AutoConfig`` refuse the folder (an unknown model type); :func:`load` restores it."""
    doc = json.loads(config_json.read_text())
    # not under the key "model_type": transformers' config classes would take a sub-dict holding their own
    # model type for the whole config (and build a default-sized model)
    doc.setdefault("ffnkit", {})["original_model_type"] = doc.get("model_type")
    doc["model_type"] = FFNKIT_MODEL_TYPE
    config_json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


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
    """The concrete class to rebuild: the manifest's ``model_class`` when transformers has it and it
    takes this config; else (missing, unknown, an auto class) the class config.json resolves to."""
    import transformers

    cls = getattr(transformers, name, None) if name else None
    config_class = getattr(cls, "config_class", None)
    if (
        isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and (config_class is None or isinstance(config, config_class))
    ):
        return cls
    auto = auto_model_class(config)
    try:
        return auto._model_mapping[type(config)]  # the concrete class the auto class would build
    except KeyError:
        raise SavedModelError(
            f"cannot tell which model class builds this config ({type(config).__name__}, manifest "
            f"model_class {name!r}); save the model again"
        ) from None


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


def read_config_dict(path: str | Path) -> dict:
    """``config.json`` of a model folder as a dict (one-line :class:`SavedModelError` if unreadable).

    Example:
        >>> read_config_dict("pruned")["ffnkit"]["changes"][-1]["kind"]
        'ffn_structure'
    """
    path = Path(path)
    try:
        doc = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SavedModelError(
            f"{path}/config.json is unreadable ({type(exc).__name__}); save the model again"
        ) from None
    if not isinstance(doc, dict):
        raise SavedModelError(f"{path}/config.json is not a JSON object; save the model again")
    return doc


def records_ffnkit_changes(path: str | Path) -> bool:
    """Whether the folder's ``config.json`` says ffnkit changed the model (so only :func:`load` may load it).

    Example:
        >>> records_ffnkit_changes("pruned")
        True
    """
    config_json = Path(path) / "config.json"
    if not config_json.is_file():
        return False
    doc = read_config_dict(path)
    meta = doc.get("ffnkit")
    return doc.get("model_type") == FFNKIT_MODEL_TYPE or bool(isinstance(meta, dict) and meta.get("changes"))


def _check_complete(path: Path, manifest: dict) -> None:
    """The folder holds what its save wrote: the completion marker and every weight file at its size."""
    from ffnkit.folders import COMPLETE

    files = manifest.get("files")
    if isinstance(files, dict):  # written by an ffnkit that saves atomically
        if not (path / COMPLETE).is_file():
            raise SavedModelError(
                f"{path} is incomplete (no {COMPLETE} marker: its save did not finish); save the model again"
            )
        for name, size in files.items():
            f = path / name
            if not f.is_file() or f.stat().st_size != size:
                what = "is missing" if not f.is_file() else f"has {f.stat().st_size} bytes, not {size}"
                raise SavedModelError(f"{path}: {name} {what}; the folder is damaged — save the model again")


def check_remote_code(path: str | Path, trust_remote_code: bool) -> None:
    """Refuse a model folder that needs its own Python code (``auto_map`` in ``config.json`` or
    ``tokenizer_config.json``) unless ``trust_remote_code``: one line, nothing run, nothing asked.

    A config ``auto_map`` beside a model type transformers knows is loaded with transformers' own code
    (nothing foreign runs; transformers does the same); a note on stderr says the folder's code is unused.

    Example:
        >>> check_remote_code("folder-with-auto_map", trust_remote_code=False)
        Traceback (most recent call last):
        RemoteCodeError: folder-with-auto_map needs its own Python code to load (auto_map in config.json); ...
    """
    import sys

    from transformers import CONFIG_MAPPING

    from ffnkit.core.errors import RemoteCodeError

    if trust_remote_code:
        return
    path = Path(path)
    config = read_config_dict(path)
    tokenizer_config: dict = {}
    with contextlib.suppress(OSError, ValueError):
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    known = model_type in CONFIG_MAPPING and model_type != FFNKIT_MODEL_TYPE
    for name, doc in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if not (isinstance(doc, dict) and doc.get("auto_map")):
            continue
        if name == "config.json" and known:
            sys.stderr.write(
                f"ffnkit: note: {path} ships its own Python code (auto_map); it is not run: transformers' "
                f"built-in {model_type!r} code is used (add --trust-remote-code to run the folder's code)\n"
            )
            continue
        raise RemoteCodeError(
            f"{path} needs its own Python code to load (auto_map in {name}); ffnkit does not run a model's "
            "code unless you add --trust-remote-code (Python: trust_remote_code=True)"
        )


def _config_from(path: Path, doc: dict, trust_remote_code: bool) -> Any:
    """The transformers config of a saved folder, with the model type restored where save hid it."""
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        if doc.get("model_type") != FFNKIT_MODEL_TYPE:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        meta = dict(doc.get("ffnkit") or {})
        model_type = meta.pop("original_model_type", None)
        if model_type not in CONFIG_MAPPING:
            raise SavedModelError(
                f"{path}/config.json: unknown original model type {model_type!r}; save the model again"
            )
        config = CONFIG_MAPPING[model_type].from_dict({**doc, "model_type": model_type, "ffnkit": meta})
        config._name_or_path = str(path)
        return config
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SavedModelError(f"{path}/config.json is unreadable ({first}); save the model again") from None


def load(path: str | Path, *, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load a folder written by :func:`save`: (model in eval mode, tokenizer), logits exactly as saved.

    Refused with a one-line :class:`SavedModelError`: a folder whose ``config.json`` records ffnkit changes
    but whose ``ffnkit.json`` is missing or damaged, an incomplete save, and weights that do not match the
    rebuilt model (missing, unexpected or of another shape). A model with its own code (``auto_map``)
    needs ``trust_remote_code=True``.

    Example:
        >>> model, tok = load("pruned")
        >>> model.config.ffnkit["structure"]["d_ff"][:3]
    """
    from transformers import AutoTokenizer

    from ffnkit.folders import recover

    path = Path(path).expanduser()
    recover(path)  # a save of this folder that was killed: finish or undo it first
    _check_folder(path)
    doc = read_config_dict(path)
    check_remote_code(path, trust_remote_code)
    recorded = (doc.get("ffnkit") or {}).get("changes", []) if isinstance(doc.get("ffnkit"), dict) else []
    if (path / MANIFEST).is_file():
        manifest = _read_manifest(path)
        _check_complete(path, manifest)
    elif recorded or doc.get("model_type") == FFNKIT_MODEL_TYPE:
        raise SavedModelError(
            f"{path}: config.json records ffnkit changes but {MANIFEST} is missing (the save did not "
            "finish, or the file was removed); the weights cannot be rebuilt without it — save the model again"
        )
    else:
        manifest = {"changes": []}
    config = _config_from(path, doc, trust_remote_code)
    changes = manifest.get("changes") or []
    for change in changes:
        if not isinstance(change, dict) or "kind" not in change:
            raise SavedModelError(f"{path / MANIFEST}: a change without a 'kind'; save the model again")
        _replay_fn(change["kind"])  # fail early on a kind this ffnkit does not know
    if recorded and json.dumps(recorded, sort_keys=True, default=str) != json.dumps(
        changes, sort_keys=True, default=str
    ):  # never new weights under an old manifest
        raise SavedModelError(
            f"{path}: ffnkit.json and config.json record different changes (parts of two saves); "
            "save the model again"
        )
    cls = _model_class(config, manifest.get("model_class"))
    model = _from_pretrained_replayed(cls, path, config, changes, trust_remote_code)
    _align_tensors(model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    model.ffnkit_reports = list(manifest.get("reports", []))
    model.ffnkit_name = manifest.get("base_model") or str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None  # a model saved without its tokenizer
    return model, tokenizer


@torch.no_grad()
def _align_tensors(model: nn.Module, alignment: int = 64) -> None:
    """Copy the tensors that point into the safetensors memory map at an unaligned address into fresh
    memory: CPU matrix kernels round differently on unaligned operands (a saved MoE's expert matmuls gave
    other logits in the last bit), so a loaded model computes exactly as the one saved."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.data_ptr() % alignment:
            t.data = t.data.clone()  # a shared (tied) parameter is one object: it stays shared


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


def _from_pretrained_replayed(
    cls: type, path: Path, config: Any, changes: list[dict], trust_remote_code: bool = False
) -> nn.Module:
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

    try:
        with quiet_loading():  # transformers' "Loading weights" bar on every load
            model, info = rebuilt.from_pretrained(
                path,
                config=config,
                dtype=dtype,
                output_loading_info=True,
                trust_remote_code=trust_remote_code,
            )
    except SavedModelError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SavedModelError(
            f"{path}: the weights do not load into the rebuilt model ({first}); save the model again"
        ) from None
    model.__class__ = cls  # a plain class again (pickling, isinstance by name)
    bad = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if bad:
        detail = "; ".join(f"{k}: {sorted(map(str, info[k]))[:3]}" for k in bad)
        raise SavedModelError(
            f"{path}: the weights do not match the rebuilt model ({detail}); the folder is corrupt or "
            "from another ffnkit version — save the model again"
        )
    return model
