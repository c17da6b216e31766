"""Device and dtype names as users write them (``--device cuda:1``, ``--dtype bf16``), checked and resolved
in one place, before any model is loaded.

- device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first CUDA device when there is one, else the CPU).
- dtype: ``float32``, ``bfloat16``, ``float16`` (with the usual short names ``fp32``, ``bf16``, ``fp16``,
  ``half``) or ``auto``: the dtype the checkpoint was saved in (as ``from_pretrained(dtype="auto")``).

Example:
    >>> resolve_device("cpu")
    'cpu'
    >>> resolve_dtype("bf16")
    torch.bfloat16
"""

from __future__ import annotations

import re
from typing import Any

from ffnkit.core.errors import InvalidArgumentError

__all__ = ["DEVICES", "DTYPES", "check_device", "check_dtype", "resolve_device", "resolve_dtype"]

DEVICES = ("cpu", "cuda", "cuda:N", "auto")
DTYPES = ("float32", "bfloat16", "float16", "auto")
_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",  # the Python API allows it (exact oracles in tests); not offered by the CLI
    "auto": "auto",
}
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def check_device(spec: str | None, flag: str = "--device") -> str | None:
    """The canonical device name of ``spec`` (None stays None), or a one-line error; touches no GPU.

    Example:
        >>> check_device("CUDA:0")
        'cuda:0'
    """
    if spec is None:
        return None
    text = str(spec).strip().lower()
    if text in ("cpu", "auto") or _CUDA.match(text):
        return text
    raise InvalidArgumentError(f"{flag} takes one of {', '.join(DEVICES)} (N: a GPU index), got {spec!r}")


def check_dtype(spec: str | None, flag: str = "--dtype") -> str | None:
    """The canonical dtype name of ``spec`` (``bf16`` → ``bfloat16``; None stays None), or a one-line error.

    Example:
        >>> check_dtype("fp16")
        'float16'
    """
    if spec is None:
        return None
    name = _ALIASES.get(str(spec).strip().lower().removeprefix("torch."))
    if name is None:
        raise InvalidArgumentError(
            f"{flag} takes one of {', '.join(DTYPES)} (or bf16, fp16, fp32), got {spec!r}"
        )
    return name


def resolve_device(spec: str | None, flag: str = "--device") -> str:
    """A device torch can use now: ``auto`` becomes ``cuda`` or ``cpu``; a CUDA device that this machine
    lacks is a one-line error naming the devices it has.

    Example:
        >>> resolve_device("auto") in ("cpu", "cuda")
        True
    """
    import torch

    name = check_device(spec, flag) or "cpu"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = _CUDA.match(name)
    if m:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidArgumentError(f"{flag} {name}: this machine has no CUDA device; use --device cpu")
        if m[1] is not None and int(m[1]) >= count:
            raise InvalidArgumentError(
                f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return name


def resolve_dtype(spec: Any, flag: str = "--dtype") -> Any:
    """A ``torch.dtype``, or the string ``"auto"`` (keep the checkpoint's dtype). A dtype passes through.

    Example:
        >>> resolve_dtype("auto")
        'auto'
    """
    import torch

    if isinstance(spec, torch.dtype):
        return spec
    name = check_dtype(spec, flag) or "float32"
    return "auto" if name == "auto" else getattr(torch, name)
