"""Build (once, cached) and load the CPU kernel library of :mod:`ffnkit.kernels.cpu_source`.

The library is compiled with the system C++ compiler (``$CXX`` or ``g++``) into
``$FFNKIT_KERNEL_CACHE`` (default ``$FFNKIT_CACHE/kernels`` or ``~/.cache/ffnkit/kernels``), keyed by a hash
of the source, the flags, the compiler and the CPU, and loaded with ctypes. When no compiler is found or the
build fails, :func:`load_cpu_library` returns None (with one warning) and the ``cpu`` backend runs its
pure-torch fallback. ``FFNKIT_CPU_KERNEL=torch`` forces that fallback.

Example:
    >>> from ffnkit.kernels.cpu_build import cpu_library_status
    >>> sorted(cpu_library_status())
    ['compiled', 'error', 'path']
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first: the library's OpenMP then shares its runtime)

from ffnkit.kernels.cpu_source import SOURCE

FLAGS = ["-O3", "-march=native", "-std=gnu++17", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
_STATUS: dict[str, object] = {"compiled": False, "path": None, "error": None}


def kernel_cache_dir() -> Path:
    """The folder of compiled kernels: ``$FFNKIT_KERNEL_CACHE``, else ``<ffnkit cache>/kernels``.

    Example:
        >>> kernel_cache_dir().name
        'kernels'
    """
    env = os.environ.get("FFNKIT_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    root = os.environ.get("FFNKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ffnkit") / "kernels"


def _cpu_signature() -> str:
    """The CPU model and flags: a library built with -march=native must not run on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(compiler: str, target: Path, source: str = SOURCE) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "ffnkit_cpu.cpp"
        src.write_text(source)
        out = Path(tmp) / target.name
        proc = subprocess.run(
            [compiler, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(
                proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "compile failed"
            )
        os.replace(out, target)  # atomic: concurrent processes see the old or the new file, never half


@functools.cache
def load_cpu_library() -> ctypes.CDLL | None:
    """The compiled CPU kernels (built on first use), or None when they cannot be built here.

    Example:
        >>> lib = load_cpu_library()
        >>> lib is None or lib.ffnkit_abi_version() == 4
        True
    """
    if os.environ.get("FFNKIT_CPU_KERNEL", "").lower() == "torch":
        _STATUS["error"] = "disabled by FFNKIT_CPU_KERNEL=torch"
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        _STATUS["error"] = "no C++ compiler (g++ or $CXX) on PATH"
        warnings.warn(
            f"ffnkit cpu kernels: {_STATUS['error']}; using the slower pure-torch path", stacklevel=2
        )
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            "\n".join([SOURCE, " ".join(FLAGS), version, _cpu_signature()]).encode()
        ).hexdigest()
        path = kernel_cache_dir() / f"ffnkit_cpu_{key[:16]}.so"
        if not path.exists():
            _compile(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _STATUS["error"] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"ffnkit cpu kernels could not be built ({_STATUS['error']}); using the slower pure-torch path",
            stacklevel=2,
        )
        return None
    i64, f32p, vp = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
    c_int, c_float = ctypes.c_int, ctypes.c_float
    lib.ffnkit_ffn_rows.argtypes = [
        c_int,
        f32p,
        c_int,
        i64,
        vp,
        vp,
        vp,
        i64,
        vp,
        i64,
        c_int,
        c_float,
        vp,  # per-neuron thresholds or null
        c_int,
        vp,
        vp,
        c_int,
        c_int,
    ]
    lib.ffnkit_ffn_rows.restype = c_int
    lib.ffnkit_input_rows.argtypes = [c_int, f32p, c_int, i64, i64, vp, c_float, vp, vp, c_int, c_int]
    lib.ffnkit_input_rows.restype = c_int
    lib.ffnkit_moe_experts.argtypes = [
        c_int,
        f32p,
        i64,
        i64,
        i64,
        i64,
        i64,
        vp,
        vp,
        vp,
        vp,
        c_int,
        vp,
        c_int,
        c_int,
        c_int,
    ]
    lib.ffnkit_moe_experts.restype = c_int
    lib.ffnkit_abi_version.restype = c_int
    _STATUS.update(compiled=True, path=str(path), error=None)
    return lib


def cpu_library_status() -> dict[str, object]:
    """Whether the C kernels are in use: ``{"compiled": bool, "path": str | None, "error": str | None}``.

    Example:
        >>> isinstance(cpu_library_status()["compiled"], bool)
        True
    """
    load_cpu_library()
    return dict(_STATUS)


def build_library(source: str, stem: str) -> ctypes.CDLL:
    """Compile C++ ``source`` once (cached like :func:`load_cpu_library`'s, keyed by source, flags, compiler
    and CPU) into ``<kernel cache>/<stem>_<hash>.so`` and load it; raises ``RuntimeError`` when it cannot.

    For kernel families with their own source file (the quantised matmul); callers set the argtypes.

    Example:
        >>> lib = build_library('extern "C" int one(void) { return 1; }', "ffnkit_doc")  # doctest: +SKIP
        >>> lib.one()  # doctest: +SKIP
        1
    """
    if os.environ.get("FFNKIT_CPU_KERNEL", "").lower() == "torch":
        raise RuntimeError("disabled by FFNKIT_CPU_KERNEL=torch")
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            "\n".join([source, " ".join(FLAGS), version, _cpu_signature()]).encode()
        ).hexdigest()
        path = kernel_cache_dir() / f"{stem}_{key[:16]}.so"
        if not path.exists():
            _compile(compiler, path, source)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"{type(err).__name__}: {err}") from None
