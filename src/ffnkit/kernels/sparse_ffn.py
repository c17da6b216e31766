"""The sparse-FFN executor for decode: compute a gated FFN over a subset of its neurons or input columns.

The FFN is y = W_down (act(W_gate x) * (W_up x)). At decode (batch 1 or a few rows) it is bound by reading
the weights, so the only way to make it faster is to read fewer of them. The neuron-major packed layout of
:func:`pack_ffn` stores, per neuron i, its gate row, up row and down column next to each other ([F, 3, D]),
so the weights of an active neuron are one contiguous block: one stream per neuron on a CPU, fully
coalesced rows on a GPU, and one index per neuron to gather. Against three separate [F, D] tensors (the
same C kernel, benchmarks/results/sparse_kernel_cpu.json, batch 1) the CPU shows no consistent difference
(-3% to +9% across 0-90% skipped, within the run-to-run noise); on the GPU the fused batch-1 kernel streams
each neuron's 24 KB block in one piece (the separate layout was not timed there). Dense matmuls run on the
strided views of :func:`unpack_ffn` without a copy.

Kernels (each checks its inputs here, then runs on the backend of :mod:`ffnkit.kernels.backend`):
- :func:`gather_ffn`: only the neurons in ``idx`` (the union of the batch's active sets; with ``scale`` the
  per-row router weights, this is also the expert executor of an MoE layer).
- :func:`predicted_ffn` (Deja Vu): only the neurons whose low-rank predictor score exceeds a threshold;
  on CUDA at batch 1 the kernel scores the neurons itself (one launch, no host sync).
- :func:`threshold_ffn` (CATS / CHESS): dense gate, then only the up rows / down columns with
  |act(gate)| > t (t one number or one per neuron).
- :func:`sparse_input_linear` (TEAL): only the columns of W whose input |x_j| >= t (W stored as [in, out]).
- :func:`teal_ffn`: TEAL on the whole FFN (on CUDA one pipeline that compacts the kept inputs on the device,
  :mod:`ffnkit.kernels.triton_teal`). Thresholds: a number, or a tensor with one per input / neuron.

H200, Llama-3-8B FFN, bf16, batch 1, CUDA graphs (benchmarks/results/sparse_kernel_h200.json): dense
cuBLAS 100.9 us; at 50% of the weight bytes skipped gather 49.8 us (2.03x), CATS 1.28x, TEAL 81.1 us (1.24x).
Every kernel here is CUDA-graph capturable: no host sync, fixed shapes (tests/gpu).

Greedy decode of a Llama-3-8B-shaped model on the H200 through ``SparseFFN`` (random bf16 weights, CUDA
graphs, benchmarks/results/sparsity_decode_h200.json; dense 212.3 tokens/s): gather on a fixed active set
1.45x dense at 50% of the FFN bytes skipped (goal 1.5x, not reached) and 1.64x at 65%; ``predicted_ffn``
with a rank-64 predictor 1.23x at 50%, 1.37x at 65%; TEAL 1.12x at 50%, 1.14x with TEAL on the attention
projections too. With the attention projections of every configuration through ffnkit's Triton GEMV
(sparsity_decode_h200_gemv.json): gather 1.476x at 50%, 1.68x at 65%, still short of 1.5x at 50%. With
programmatic dependent launch (:func:`ffnkit.kernels.programmatic_launch`) and the shared ops in Triton for dense
and sparse alike (sparsity_decode_h200_pdl.json): gather 1.53x the fastest dense at 50%, 1.76x at 65%.

All accumulate in float32 and return the dtype of ``x``; the ``reference`` backend is the masked dense
computation and the oracle of the tests.

Example:
    >>> import torch
    >>> from ffnkit.kernels import pack_ffn, gather_ffn
    >>> wg, wu, wd = torch.randn(32, 8), torch.randn(32, 8), torch.randn(8, 32)
    >>> packed = pack_ffn(wg, wu, wd)  # [32, 3, 8]
    >>> x = torch.randn(1, 8)
    >>> y = gather_ffn(x, packed, torch.arange(32), backend="reference")
    >>> dense = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    >>> torch.allclose(y, dense, atol=1e-4)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels.backend import dispatch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# Hugging Face ``hidden_act`` names -> the kernels' activation names.
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
}


def kernel_activation(hf_name: str) -> str:
    """The kernels' name for a Hugging Face ``hidden_act`` (``silu``, ``gelu_pytorch_tanh``, ...).

    Example:
        >>> kernel_activation("gelu_pytorch_tanh")
        'gelu_tanh'
    """
    if hf_name not in HF_ACTIVATIONS:
        raise InvalidArgumentError(
            f"activation {hf_name!r} has no sparse kernel: supported are {sorted(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[hf_name]


def pack_ffn(w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Pack a gated FFN neuron-major: ``packed[i] = [W_gate[i], W_up[i], W_down[:, i]]``, shape [F, 3, D].

    ``w_gate``, ``w_up`` are [F, D] (nn.Linear layout), ``w_down`` is [D, F]. The result is a new
    contiguous tensor of their dtype and device.

    Example:
        >>> pack_ffn(torch.zeros(6, 4), torch.zeros(6, 4), torch.zeros(4, 6)).shape
        torch.Size([6, 3, 4])
    """
    if w_gate.dim() != 2 or w_gate.shape != w_up.shape or w_down.shape != w_gate.shape[::-1]:
        raise InvalidArgumentError(
            f"pack_ffn needs W_gate, W_up [F, D] and W_down [D, F], got {tuple(w_gate.shape)}, "
            f"{tuple(w_up.shape)}, {tuple(w_down.shape)}"
        )
    return torch.stack([w_gate, w_up, w_down.T], dim=1).contiguous()  # [F, 3, D]


def unpack_ffn(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Views (W_gate [F, D], W_up [F, D], W_down [D, F]) of a packed FFN, for dense matmuls; no copy.

    Example:
        >>> wg, wu, wd = unpack_ffn(torch.zeros(6, 3, 4))
        >>> wd.shape
        torch.Size([4, 6])
    """
    _check_packed(packed)
    return packed[:, 0, :], packed[:, 1, :], packed[:, 2, :].T


@dataclass(frozen=True)
class TealWeights:
    """A gated FFN stored for TEAL: ``gate_up_t`` [D, 2F] (row j = column j of W_gate then of W_up) and
    ``down_t`` [F, D] (row i = column i of W_down), so a kept input reads one contiguous row.

    Example:
        >>> t = pack_teal(torch.zeros(6, 4), torch.zeros(6, 4), torch.zeros(4, 6))
        >>> t.gate_up_t.shape, t.down_t.shape
        (torch.Size([4, 12]), torch.Size([6, 4]))
    """

    gate_up_t: Tensor
    down_t: Tensor


def pack_teal(w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> TealWeights:
    """Store a gated FFN input-major for :func:`teal_ffn` (see :class:`TealWeights`).

    Example:
        >>> pack_teal(torch.zeros(6, 4), torch.zeros(6, 4), torch.zeros(4, 6)).down_t.shape
        torch.Size([6, 4])
    """
    pack_ffn(w_gate[:1], w_up[:1], w_down[:, :1])  # the same shape checks
    return TealWeights(torch.cat([w_gate, w_up], 0).T.contiguous(), w_down.T.contiguous())


# ------------------------------------------------------------------------------------------ validation


def _check_packed(packed: Tensor) -> None:
    if not isinstance(packed, Tensor) or packed.dim() != 3 or packed.shape[1] != 3:
        shape = tuple(packed.shape) if isinstance(packed, Tensor) else type(packed).__name__
        raise InvalidArgumentError(f"packed FFN weights must be [F, 3, D] (from pack_ffn), got {shape}")
    if not packed.is_floating_point():
        raise InvalidArgumentError(f"packed FFN weights must be floating point, got {packed.dtype}")


def _check_x(x: Tensor, weight: Tensor, width: int, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != width:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InvalidArgumentError(f"x must be [..., {width}] to match the {what}, got {shape}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise InvalidArgumentError(
            f"x is {x.dtype} on {x.device} but the weights are {weight.dtype} on {weight.device}: cast or move one"
        )
    if not weight.is_contiguous():
        raise InvalidArgumentError(f"the {what} must be contiguous: call .contiguous() once when packing")


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise InvalidArgumentError(f"unknown activation {act!r}: use one of {', '.join(ACTIVATIONS)}")


def _check_threshold(threshold: float | Tensor, width: int, x: Tensor, what: str) -> float | Tensor:
    """A number >= 0, or a tensor of ``width`` per-unit thresholds (returned float32, contiguous)."""
    if isinstance(threshold, Tensor) and threshold.dim() > 0:
        if threshold.shape != (width,) or not threshold.is_floating_point():
            raise InvalidArgumentError(
                f"per-{what} thresholds must be a floating-point [{width}] tensor, got "
                f"{threshold.dtype} {tuple(threshold.shape)}"
            )
        if threshold.device != x.device:
            raise InvalidArgumentError(f"thresholds are on {threshold.device} but x on {x.device}: move them")
        # Value check on CPU only: on a GPU it would cost a device->host sync per call (documented instead).
        if threshold.device.type == "cpu" and not bool((threshold >= 0).all()):  # also rejects NaN
            raise InvalidArgumentError(f"per-{what} thresholds must all be >= 0 (and not NaN)")
        return threshold.to(torch.float32).contiguous()
    t = float(threshold)
    if not t >= 0.0:  # also rejects NaN
        raise InvalidArgumentError(f"threshold must be a number >= 0, got {threshold!r}")
    return t


def _check_idx(idx: Tensor, packed: Tensor) -> None:
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        what = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
        raise InvalidArgumentError(f"idx must be a 1-D int32/int64 tensor of neuron indices, got {what}")
    if idx.device != packed.device:
        raise InvalidArgumentError(f"idx is on {idx.device} but the weights on {packed.device}: move idx")
    # Range check on CPU only: on a GPU it would cost a device->host sync per call (documented instead).
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= packed.shape[0]):
        raise InvalidArgumentError(
            f"idx holds neurons outside [0, {packed.shape[0]}): min {int(idx.min())}, max {int(idx.max())}"
        )


# ---------------------------------------------------------------------------------------------- kernels


def gather_ffn(
    x: Tensor,
    packed: Tensor,
    idx: Tensor,
    *,
    act: str = "silu",
    scale: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """The gated FFN over the neurons ``idx`` only: y = W_down[:, idx] (s * act(W_gate[idx] x) * W_up[idx] x).

    x [..., D]; ``packed`` [F, 3, D] from :func:`pack_ffn`; ``idx`` [K] distinct neuron indices shared by
    every row (at batch > 1 the union of the rows' active sets; duplicates would count twice; on CUDA the
    range is not checked, as that would sync); ``scale`` [N, K] (N = rows of x) optional per-row weights of
    the selected neurons, e.g. router weights expanded to an expert's neurons (0 = row not routed there).
    Equals the dense FFN with the other neurons masked out. Returns [..., D] in x's dtype.

    Example:
        >>> p = torch.randn(10, 3, 4)
        >>> gather_ffn(torch.randn(3, 4), p, torch.tensor([2, 7]), backend="reference").shape
        torch.Size([3, 4])
    """
    _check_packed(packed)
    _check_x(x, packed, packed.shape[2], "packed FFN weights")
    _check_idx(idx, packed)
    _check_act(act)
    if scale is not None:
        rows = x.numel() // packed.shape[2]
        if not isinstance(scale, Tensor) or tuple(scale.shape) != (rows, idx.numel()):
            got = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
            raise InvalidArgumentError(
                f"scale must be [rows of x, len(idx)] = [{rows}, {idx.numel()}], got {got}"
            )
    if idx.numel() == 0 or x.numel() == 0:
        return torch.zeros_like(x)
    return dispatch("gather_ffn", x, backend)(x, packed, idx, act=act, scale=scale)


def threshold_ffn(
    x: Tensor, packed: Tensor, threshold: float | Tensor, *, act: str = "silu", backend: str | None = None
) -> Tensor:
    """CATS: the gated FFN with every neuron of |act(W_gate x)| <= ``threshold`` zeroed (per row).

    ``threshold`` is one number, or a [F] tensor of per-neuron thresholds (CHESS's channel-wise
    thresholds; on CUDA their values are not checked, as that would sync).

    The gate is computed for every neuron; a neuron's up row and down column are read only if some row of
    x keeps it, so a share ``a`` of active neurons reads 1/3 + 2a/3 of the weights. Threshold 0 equals the
    dense FFN. Returns [..., D] in x's dtype.

    Example:
        >>> p = torch.randn(10, 3, 4)
        >>> threshold_ffn(torch.randn(1, 4), p, 0.1, backend="reference").shape
        torch.Size([1, 4])
    """
    _check_packed(packed)
    _check_x(x, packed, packed.shape[2], "packed FFN weights")
    _check_act(act)
    t = _check_threshold(threshold, packed.shape[0], x, "neuron")
    if x.numel() == 0:
        return torch.zeros_like(x)
    return dispatch("threshold_ffn", x, backend)(x, packed, t, act=act)


def sparse_input_linear(
    x: Tensor, w_t: Tensor, threshold: float | Tensor, *, backend: str | None = None
) -> Tensor:
    """TEAL: y = (x * [|x| >= t]) @ W_t, reading only the rows of ``w_t`` (= W transposed, [in, out]) whose
    input is kept by some row of x. Threshold 0 equals the dense product; ``threshold`` may be an [in]
    tensor (one per input channel). No host sync on CUDA (CUDA-graph capturable). Returns [..., out] in
    x's dtype.

    Example:
        >>> w = torch.randn(5, 4)  # nn.Linear weight [out, in]
        >>> sparse_input_linear(torch.randn(2, 4), w.T.contiguous(), 0.3, backend="reference").shape
        torch.Size([2, 5])
    """
    if not isinstance(w_t, Tensor) or w_t.dim() != 2 or not w_t.is_floating_point():
        raise InvalidArgumentError("w_t must be a floating-point [in, out] tensor (the weight transposed)")
    _check_x(x, w_t, w_t.shape[0], "weight's input width (w_t is [in, out])")
    t = _check_threshold(threshold, w_t.shape[0], x, "input")
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], w_t.shape[1])
    return dispatch("sparse_input_linear", x, backend)(x, w_t, t)


def teal_ffn(
    x: Tensor,
    weights: TealWeights,
    t_in: float | Tensor,
    t_mid: float | Tensor,
    *,
    act: str = "silu",
    backend: str | None = None,
) -> Tensor:
    """TEAL on a whole gated FFN: zero |x| < ``t_in`` before gate/up and |h| < ``t_mid`` before down.

    Reads 2/3 * kept inputs + 1/3 * kept intermediates of the weights. ``t_in`` may be a [D] tensor and
    ``t_mid`` an [F] tensor (per-channel thresholds). On CUDA one fused pipeline with no host sync
    (CUDA-graph capturable). Returns [..., D] in x's dtype.

    Example:
        >>> w = pack_teal(torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6))
        >>> teal_ffn(torch.randn(1, 4), w, 0.1, 0.1, backend="reference").shape
        torch.Size([1, 4])
    """
    _check_act(act)
    if not isinstance(weights, TealWeights):
        raise InvalidArgumentError(
            f"weights must be TealWeights from pack_teal, got {type(weights).__name__}"
        )
    f, d = weights.down_t.shape
    _check_x(x, weights.gate_up_t, d, "TEAL weights (gate_up_t is [D, 2F])")
    if not weights.down_t.is_contiguous():
        raise InvalidArgumentError("the TEAL down_t must be contiguous: build the weights with pack_teal")
    t_in = _check_threshold(t_in, d, x, "input")
    t_mid = _check_threshold(t_mid, f, x, "intermediate")
    if x.numel() == 0:
        return torch.zeros_like(x)
    return dispatch("teal_ffn", x, backend)(x, weights.gate_up_t, weights.down_t, t_in, t_mid, act=act)


def predicted_ffn(
    x: Tensor,
    packed: Tensor,
    z: Tensor,
    pred_b: Tensor,
    pred_bias: Tensor,
    threshold: float,
    *,
    act: str = "silu",
    backend: str | None = None,
) -> Tensor:
    """Deja Vu: the gated FFN over the neurons whose predictor score s_i = pred_b[i] · z + pred_bias[i]
    exceeds ``threshold``, per row (z = A x, the predictor's low-rank projection, computed by the caller).

    x [..., D]; ``packed`` [F, 3, D]; z [..., R] (the rows of x); ``pred_b`` [F, R]; ``pred_bias`` [F]; the
    scores are float32. On CUDA a single row runs one persistent kernel that scores each block of neurons
    and reads the weights of the kept ones only (no host sync, CUDA-graph capturable); a neuron whose score
    is within float32 rounding of the threshold may go either way (the kernel sums in its own order).
    Returns [..., D] in x's dtype.

    Example:
        >>> p, pb = torch.randn(10, 3, 4), torch.randn(10, 2)
        >>> predicted_ffn(torch.randn(1, 4), p, torch.randn(1, 2), pb, torch.zeros(10), 0.0,
        ...               backend="reference").shape
        torch.Size([1, 4])
    """
    _check_packed(packed)
    _check_x(x, packed, packed.shape[2], "packed FFN weights")
    _check_act(act)
    f = packed.shape[0]
    rows = x.numel() // packed.shape[2]
    for name, t, shape in (("pred_b", pred_b, (f, -1)), ("pred_bias", pred_bias, (f,)), ("z", z, (rows, -1))):
        ok = isinstance(t, Tensor) and t.dim() == len(shape) and t.is_floating_point()
        if ok and name == "z":
            ok = t.numel() == rows * pred_b.shape[1]
        elif ok:
            ok = t.shape[0] == f
        if not ok:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise InvalidArgumentError(
                f"{name} must be a float tensor of shape {shape} (-1: the rank), got {got}"
            )
        if t.device != packed.device:
            raise InvalidArgumentError(f"{name} is on {t.device} but the weights on {packed.device}: move it")
    t = float(threshold)
    if t != t:
        raise InvalidArgumentError("threshold must be a number, got NaN")
    if x.numel() == 0:
        return torch.zeros_like(x)
    return dispatch("predicted_ffn", x, backend)(x, packed, z, pred_b, pred_bias, t, act=act)
