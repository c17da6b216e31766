"""Export ffnkit outputs to where models are deployed: GGUF for llama.cpp / ollama, plain transformers.

``export_model(source, ExportConfig("gguf", "a.gguf"))`` loads any ffnkit output of a Llama-family model
(a saved folder or a built-in name), densifies its runtime modules (:mod:`ffnkit.export.plan`) and
writes either a GGUF file (:mod:`ffnkit.export.gguf`: ``llama`` or, for per-layer widths and removed
sublayers, llama.cpp's ``deci`` architecture) or a plain transformers folder (:mod:`ffnkit.export.hf`).

Example:
    >>> result = export_model("out/best30", ExportConfig(format="gguf", output="best30.gguf", dtype="q8_0"))
    >>> result["architecture"], result["fallback"]
    ('deci', [])
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError, OutputFolderError

__all__ = ["FORMATS", "ExportConfig", "check_export_output", "export_model", "export_loaded"]

FORMATS = ("gguf", "hf")


@dataclass
class ExportConfig(JsonConfig):
    """Where and how to export. ``dtype``: GGUF ``auto|f32|f16|bf16|q8_0|q5_0|q5_1|q4_0|q4_1``; hf
    ``auto|f32|f16|bf16``. ``pad`` (hf only): zero-pad per-layer widths to the widest.

    Example:
        >>> ExportConfig("gguf", "m.gguf", dtype="q8_0").to_dict()["dtype"]
        'q8_0'
    """

    format: str = "gguf"
    output: str = ""
    dtype: str = "auto"
    overwrite: bool = False
    pad: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        from ffnkit.export.gguf import GGUF_DTYPES
        from ffnkit.export.hf import HF_DTYPES

        if self.format not in FORMATS:
            raise InvalidArgumentError(
                f"unknown export format {self.format!r}; use one of {', '.join(FORMATS)}"
            )
        if not self.output:
            raise InvalidArgumentError("give the output with -o (a .gguf file, or a folder for --format hf)")
        allowed = GGUF_DTYPES if self.format == "gguf" else tuple(HF_DTYPES)
        if self.dtype not in allowed:
            raise InvalidArgumentError(
                f"--dtype {self.dtype} does not apply to --format {self.format}; use one of {', '.join(allowed)}"
            )
        if self.pad and self.format != "hf":
            raise InvalidArgumentError("--pad applies to --format hf only (GGUF keeps per-layer widths)")


def check_export_output(config: ExportConfig, source: str | os.PathLike | None = None) -> Path:
    """Refuse an output ffnkit must not write, before the model loads; return it as a Path.

    A GGUF file: not a folder, not an existing file without ``overwrite``, never inside the ffnkit cache
    or the input folder. An hf folder: :func:`ffnkit.folders.check_output_dir`'s rules.

    Example:
        >>> check_export_output(ExportConfig("gguf", "m.gguf"))
        PosixPath('m.gguf')
    """
    from ffnkit.folders import check_output_dir

    target = Path(config.output).expanduser()
    if config.format == "hf":
        return check_output_dir(target, overwrite=config.overwrite, model_source=source)
    if target.is_dir():
        raise OutputFolderError(
            f"{target} is a folder; --format gguf writes one file: give a file name (a.gguf)"
        )
    if target.exists() and not config.overwrite:
        raise OutputFolderError(f"{target} exists; choose another file name or add --overwrite to replace it")
    # the folder rules for the file's own path (cache, input model, writable place); an existing file
    # (--overwrite) is checked through a sibling name, since the folder rules refuse a file
    probe = target if not target.exists() else target.with_name(f".{target.name}.probe")
    check_output_dir(probe, overwrite=True, model_source=source, needed_bytes=0, replace=False)
    return target


def export_loaded(model: Any, tokenizer: Any, config: ExportConfig) -> dict[str, Any]:
    """Export an already loaded (changed) model; returns the writer's result as a dict.

    Example:
        >>> export_loaded(model, tok, ExportConfig("hf", "plain", dtype="f16"))["intermediate_size"]
    """
    from ffnkit.export.plan import read_plan

    start = time.perf_counter()
    plan = read_plan(model)
    target = Path(config.output).expanduser()
    if config.format == "gguf":
        from ffnkit.export.gguf import write_gguf

        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        try:
            result = write_gguf(plan, tokenizer, tmp, config.dtype).to_dict()
            os.replace(tmp, target)  # atomic: a kill leaves the old file or none, never half of one
        finally:
            tmp.unlink(missing_ok=True)
        result["path"] = str(target)
    else:
        from ffnkit.export.hf import write_hf

        result = write_hf(plan, tokenizer, target, config.dtype, config.pad).to_dict()
    result["format"] = config.format
    result["seconds"] = time.perf_counter() - start
    return result


def export_model(source: str | os.PathLike, config: ExportConfig) -> dict[str, Any]:
    """Load ``source`` (an ffnkit folder or a built-in model name) and export it as ``config`` says.

    Example:
        >>> export_model("smollm2-135m", ExportConfig("gguf", "dense.gguf", dtype="f16"))["architecture"]
        'llama'
    """
    from ffnkit import load_model

    check_export_output(config, source)
    model, tok = load_model(str(source))
    result = export_loaded(model, tok, config)
    result["source"] = str(source)
    return result
