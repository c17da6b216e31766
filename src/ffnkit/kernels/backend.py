"""The kernel backend switch: one table (kernel name x backend -> function) and the rules that pick a backend.

Backends:
- ``reference``: plain torch, written for clarity; the test oracle of every other backend.
- ``cpu``: the fastest CPU path (a small C kernel compiled once with gcc, or a pure-torch fallback).
- ``triton``: GPU kernels, imported lazily (``import ffnkit.kernels`` never imports triton or touches CUDA).
- ``auto`` (the default): ``triton`` for CUDA tensors when Triton is installed, ``cpu`` for CPU tensors,
  ``reference`` for anything else.

Precedence: a ``backend=`` argument, then the innermost ``use_backend(...)`` block, then the environment
variable ``FFNKIT_KERNEL_BACKEND``, then ``auto``.

Example:
    >>> from ffnkit.kernels import use_backend, resolve_backend
    >>> import torch
    >>> with use_backend("reference"):
    ...     resolve_backend(torch.zeros(1))
    'reference'
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

from ffnkit.core.errors import InvalidArgumentError

BACKENDS = ("reference", "cpu", "triton")

# Programmatic dependent launch of the Triton decode kernels (ffnkit.kernels.triton_sparse_ffn): off unless
# a programmatic_launch() block is open; read when a kernel is launched (and so recorded by CUDA graphs).
LAUNCH: dict[str, bool] = {"pdl": False, "prefetch_active": False}


@contextlib.contextmanager
def programmatic_launch(on: bool = True, prefetch_active: bool = False) -> Iterator[None]:
    """Within the block, ffnkit's Triton decode kernels (the fused gather kernel and its reduce, the GEMV)
    launch with programmatic dependent launch on sm90+ GPUs: each may start while the kernel before it
    finishes, and waits for that kernel before it reads its input or writes anything. The GEMV loads its
    first chunk of W before the wait (weights must not be written by the kernel just before it). With
    ``prefetch_active`` the gather kernel also reads its active list and the first neurons' weights before
    the wait: only for an active list that the kernel just before does not write (a fixed set; not one
    computed on the device right before the call). No effect on other devices. Capture a CUDA graph inside
    the block to keep the mode in the graph.

    Example:
        >>> with programmatic_launch():
        ...     LAUNCH["pdl"]
        True
        >>> LAUNCH["pdl"]
        False
    """
    old = dict(LAUNCH)
    LAUNCH.update(pdl=bool(on), prefetch_active=bool(on and prefetch_active))
    try:
        yield
    finally:
        LAUNCH.update(old)


ENV_VAR = "FFNKIT_KERNEL_BACKEND"

# The dispatch table: (kernel, backend) -> "module:function", imported on first use so that the Triton
# module (and triton itself) is only imported when a CUDA tensor actually takes that path.
KERNELS: dict[tuple[str, str], str] = {
    ("gather_ffn", "reference"): "ffnkit.kernels.reference:gather_ffn",
    ("gather_ffn", "cpu"): "ffnkit.kernels.cpu_sparse_ffn:gather_ffn",
    ("gather_ffn", "triton"): "ffnkit.kernels.triton_sparse_ffn:gather_ffn",
    ("threshold_ffn", "reference"): "ffnkit.kernels.reference:threshold_ffn",
    ("threshold_ffn", "cpu"): "ffnkit.kernels.cpu_sparse_ffn:threshold_ffn",
    ("threshold_ffn", "triton"): "ffnkit.kernels.triton_sparse_ffn:threshold_ffn",
    ("predicted_ffn", "reference"): "ffnkit.kernels.reference:predicted_ffn",
    ("predicted_ffn", "cpu"): "ffnkit.kernels.cpu_sparse_ffn:predicted_ffn",
    ("predicted_ffn", "triton"): "ffnkit.kernels.triton_sparse_ffn:predicted_ffn",
    ("sparse_input_linear", "reference"): "ffnkit.kernels.reference:sparse_input_linear",
    ("sparse_input_linear", "cpu"): "ffnkit.kernels.cpu_sparse_ffn:sparse_input_linear",
    ("sparse_input_linear", "triton"): "ffnkit.kernels.triton_teal:sparse_input_linear",
    ("experts_forward", "reference"): "ffnkit.kernels.moe_reference:experts_forward",
    ("experts_forward", "cpu"): "ffnkit.kernels.moe_cpu:experts_forward",
    ("experts_forward", "triton"): "ffnkit.kernels.moe_triton:experts_forward",
    ("teal_ffn", "reference"): "ffnkit.kernels.reference:teal_ffn",
    ("teal_ffn", "cpu"): "ffnkit.kernels.cpu_sparse_ffn:teal_ffn",
    ("teal_ffn", "triton"): "ffnkit.kernels.triton_teal:teal_ffn",
    # quantised matmul: repack once per matrix and device, then run; the GPU path ("triton" backend) is
    # torch's int4 CUDA kernel (tinygemm), which needs no Triton itself
    ("quant_pack", "reference"): "ffnkit.kernels.quant_matmul:reference_pack",
    ("quant_pack", "cpu"): "ffnkit.kernels.cpu_quant:quant_pack",
    ("quant_pack", "triton"): "ffnkit.kernels.cuda_quant:quant_pack",
    # the whole gated int4 FFN at decode (GPU only): [gate | up] in one tinygemm product, act*up, down
    ("quant_ffn_pack", "triton"): "ffnkit.kernels.triton_quant:ffn_pack",
    ("quant_ffn", "triton"): "ffnkit.kernels.triton_quant:quant_ffn",
    ("quant_linear", "reference"): "ffnkit.kernels.quant_matmul:reference_linear",
    ("quant_linear", "cpu"): "ffnkit.kernels.cpu_quant:quant_linear",
    ("quant_linear", "triton"): "ffnkit.kernels.cuda_quant:quant_linear",
    # dense batch-1 products (the shared part of a decode step: attention projections)
    ("gemv", "reference"): "ffnkit.kernels.dense_gemv:linear_torch",
    ("gemv", "cpu"): "ffnkit.kernels.dense_gemv:linear_torch",
    ("gemv", "triton"): "ffnkit.kernels.triton_gemv:gemv",
    ("rms_norm_gemv", "reference"): "ffnkit.kernels.dense_gemv:rms_norm_linear_torch",
    ("rms_norm_gemv", "cpu"): "ffnkit.kernels.dense_gemv:rms_norm_linear_torch",
    ("rms_norm_gemv", "triton"): "ffnkit.kernels.triton_gemv:rms_norm_gemv",
}

_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("ffnkit_kernel_backend", default=None)
_LOADED: dict[tuple[str, str], Callable] = {}


def triton_available() -> bool:
    """True when CUDA is usable and the ``triton`` package is installed (checked without importing it).

    Example:
        >>> isinstance(triton_available(), bool)
        True
    """
    return torch.cuda.is_available() and triton_installed()


@functools.cache
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (looked up once: ``find_spec`` costs ~0.1 ms, which
    every kernel call on a CUDA tensor paid before).

    Example:
        >>> isinstance(triton_installed(), bool)
        True
    """
    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """The backends that can run on this machine, in the order of :data:`BACKENDS`.

    ``reference`` and ``cpu`` always run (``cpu`` falls back to pure torch when its C kernel cannot be built).

    Example:
        >>> available_backends()[:2]
        ['reference', 'cpu']
    """
    return [b for b in BACKENDS if b != "triton" or triton_available()]


def check_backend_name(name: str) -> str:
    """``name`` lower-cased if it is ``auto`` or a known backend, else a one-line error.

    Example:
        >>> check_backend_name("CPU")
        'cpu'
    """
    low = str(name).strip().lower()
    if low != "auto" and low not in BACKENDS:
        raise InvalidArgumentError(
            f"unknown kernel backend {name!r}: use one of auto, {', '.join(BACKENDS)} "
            f"(argument, use_backend(...) or ${ENV_VAR})"
        )
    return low


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the kernels inside the block on backend ``name`` (``auto``, ``reference``, ``cpu``, ``triton``).

    The name is checked on entry; whether it can run on a given tensor is checked at each call.

    Example:
        >>> with use_backend("reference") as name:
        ...     name
        'reference'
    """
    token = _CURRENT.set(check_backend_name(name))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def requested_backend() -> str:
    """The backend asked for by the innermost ``use_backend`` block, else ``$FFNKIT_KERNEL_BACKEND``, else auto.

    Example:
        >>> with use_backend("cpu"):
        ...     requested_backend()
        'cpu'
    """
    name = _CURRENT.get()
    if name is None:
        name = check_backend_name(os.environ.get(ENV_VAR, "auto") or "auto")
    return name


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The concrete backend that will run a kernel on tensor ``x`` (never ``auto``).

    A backend that cannot run on ``x`` (``triton`` on a CPU tensor or without Triton, ``cpu`` on a GPU
    tensor) is a one-line error rather than a silent fallback.

    Example:
        >>> resolve_backend(torch.zeros(2), "reference")
        'reference'
    """
    name = check_backend_name(backend) if backend is not None else requested_backend()
    dev = x.device.type
    if name == "auto":
        if dev == "cuda" and triton_available():
            return "triton"
        return "cpu" if dev == "cpu" else "reference"
    if name == "cpu" and dev != "cpu":
        raise InvalidArgumentError(
            f"kernel backend 'cpu' needs CPU tensors, got {dev}: move the tensors or use backend 'auto'"
        )
    if name == "triton":
        if dev != "cuda":
            raise InvalidArgumentError(
                f"kernel backend 'triton' needs CUDA tensors, got {dev}: use backend 'cpu' or 'auto'"
            )
        if not triton_available():
            raise InvalidArgumentError(
                "kernel backend 'triton' is unavailable (needs CUDA and `pip install triton`): use 'auto'"
            )
    return name


def kernel_function(kernel: str, backend: str) -> Callable:
    """The function that implements ``kernel`` on the concrete ``backend`` (imported on first use).

    Example:
        >>> kernel_function("gather_ffn", "reference").__name__
        'gather_ffn'
    """
    key = (kernel, backend)
    fn = _LOADED.get(key)
    if fn is None:
        if key not in KERNELS:
            known = sorted({k for k, _ in KERNELS})
            raise InvalidArgumentError(
                f"unknown kernel {kernel!r} on backend {backend!r}: kernels are {known}"
            )
        module, attr = KERNELS[key].split(":")
        fn = getattr(importlib.import_module(module), attr)
        _LOADED[key] = fn
    return fn


def dispatch(kernel: str, x: torch.Tensor, backend: str | None = None) -> Callable:
    """Resolve the backend for tensor ``x`` and return the function for ``kernel`` on it.

    Example:
        >>> dispatch("gather_ffn", torch.zeros(3), "reference").__module__
        'ffnkit.kernels.reference'
    """
    return kernel_function(kernel, resolve_backend(x, backend))
