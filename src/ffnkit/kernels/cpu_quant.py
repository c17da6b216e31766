"""The ``cpu`` backend of the quantised matmul: the C loops of :mod:`ffnkit.kernels.cpu_quant_source`.

2–4-bit integers run through the int4 loop (nibbles, group size a multiple of 16), 5–8-bit ones through the
int8 loop (group size a multiple of 8); anything else, or no C++ compiler, packs for ``reference``.

Example:
    >>> import torch
    >>> q = torch.randint(-8, 8, (32, 64), dtype=torch.int8); s = torch.rand(32, 2)
    >>> pack = quant_pack(q, s, None, 4)
    >>> pack.path in ("cpu_int4", "reference")
    True
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

from ffnkit.kernels.cpu_build import build_library
from ffnkit.kernels.cpu_quant_source import SOURCE
from ffnkit.kernels.quant_matmul import QuantPack, reference_linear, reference_pack

_ERROR: list[str] = []
# below this many weight bytes x batch rows a call runs on one thread (FFNKIT_QUANT_PARALLEL_BYTES)
PARALLEL_BYTES = int(os.environ.get("FFNKIT_QUANT_PARALLEL_BYTES", str(1 << 20)))
# from this many rows of x on: dequantise once (C) and run a BLAS matmul; the loops decode every weight
# once per 4 rows (benchmarks/results/quant_kernel_cpu.json: faster than float at 8 rows, slower at 64)
DEQUANT_ROWS = int(os.environ.get("FFNKIT_QUANT_DEQUANT_ROWS", "32"))


@functools.cache
def quant_library() -> ctypes.CDLL | None:
    """The compiled quantised-matmul loops, or None when they cannot be built here (reason: :func:`library_error`).

    Example:
        >>> lib = quant_library()
        >>> lib is None or lib.ffnkit_quant_abi_version() == 2
        True
    """
    try:
        lib = build_library(SOURCE, "ffnkit_quant")
    except RuntimeError as err:
        _ERROR.append(str(err))
        return None
    i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ffnkit_qlinear.argtypes = [c_int, c_int, vp, i64, i64, vp, vp, vp, i64, vp, vp, c_int]
    lib.ffnkit_qlinear.restype = c_int
    lib.ffnkit_qdequant.argtypes = [c_int, i64, i64, vp, vp, vp, i64, vp, c_int]
    lib.ffnkit_qdequant.restype = c_int
    lib.ffnkit_quant_abi_version.restype = c_int
    return lib


def library_error() -> str | None:
    """Why :func:`quant_library` is None (None when it built).

    Example:
        >>> library_error() is None or isinstance(library_error(), str)
        True
    """
    quant_library()
    return _ERROR[-1] if _ERROR else None


def quant_pack(
    q: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, dtype: torch.dtype | None = None
) -> QuantPack:
    """Repack integers q [out, in] for the C loops: nibble blocks (2–4 bits) or int8 rows (5–8 bits),
    float32 scales [out, groups] and float32 unsigned zero points [out, groups].

    Example:
        >>> quant_pack(torch.zeros(8, 32, dtype=torch.int8), torch.ones(8, 2), None, 4).group_size
        16
    """
    out, n = q.shape
    g = n // scale.shape[1]
    if quant_library() is None:
        return reference_pack(q, scale, zero_point, bits, note=f"C kernels unavailable: {library_error()}")
    zp = torch.zeros_like(scale, dtype=torch.float32) if zero_point is None else zero_point.to(torch.float32)
    s = scale.detach().to(torch.float32).contiguous()  # [out, G]
    if bits <= 4 and g % 16 == 0:
        u = (q.to(torch.int16) + 8).to(torch.uint8).view(out, n // 16, 2, 8)  # unsigned nibbles
        w = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(out, n // 2).contiguous()  # [out, in/2]
        return QuantPack("cpu_int4", "cpu", n, out, g, (w, s, (zp + 8).contiguous()), "")
    if g % 8 == 0:
        w = q.contiguous().view(torch.uint8)  # [out, in], the signed bytes as they are
        return QuantPack("cpu_int8", "cpu", n, out, g, (w, s, zp.contiguous()), "")
    return reference_pack(q, scale, zero_point, bits, note=f"group size {g} is not a multiple of 8")


def quant_linear(x: Tensor, pack: QuantPack, bias: Tensor | None = None) -> Tensor:
    """y [..., out] = x [..., in] · Wᵀ + bias through the C loops (float32 inside, x's dtype out).

    Example:
        >>> q = torch.randint(-8, 8, (32, 64), dtype=torch.int8); s = torch.rand(32, 2)
        >>> quant_linear(torch.randn(2, 64), quant_pack(q, s, None, 4)).shape
        torch.Size([2, 32])
    """
    if pack.path == "reference":
        return reference_linear(x, pack, bias)
    w, s, z = pack.tensors
    n, out = pack.in_features, pack.out_features
    plain = x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()
    x2 = x if plain else x.reshape(-1, n).to(torch.float32).contiguous()  # [N, in]
    rows = x2.shape[0]
    bits = 4 if pack.path == "cpu_int4" else 8
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if rows >= DEQUANT_ROWS:  # prefill: one float32 copy of W, then BLAS
        wf = torch.empty(out, n, dtype=torch.float32)  # [out, in]
        rc = quant_library().ffnkit_qdequant(
            bits, n, out, w.data_ptr(), s.data_ptr(), z.data_ptr(), pack.group_size, wf.data_ptr(),
            threads(w.numel()),
        )  # fmt: skip
        assert rc == 0, f"ffnkit_qdequant returned {rc}"
        y = torch.nn.functional.linear(x2, wf, b)  # [N, out]
        return y if plain else y.to(x.dtype).reshape(*x.shape[:-1], out)
    y = torch.empty(rows, out, dtype=torch.float32)  # [N, out], written by the kernel
    rc = quant_library().ffnkit_qlinear(
        bits, rows, x2.data_ptr(), n, out, w.data_ptr(), s.data_ptr(),
        z.data_ptr(), pack.group_size, None if b is None else b.data_ptr(), y.data_ptr(),
        threads(w.numel() * rows),
    )  # fmt: skip
    assert rc == 0, f"ffnkit_qlinear returned {rc}"
    return y if plain else y.to(x.dtype).reshape(*x.shape[:-1], out)


def threads(work_bytes: int) -> int:
    """OpenMP threads for a call that streams ``work_bytes`` of weights (times batch rows): one below
    ``PARALLEL_BYTES``, as MKL does for small products (a parallel region costs a wake-up of every thread,
    which on a busy 2-core machine measured milliseconds), else ``torch.get_num_threads()``.

    Example:
        >>> threads(1000)
        1
    """
    return 1 if work_bytes < PARALLEL_BYTES else torch.get_num_threads()
