"""Shared cases for the expert-executor tests (tests/unit/test_kernels_moe.py on CPU, tests/gpu on CUDA).

Every case draws fresh random experts, inputs and routing, runs :func:`ffnkit.kernels.moe.experts_forward`
on the path under test and on the ``reference`` backend (every expert on every token in float32, combined
by a dense routing matrix), and compares by ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import zlib

import torch

# Stated tolerances (relative Frobenius error against the float32 reference): float32 paths sum in another
# order (~1e-7; 1e-5 leaves room for long sums); bf16/fp16 paths round h and each expert's output to the
# dtype once (~2^-8 relative each).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# (tokens, K, E, F, D): k=1, E not a power of 2, tiles wider than one GPU block, single token
SHAPES = [
    (1, 2, 4, 24, 40),
    (5, 1, 7, 16, 24),
    (33, 3, 6, 40, 72),
    (130, 2, 5, 136, 264),
    (300, 4, 16, 32, 64),
]
# routing scenarios: uniform; skewed (expert 0 takes 4x its share); few (most experts get no token);
# none (a share of the slots are index E = no expert); zero (some weights 0); dup (one expert twice per token)
ROUTINGS = ("uniform", "skewed", "few", "none", "zero", "dup")
ACTS = ("silu", "gelu", "gelu_tanh", "relu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.float().norm() == 0:
        return float(a.float().norm())
    return float((a.float() - b.float()).norm() / b.float().norm())


def routing(kind: str, t: int, k: int, e: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index [T, K], top_k_weights [T, K]) float32 for a routing scenario."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.ones(e)
    if kind == "skewed":
        probs[0] = 4.0  # expert 0 drawn 4x as often as each other expert
    if kind == "few":
        probs = torch.zeros(e)
        probs[: min(e, k + 1)] = 1.0
    idx = torch.stack([torch.multinomial(probs, k, replacement=False, generator=g) for _ in range(t)])
    w = torch.rand(t, k, generator=g) + 0.05
    w = w / w.sum(-1, keepdim=True)
    if kind == "none":
        idx[torch.rand(t, k, generator=g) < 0.3] = e
        idx[0, :] = e  # a token routed nowhere gets 0
    if kind == "zero":
        w[torch.rand(t, k, generator=g) < 0.3] = 0.0
    if kind == "dup" and k > 1:
        idx[:, 1] = idx[:, 0]
    return idx.to(device), w.to(device)


def make_experts(t: int, e: int, f: int, d: int, dtype: torch.dtype, device: str, seed: int):
    """Fresh random x [T, D], gate_up [E, 2F, D], down [E, D, F], scaled like a trained layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    gate_up = torch.randn(e, 2 * f, d, generator=g) / d**0.5
    down = torch.randn(e, d, f, generator=g) / f**0.5
    return (x.to(device, dtype), gate_up.to(device, dtype), down.to(device, dtype))


def case(
    key: object, routing_kind: str, shape: tuple, dtype: torch.dtype = torch.float32, device: str = "cpu"
):
    """(x, gate_up, down, idx, w) of one test case, seeded by (key, routing, shape): fresh per case, stable
    between runs."""
    t, k, e, f, d = shape
    seed = zlib.crc32(repr((key, routing_kind, shape)).encode()) % 10_000
    x, gu, dn = make_experts(t, e, f, d, dtype, device, seed)
    return (x, gu, dn, *routing(routing_kind, t, k, e, seed + 1, device))
