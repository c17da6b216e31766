"""Reference kernels: the masked dense computation in plain torch, the oracle of every other backend.

Each function computes the *dense* FFN (every neuron, every input column) in float32 and multiplies by a
mask; nothing is gathered or skipped, so it shares no indexing logic with the fast paths it checks. The
result is cast back to the input dtype. Inputs are already validated by :mod:`ffnkit.kernels.sparse_ffn`.

Example:
    >>> import torch
    >>> from ffnkit.kernels.reference import gather_ffn
    >>> packed = torch.randn(6, 3, 4)
    >>> gather_ffn(torch.randn(2, 4), packed, torch.tensor([0, 5])).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError


def activation(name: str, g: Tensor) -> Tensor:
    """Apply the named activation (``silu``, ``gelu``, ``gelu_tanh``, ``relu``) to ``g``.

    Example:
        >>> activation("relu", torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    if name == "silu":
        return torch.nn.functional.silu(g)
    if name == "gelu":
        return torch.nn.functional.gelu(g)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(g, approximate="tanh")
    if name == "relu":
        return torch.relu(g)
    raise InvalidArgumentError(f"unknown activation {name!r}: use one of silu, gelu, gelu_tanh, relu")


def _dense_hidden(x2: Tensor, packed: Tensor, act: str) -> tuple[Tensor, Tensor]:
    """act(W_gate x) and W_up x for every neuron, in float32."""
    w = packed.float()  # [F, 3, D]
    gate = x2 @ w[:, 0, :].T  # [N, F]
    up = x2 @ w[:, 1, :].T  # [N, F]
    return activation(act, gate), up


def gather_ffn(
    x: Tensor, packed: Tensor, idx: Tensor, act: str = "silu", scale: Tensor | None = None
) -> Tensor:
    """y = W_down (m * act(W_gate x) * (W_up x)) with m_i = how often neuron i is in ``idx`` (times ``scale``).

    ``scale`` [N, K] weights neuron ``idx[k]`` for row n (an MoE router weight); duplicates in ``idx`` add up.

    Example:
        >>> p = torch.randn(5, 3, 4)
        >>> gather_ffn(torch.randn(1, 4), p, torch.arange(5)).shape
        torch.Size([1, 4])
    """
    d = packed.shape[2]
    x2 = x.reshape(-1, d).float()  # [N, D]
    a, up = _dense_hidden(x2, packed, act)  # [N, F] each
    weights = scale.float() if scale is not None else torch.ones(x2.shape[0], idx.numel(), device=x.device)
    mask = torch.zeros_like(up).index_add_(1, idx.long(), weights)  # [N, F]
    y = (a * up * mask) @ packed[:, 2, :].float()  # [N, D]
    return y.to(x.dtype).reshape(x.shape)


def threshold_ffn(x: Tensor, packed: Tensor, threshold: float, act: str = "silu") -> Tensor:
    """CATS: y = W_down (act(W_gate x) * (W_up x)) with the neurons of |act(W_gate x)| <= t zeroed, per row.

    Example:
        >>> p = torch.randn(5, 3, 4)
        >>> threshold_ffn(torch.randn(2, 4), p, 0.0).shape
        torch.Size([2, 4])
    """
    d = packed.shape[2]
    x2 = x.reshape(-1, d).float()  # [N, D]
    a, up = _dense_hidden(x2, packed, act)
    h = torch.where(a.abs() > threshold, a * up, torch.zeros_like(up))  # [N, F]
    y = h @ packed[:, 2, :].float()  # [N, D]
    return y.to(x.dtype).reshape(x.shape)


def sparse_input_linear(x: Tensor, w_t: Tensor, threshold: float) -> Tensor:
    """TEAL: y = (x * [|x| >= t]) @ W_t, with ``w_t`` the weight stored transposed, [in, out].

    Example:
        >>> sparse_input_linear(torch.randn(2, 3), torch.randn(3, 5), 0.5).shape
        torch.Size([2, 5])
    """
    x2 = x.reshape(-1, w_t.shape[0]).float()  # [N, in]
    kept = torch.where(x2.abs() >= threshold, x2, torch.zeros_like(x2))
    y = kept @ w_t.float()  # [N, out]
    return y.to(x.dtype).reshape(*x.shape[:-1], w_t.shape[1])


def teal_ffn(
    x: Tensor, gate_up_t: Tensor, down_t: Tensor, t_in: float, t_mid: float, act: str = "silu"
) -> Tensor:
    """TEAL on a whole gated FFN: sparse input to gate/up, then sparse intermediate to down (masked dense).

    Example:
        >>> teal_ffn(torch.randn(1, 4), torch.randn(4, 10), torch.randn(5, 4), 0.1, 0.1).shape
        torch.Size([1, 4])
    """
    f = down_t.shape[0]
    x2 = x.reshape(-1, gate_up_t.shape[0]).float()
    xs = torch.where(x2.abs() >= t_in, x2, torch.zeros_like(x2))
    gu = xs @ gate_up_t.float()  # [N, 2F]
    h = activation(act, gu[:, :f]) * gu[:, f:]  # [N, F]
    h = torch.where(h.abs() >= t_mid, h, torch.zeros_like(h))
    return (h @ down_t.float()).to(x.dtype).reshape(x.shape)


def predicted_ffn(
    x: Tensor,
    packed: Tensor,
    z: Tensor,
    pred_b: Tensor,
    pred_bias: Tensor,
    threshold: float,
    act: str = "silu",
) -> Tensor:
    """The dense FFN with every neuron of score pred_b · z + pred_bias <= threshold zeroed, per row.

    Example:
        >>> predicted_ffn(torch.randn(1, 4), torch.randn(6, 3, 4), torch.randn(1, 2), torch.randn(6, 2),
        ...               torch.zeros(6), 0.0).shape
        torch.Size([1, 4])
    """
    d = packed.shape[2]
    x2 = x.reshape(-1, d).float()  # [N, D]
    a, up = _dense_hidden(x2, packed, act)  # [N, F] each
    score = z.reshape(x2.shape[0], -1).float() @ pred_b.float().T + pred_bias.float()  # [N, F]
    h = torch.where(score > threshold, a * up, torch.zeros_like(up))
    return (h @ packed[:, 2, :].float()).to(x.dtype).reshape(x.shape)


def bytes_read_fraction(active: float, kind: str) -> float:
    """The share of FFN weight bytes a kernel reads when a share ``active`` of its units is kept.

    ``gather``: active neurons only; ``threshold`` (CATS): the whole gate plus the active up rows and down
    columns; ``input`` (TEAL linear): the kept input columns.

    Example:
        >>> bytes_read_fraction(0.5, "threshold")
        0.6666666666666666
    """
    if kind == "threshold":
        return 1.0 / 3.0 + active * 2.0 / 3.0
    if kind in ("gather", "input"):
        return active
    raise InvalidArgumentError(f"unknown kernel kind {kind!r}: use gather, threshold or input")


__all__ = [
    "activation",
    "gather_ffn",
    "threshold_ffn",
    "predicted_ffn",
    "sparse_input_linear",
    "teal_ffn",
    "bytes_read_fraction",
]
