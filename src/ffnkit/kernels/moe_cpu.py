"""The ``cpu`` expert executor: an expert-major C kernel, with torch paths where it cannot run.

Three shapes of the same computation (inputs validated by :mod:`ffnkit.kernels.moe`):

- ``c`` (:func:`c_experts`; when the C library of :mod:`ffnkit.kernels.cpu_build` is built, the experts
  are contiguous float32 / bfloat16 / float16 and there are at most ``CONFIGS["c_max_pairs"]`` pairs): for
  each expert that got tokens, every gate, up and down row is read once for all of that expert's tokens,
  h = w * act(gate x) * (up x) stays in float32, and ``down_e h`` is added into each token's output. An
  expert with few tokens runs dot-product tiles (2 rows x 4 tokens) on its token rows in place; one with at
  least ``c_pack_min_tokens`` packs them 16 to a block and runs broadcast tiles (6 rows x 16 tokens, like a
  GEMM micro-kernel). Threads split each expert's neurons, then the output columns (no reduction); the next
  tile's weights are prefetched ``c_prefetch`` tiles ahead.
- ``gather`` (torch, at most ``gather_max_pairs`` token-expert pairs): for each pair, read only that
  expert's rows: ``gu = gate_up[e] @ x_t``, ``h = act(gu[:F]) * gu[F:]``, and ``y_t += w * down[e] @ h``
  with ``addmv`` (the weight folded into the product, no extra pass).
- ``sorted`` (torch): one stable sort of the pairs by expert, then one matmul per expert over its
  contiguous block of rows (a grouped GEMM written as a loop over the experts that got tokens; empty experts
  cost nothing), then the rows are put back in token order and each token's K rows summed with the router
  weights in one batched product.

All read each weight in place (no copy of an expert) and return x's dtype; the torch paths keep x's dtype
inside, as torch's CPU matmuls do.

Example:
    >>> import torch
    >>> from ffnkit.kernels.moe_cpu import experts_forward
    >>> gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
    >>> experts_forward(torch.randn(3, 6), gu, dn, torch.randint(0, 4, (3, 2)), torch.rand(3, 2)).shape
    torch.Size([3, 6])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ffnkit.kernels.cpu_build import load_cpu_library
from ffnkit.kernels.cpu_sparse_ffn import ACT_CODES, DTYPE_CODES
from ffnkit.kernels.reference import activation

# Measured on the 2-core CPU at hidden 512, width 256, 16 experts, top-4, float32
# (benchmarks/moe_cpu_configs.py -> benchmarks/results/moe_cpu_configs.json, "chosen"):
# c_max_pairs: pairs (tokens x K) up to which the C kernel runs (faster than the torch paths at every
# measured size up to it); c_pack_min_tokens: tokens an expert needs for the packed broadcast tiles;
# c_prefetch: tiles of software prefetch ahead (0 = off). gather_max_pairs (torch fallback only): pairs up
# to which the per-pair gather path runs, above it the sorted path (benchmarks/moe_kernel.py).
CONFIGS: dict[str, int] = {
    "gather_max_pairs": 8,
    "c_pack_min_tokens": 8,
    "c_prefetch": 1,
    "c_max_pairs": 16384,
}


def _act_mul(gu: Tensor, f: int, act: str) -> Tensor:
    """act(gate) * up for gate/up side by side in the last dimension ([..., 2F] -> [..., F])."""
    if act == "silu":
        return F.silu(gu[..., :f]).mul_(gu[..., f:])
    return activation(act, gu[..., :f]) * gu[..., f:]


def gather_experts(
    x: Tensor, gate_up: Tensor, down: Tensor, top_k_index: Tensor, top_k_weights: Tensor, act: str = "silu"
) -> Tensor:
    """Decode: one matrix-vector pass per (token, expert) pair, reading only the selected experts.

    Example:
        >>> gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
        >>> gather_experts(torch.randn(1, 6), gu, dn, torch.tensor([[1, 3]]), torch.rand(1, 2)).shape
        torch.Size([1, 6])
    """
    e, f2, _ = gate_up.shape
    f = f2 // 2
    y = torch.zeros_like(x)  # [T, D]
    pairs = top_k_index.tolist()  # one small host read on the CPU
    weights = top_k_weights.tolist()
    for t, (row, wrow) in enumerate(zip(pairs, weights, strict=True)):
        for j, w in zip(row, wrow, strict=True):
            if j >= e or w == 0.0:
                continue
            gu = torch.mv(gate_up[j], x[t])  # [2F]
            h = _act_mul(gu, f, act)  # [F]
            y[t].addmv_(down[j], h, alpha=w)  # [D] += w * down_e h
    return y


def sorted_experts(
    x: Tensor, gate_up: Tensor, down: Tensor, top_k_index: Tensor, top_k_weights: Tensor, act: str = "silu"
) -> Tensor:
    """Prefill: sort the pairs by expert, one matmul per expert over its rows, weight, add back per token.

    Example:
        >>> gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
        >>> sorted_experts(torch.randn(5, 6), gu, dn, torch.randint(0, 5, (5, 3)), torch.rand(5, 3)).shape
        torch.Size([5, 6])
    """
    e, f2, d = gate_up.shape
    f = f2 // 2
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)  # [S]
    order = torch.argsort(flat, stable=True)  # [S] pairs grouped by expert (index E last)
    counts = torch.bincount(flat, minlength=e + 1).tolist()  # [E+1]
    xs = x.index_select(0, order // k)  # [S, D] rows grouped by expert
    out = torch.empty(flat.numel(), d, dtype=x.dtype)  # [S, D]
    start = 0
    for j in range(e):
        n = counts[j]
        if n == 0:
            continue
        seg = slice(start, start + n)
        gu = F.linear(xs[seg], gate_up[j])  # [n, 2F]
        h = _act_mul(gu, f, act)  # [n, F]
        torch.mm(h, down[j].T, out=out[seg])  # [n, D]
        start += n
    out[start:].zero_()  # pairs with index E (no expert)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel())  # [S] sorted row of each pair
    rows = out.index_select(0, pos).view(-1, k, d)  # [T, K, D] back in token order
    # the weighted sum of each token's K rows as one batched product (no scatter: index_add_ on CPU was
    # the slowest step of transformers' eager path in benchmarks/results/moe_kernel_cpu.json)
    return torch.bmm(top_k_weights.to(x.dtype).view(-1, 1, k), rows).view(-1, d)  # [T, D]


def c_available(gate_up: Tensor, down: Tensor) -> bool:
    """Whether :func:`c_experts` can run these experts (C library built, dtype supported, contiguous).

    Example:
        >>> c_available(torch.randn(4, 8, 6), torch.randn(4, 6, 4)) in (True, False)
        True
    """
    return (
        gate_up.dtype in DTYPE_CODES
        and gate_up.is_contiguous()
        and down.is_contiguous()
        and load_cpu_library() is not None
    )


def c_experts(
    x: Tensor, gate_up: Tensor, down: Tensor, top_k_index: Tensor, top_k_weights: Tensor, act: str = "silu"
) -> Tensor:
    """Expert-major C kernel: each expert's weight rows read once for all the tokens routed to it.

    For each expert that got tokens, gate row i and up row i are one register tile against all its token
    rows (h = w * act(g) * u in float32), then down's D rows against those h rows, added into each token's
    output; threads split each expert's neurons, then the output rows. Float32 accumulation; x and h are
    float32, weights are read in place in their dtype (float32, bfloat16, float16). Needs
    :func:`c_available`.

    Example:
        >>> gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
        >>> c_experts(torch.randn(3, 6), gu, dn, torch.randint(0, 4, (3, 2)), torch.rand(3, 2)).shape  # doctest: +SKIP
        torch.Size([3, 6])
    """
    e, f2, d = gate_up.shape
    t, k = top_k_index.shape
    x2 = x.to(torch.float32).contiguous()  # [T, D]
    idx = top_k_index.to(torch.int64).contiguous()  # [T, K]
    w = top_k_weights.to(torch.float32).contiguous()  # [T, K]
    y = torch.empty(t, d, dtype=torch.float32)  # [T, D], overwritten by the kernel
    rc = load_cpu_library().ffnkit_moe_experts(
        DTYPE_CODES[gate_up.dtype], x2.data_ptr(), t, d, f2 // 2, e, k, gate_up.data_ptr(), down.data_ptr(),
        idx.data_ptr(), w.data_ptr(), ACT_CODES[act], y.data_ptr(), torch.get_num_threads(), CONFIGS["c_pack_min_tokens"],
        CONFIGS["c_prefetch"],
    )  # fmt: skip
    if rc == 2:
        raise MemoryError(f"ffnkit cpu experts: no memory for {t * k} token-expert pairs; pass fewer tokens")
    assert rc == 0
    return y.to(x.dtype)


def experts_forward(
    x: Tensor, gate_up: Tensor, down: Tensor, top_k_index: Tensor, top_k_weights: Tensor, act: str = "silu"
) -> Tensor:
    """The ``cpu`` backend of :func:`ffnkit.kernels.moe.experts_forward` (gather or sorted by pair count).

    Example:
        >>> gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
        >>> experts_forward(torch.randn(2, 6), gu, dn, torch.randint(0, 4, (2, 2)), torch.rand(2, 2)).shape
        torch.Size([2, 6])
    """
    # the C kernel has no backward: anything that needs gradients (router or expert training) takes torch
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down, top_k_weights))
    if top_k_index.numel() <= CONFIGS["c_max_pairs"] and not needs_grad and c_available(gate_up, down):
        return c_experts(x, gate_up, down, top_k_index, top_k_weights, act)
    if top_k_index.numel() <= CONFIGS["gather_max_pairs"]:
        return gather_experts(x, gate_up, down, top_k_index, top_k_weights, act)
    return sorted_experts(x, gate_up, down, top_k_index, top_k_weights, act)


__all__ = ["CONFIGS", "experts_forward", "gather_experts", "sorted_experts"]
