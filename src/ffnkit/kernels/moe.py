"""The expert executor of a mixture-of-experts layer: y = sum_k w_k * down_e(act(gate_e x) * up_e x).

Experts are stored as in transformers v5: ``gate_up`` [E, 2F, D] (gate = the first F rows of each expert,
up = the last F) and ``down`` [E, D, F]; a router gives each token ``top_k_index`` [T, K] and
``top_k_weights`` [T, K]. An index equal to E (no expert, e.g. a dropped or padded slot) or a weight of 0
contributes nothing. Activation sparsity and routing are one idea at two granularities: here the selected
"units" are whole experts, and the same two execution shapes apply as in :mod:`ffnkit.kernels.sparse_ffn`:

- decode (few token-expert pairs): gather only the K selected experts' weights, one pass per pair;
- prefill: sort the pairs by expert and run each expert as one matrix product over its contiguous rows
  (a grouped GEMM), then put the rows back and sum each token's K outputs.

Backends (:mod:`ffnkit.kernels.backend`, one dispatch table): ``reference`` (a loop over experts in float32,
the test oracle), ``cpu`` (:mod:`ffnkit.kernels.moe_cpu`: an expert-major C kernel reading each expert's
rows once for all its tokens; torch per-pair matrix-vector products or sorted per-expert matmuls without a
compiler), ``triton`` (:mod:`ffnkit.kernels.moe_triton`: Triton gather kernels at
decode, a Triton grouped GEMM with the activation fused, and for large batches on sm90+ GPUs persistent
TMA grouped GEMMs (:mod:`ffnkit.kernels.moe_tma`), elsewhere ``torch._grouped_mm``).
All return x's dtype; the torch and Triton fast paths keep the intermediate ``act(gate) * up`` in x's
dtype, as the Hugging Face implementations do (the CPU C kernel keeps it in float32).

Example:
    >>> import torch
    >>> from ffnkit.kernels.moe import experts_forward
    >>> E, F, D, T, K = 4, 6, 8, 3, 2
    >>> gate_up, down = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    >>> x, idx, w = torch.randn(T, D), torch.randint(0, E, (T, K)), torch.rand(T, K)
    >>> y = experts_forward(x, gate_up, down, idx, w, backend="cpu")
    >>> torch.allclose(y, experts_forward(x, gate_up, down, idx, w, backend="reference"), atol=1e-4)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels.backend import dispatch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def check_experts(
    x: Tensor, gate_up: Tensor, down: Tensor, top_k_index: Tensor, top_k_weights: Tensor, act: str
) -> None:
    """Validate the arguments of :func:`experts_forward`; a one-line :class:`InvalidArgumentError` if bad.

    Example:
        >>> check_experts(torch.zeros(2, 4), torch.zeros(3, 6, 4), torch.zeros(3, 4, 3),
        ...               torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), "silu")
    """
    if not isinstance(gate_up, Tensor) or gate_up.dim() != 3 or gate_up.shape[1] % 2:
        raise InvalidArgumentError(
            f"gate_up must be [E, 2F, D] (gate rows then up rows), got {_shape(gate_up)}"
        )
    e, f2, d = gate_up.shape
    if not isinstance(down, Tensor) or tuple(down.shape) != (e, d, f2 // 2):
        raise InvalidArgumentError(f"down must be [E, D, F] = [{e}, {d}, {f2 // 2}], got {_shape(down)}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != d:
        raise InvalidArgumentError(
            f"x must be [..., D] with D = {d} (the experts' hidden size), got {_shape(x)}"
        )
    if not (x.is_floating_point() and x.dtype == gate_up.dtype == down.dtype):
        raise InvalidArgumentError(
            f"x, gate_up and down must share one floating dtype, got {x.dtype}, {gate_up.dtype}, {down.dtype}: cast"
        )
    if not (x.device == gate_up.device == down.device):
        raise InvalidArgumentError(f"x is on {x.device} but the experts on {gate_up.device}: move one")
    rows = x.numel() // d
    if (
        not isinstance(top_k_index, Tensor)
        or top_k_index.dtype not in (torch.int32, torch.int64)
        or top_k_index.dim() < 1
        or top_k_index.numel() != rows * top_k_index.shape[-1]
    ):
        raise InvalidArgumentError(
            f"top_k_index must be an int tensor [tokens, K] with tokens = {rows}, got {_shape(top_k_index)}"
        )
    if not isinstance(top_k_weights, Tensor) or top_k_weights.shape != top_k_index.shape:
        raise InvalidArgumentError(
            f"top_k_weights must have the shape of top_k_index {_shape(top_k_index)}, got {_shape(top_k_weights)}"
        )
    if not top_k_weights.is_floating_point():
        raise InvalidArgumentError(f"top_k_weights must be floating point, got {top_k_weights.dtype}")
    if top_k_index.device != x.device or top_k_weights.device != x.device:
        raise InvalidArgumentError(f"the routing tensors must be on {x.device} like x: move them")
    if act not in ACTIVATIONS:
        raise InvalidArgumentError(f"unknown activation {act!r}: use one of {', '.join(ACTIVATIONS)}")
    # Range check on CPU only: on a GPU it would cost a device->host sync per call (documented instead).
    if top_k_index.device.type == "cpu" and top_k_index.numel():
        lo, hi = int(top_k_index.min()), int(top_k_index.max())
        if lo < 0 or hi > e:
            raise InvalidArgumentError(
                f"top_k_index holds experts outside [0, {e}] (E = {e} means no expert): min {lo}, max {hi}"
            )


def experts_forward(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    act: str = "silu",
    *,
    backend: str | None = None,
) -> Tensor:
    """The experts of one MoE layer: y_t = sum_k w[t, k] * down_e (act(gate_e x_t) * up_e x_t), e = idx[t, k].

    x [T, D] (or [..., D], flattened to T rows); ``gate_up`` [E, 2F, D]; ``down`` [E, D, F];
    ``top_k_index`` [T, K] int (E = no expert; on CUDA the range is not checked, as that would sync);
    ``top_k_weights`` [T, K] any float dtype. Experts that get no token cost nothing. Returns x's shape
    and dtype. ``backend``: ``reference``, ``cpu``, ``triton`` or ``auto`` (default, see
    :func:`ffnkit.kernels.resolve_backend`).

    Example:
        >>> gu, dn = torch.randn(5, 8, 4), torch.randn(5, 4, 4)
        >>> idx = torch.tensor([[0, 5], [2, 2]])  # token 0: expert 0 and no expert
        >>> experts_forward(torch.randn(2, 4), gu, dn, idx, torch.rand(2, 2)).shape
        torch.Size([2, 4])
    """
    check_experts(x, gate_up, down, top_k_index, top_k_weights, act)
    d = gate_up.shape[2]
    k = top_k_index.shape[-1]
    if x.numel() == 0 or k == 0:
        return torch.zeros_like(x)
    x2 = x.reshape(-1, d)  # [T, D]
    idx = top_k_index.reshape(-1, k)  # [T, K]
    w = top_k_weights.reshape(-1, k)  # [T, K]
    y = dispatch("experts_forward", x2, backend)(x2, gate_up, down, idx, w, act=act)
    return y.reshape(x.shape)


def sort_pairs(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the token-expert pairs by expert without a device->host sync (CUDA-graph capturable).

    ``top_k_index`` [T, K] (index E = no expert). Returns ``order`` [S] (pair ids sorted by expert, stable,
    no-expert pairs last), ``pos`` [S] (the sorted row of each pair: ``order[pos[p]] == p``) and ``counts``
    [E+1] int64 (pairs per expert, the last entry the no-expert pairs). Every shape depends on S = T x K
    only, never on the routing (``torch.bincount`` would read its input's maximum back to the host).

    Example:
        >>> order, pos, counts = sort_pairs(torch.tensor([[2, 0], [0, 3]]), 3)
        >>> order.tolist(), pos.tolist(), counts.tolist()
        ([1, 2, 0, 3], [2, 0, 1, 3], [2, 0, 1, 1])
    """
    flat = top_k_index.reshape(-1)  # [S]
    order = torch.argsort(flat, stable=True)  # [S]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)  # [E+1]
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    rows = torch.arange(order.numel(), device=order.device)  # [S]
    pos = torch.empty_like(order).scatter_(0, order, rows)  # [S] inverse permutation
    return order, pos, counts


def experts_cost(
    tokens: int, top_k_index: Tensor | None, num_experts: int, d: int, f: int, k: int, itemsize: int
) -> dict[str, float]:
    """FLOPs and the weight bytes the active experts force a pass to read (for roofline floors).

    ``top_k_index`` gives the active experts; without it every expert counts as active.

    Example:
        >>> experts_cost(1, torch.tensor([[0, 1]]), 4, 8, 4, 2, 2)["weight_bytes"]
        384
    """
    if top_k_index is None:
        active = num_experts
    else:
        active = int(torch.unique(top_k_index[top_k_index < num_experts]).numel())
    per_expert = 3 * d * f * itemsize  # gate, up and down
    return {
        "flops": float(tokens * k * 2 * 3 * d * f),
        "weight_bytes": active * per_expert,
        "active_experts": active,
        "activation_bytes": tokens * d * itemsize * 2,
    }


__all__ = ["ACTIVATIONS", "check_experts", "experts_cost", "experts_forward", "sort_pairs"]
