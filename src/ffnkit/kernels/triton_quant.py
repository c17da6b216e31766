"""The whole gated int4 FFN at decode on the GPU in three launches: one tinygemm product over [gate | up]
(the two matrices stacked along the outputs: one launch, one read of x), one Triton kernel for
act(gate) · up, one tinygemm product for down.

H200, Llama-3-8B FFN (4096x14336, group 64), batch 1, CUDA graphs (results/quant_kernel_h200_fused.json):
56.0 us against 99.3 us for the bf16 FFN = 1.77x (goal 1.8x, not reached), and 60.3 us = 1.65x for the
three QuantizedLinear one by one (five launches). At batch 8 it is 0.81x the bf16 FFN (tinygemm is a
batch-1 kernel).

Why tinygemm and not a Triton int4 GEMV: a Triton kernel over nibble-packed rows (unpack, multiply in
float32, sum per group, then scale; commit 4019696) took, at its best of 18 launch configurations on the
H200 at batch 1, 54 us for [gate | up] (28672x4096, group 64) and 51 us for down (4096x14336)
(results/quant_kernel_h200_triton_gemv.json, triton_int4_sweep_batch1_us), against 34-35 and 19 us for
tinygemm on the same shapes (results/quant_kernel_h200.json, tinygemm_probe_batch1_us), so the products
stay on tinygemm and only the activation product is a Triton kernel.

Equal to dequantise-then-matmul up to float rounding: tinygemm's bfloat16 zero·scale terms, and the
intermediate act(gate)·up computed in float32 and rounded once to x's dtype.

Example:
    >>> packs = ffn_pack((qg, sg, zg), (qu, su, zu), (qd, sd, zd), 4)  # doctest: +SKIP
    >>> quant_ffn(x, packs).shape  # doctest: +SKIP
    torch.Size([1, 4096])
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffnkit.kernels.cuda_quant import quant_linear, quant_pack
from ffnkit.kernels.quant_matmul import QuantPack
from ffnkit.kernels.triton_sparse_ffn import ACT_CODES, apply_act

BLOCK = 1024  # intermediate elements per program of the activation product


@triton.jit(do_not_specialize=["F"])
def _act_mul_kernel(gu_ptr, h_ptr, F, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < F
    g = tl.load(gu_ptr + row * 2 * F + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * F + F + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * F + offs, (apply_act(g, ACT) * u).to(h_ptr.dtype.element_ty), mask=m)


def act_mul(gu: Tensor, act: str = "silu") -> Tensor:
    """h [N, F] = act(gu[:, :F]) * gu[:, F:] for gu [N, 2F] (float32 inside, gu's dtype out), one launch.

    Example:
        >>> act_mul(torch.randn(1, 8, device="cuda")).shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    n, f2 = gu.shape
    f = f2 // 2
    h = torch.empty(n, f, device=gu.device, dtype=gu.dtype)
    _act_mul_kernel[(triton.cdiv(f, BLOCK), n)](
        gu.contiguous(), h, f, ACT=ACT_CODES[act], BLOCK=BLOCK, num_warps=4
    )
    return h


def ffn_pack(gate: tuple, up: tuple, down: tuple, bits: int) -> tuple[QuantPack, QuantPack] | None:
    """(gate_up, down) tinygemm packs of a gated FFN from its three (q, scale, zero_point), gate and up
    stacked along the outputs; None where tinygemm cannot take them (then run the matrices one by one).

    Example:
        >>> ffn_pack(g, u, d, 4)  # doctest: +SKIP
    """
    (qg, sg, zg), (qu, su, zu) = gate, up
    if (zg is None) != (zu is None) or sg.shape[1] != su.shape[1] or sg.dtype != su.dtype:
        return None
    zp = None if zg is None else torch.cat([zg, zu])
    gu = quant_pack(torch.cat([qg, qu]), torch.cat([sg, su]), zp, bits, torch.bfloat16)
    dn = quant_pack(*down, bits, torch.bfloat16)
    if gu.path != "tinygemm" or dn.path != "tinygemm":
        return None
    return gu, dn


def quant_ffn(x: Tensor, packs: tuple[QuantPack, QuantPack], act: str = "silu") -> Tensor:
    """down(act(gate x) * up x) on the packs of :func:`ffn_pack`; x [..., D] -> [..., D] in x's dtype.

    Example:
        >>> quant_ffn(x, ffn_pack(g, u, d, 4))  # doctest: +SKIP
    """
    gu_pack, dn_pack = packs
    x2 = x.reshape(-1, gu_pack.in_features).to(torch.bfloat16)  # [N, D]
    h = act_mul(quant_linear(x2, gu_pack), act)  # [N, F]
    return quant_linear(h, dn_pack).to(x.dtype).reshape(x.shape)
