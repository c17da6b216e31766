"""Kernels: pure functions with a backend switch (``reference`` torch oracle, ``cpu``, ``triton``): the
sparse-FFN executor (:mod:`ffnkit.kernels.sparse_ffn`), the quantised matmul
(:mod:`ffnkit.kernels.quant_matmul`) and the dense decode GEMV (:mod:`ffnkit.kernels.dense_gemv`).

``import ffnkit.kernels`` imports neither triton nor touches CUDA; the Triton module is imported the first
time a CUDA tensor takes that path.

Example:
    >>> import torch
    >>> from ffnkit.kernels import pack_ffn, gather_ffn, use_backend
    >>> packed = pack_ffn(torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16))
    >>> with use_backend("reference"):
    ...     gather_ffn(torch.randn(1, 8), packed, torch.tensor([0, 3, 9])).shape
    torch.Size([1, 8])
"""

from ffnkit.kernels.backend import (
    BACKENDS,
    ENV_VAR,
    KERNELS,
    available_backends,
    dispatch,
    programmatic_launch,
    resolve_backend,
    triton_available,
    use_backend,
)
from ffnkit.kernels.dense_gemv import gemv, rms_norm_gemv
from ffnkit.kernels.moe import experts_forward
from ffnkit.kernels.quant_matmul import QuantPack, dequant_linear, pack_quant, quant_linear
from ffnkit.kernels.sparse_ffn import (
    ACTIVATIONS,
    TealWeights,
    gather_ffn,
    kernel_activation,
    pack_ffn,
    pack_teal,
    predicted_ffn,
    sparse_input_linear,
    teal_ffn,
    threshold_ffn,
    unpack_ffn,
)

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ENV_VAR",
    "KERNELS",
    "QuantPack",
    "TealWeights",
    "available_backends",
    "programmatic_launch",
    "dequant_linear",
    "dispatch",
    "experts_forward",
    "gather_ffn",
    "gemv",
    "kernel_activation",
    "pack_ffn",
    "pack_quant",
    "pack_teal",
    "predicted_ffn",
    "quant_linear",
    "resolve_backend",
    "rms_norm_gemv",
    "sparse_input_linear",
    "teal_ffn",
    "threshold_ffn",
    "triton_available",
    "unpack_ffn",
    "use_backend",
]
