"""Triton int4 matrix-vector products for decode (a few rows of x), and the whole gated int4 FFN in two
launches: [gate | up] in one pass with act(gate) * up fused into it, then down.

Layout (:func:`int4_pack`, once per matrix and device): the 2–4-bit integers q [out, in] as nibbles
q + 8, two per byte, input 2k in the low nibble and 2k + 1 in the high one ([out, in / 2] uint8, each row
contiguous), and per group of ``g`` inputs the scale s and m = −z·s in bfloat16 ([out, in / g] each), so
W = q·s + m = (q − z)·s. A program owns ``BLOCK_O`` output rows and walks the inputs in chunks of
``BLOCK_G`` groups: it unpacks the nibbles, multiplies by x in float32, sums each group, then applies
s and m once per group (sum_j x_j W_j = s·sum_j q_j x_j + m·sum_j x_j). ``PAIR`` reads the up row
``pair`` rows below each gate row in the same iteration and writes act(gate)·up, so the intermediate of
the FFN never makes a round trip through memory in float32 and needs no extra launch.

Equal to dequantise-then-matmul up to float32 summation order and the bfloat16 rounding of m (as in
torch's tinygemm path, :mod:`ffnkit.kernels.cuda_quant`).

Example:
    >>> gu = int4_pack(q_gate_up.cuda(), s.cuda(), z.cuda())  # doctest: +SKIP
    >>> h = int4_gemv(x, gu, act="silu", pair=True)  # [1, F]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

from ffnkit.kernels.triton_sparse_ffn import ACT_CODES, apply_act

# Launch parameters per matrix kind ("pair": [gate | up] with the fused activation; "single": down), batch 1.
CONFIGS: dict[str, dict] = {
    "pair": {"BLOCK_O": 4, "BLOCK_G": 16, "num_warps": 4, "num_stages": 2},
    "single": {"BLOCK_O": 2, "BLOCK_G": 16, "num_warps": 4, "num_stages": 2},
}


@dataclass(frozen=True)
class Int4Rows:
    """One int4 matrix in the layout of this module: ``w`` [out, in / 2] uint8, ``s`` and ``m``
    [out, in / group] bfloat16.

    Example:
        >>> Int4Rows(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 8).in_features
        8
    """

    w: Tensor = field(repr=False)
    s: Tensor = field(repr=False)
    m: Tensor = field(repr=False)
    group: int

    @property
    def in_features(self) -> int:
        return self.w.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.w.shape[0]


def int4_pack(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Int4Rows:
    """Repack q [out, in] int8 (values in [-8, 7]), scales [out, groups] and zero points [out, groups] (or
    None) into :class:`Int4Rows` (on q's device). The group size must be even.

    Example:
        >>> p = int4_pack(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 2), None)
        >>> p.w.shape, p.group
        (torch.Size([2, 4]), 4)
    """
    out, n = q.shape
    g = n // scale.shape[1]
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # [out, in] nibbles
    w = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()  # [out, in/2]: even input low
    s = scale.detach().to(torch.float32)
    m = torch.zeros_like(s) if zero_point is None else -zero_point.to(torch.float32) * s
    return Int4Rows(w, s.to(torch.bfloat16).contiguous(), m.to(torch.bfloat16).contiguous(), g)


def concat_rows(a: Int4Rows, b: Int4Rows) -> Int4Rows:
    """[a; b] stacked along the outputs (gate and up of one FFN: one pass reads both).

    Example:
        >>> p = int4_pack(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 2), None)
        >>> concat_rows(p, p).out_features
        4
    """
    if a.group != b.group or a.in_features != b.in_features:
        raise ValueError("concat_rows needs the same inputs and group size")
    return Int4Rows(torch.cat([a.w, b.w]), torch.cat([a.s, b.s]), torch.cat([a.m, b.m]), a.group)


@triton.jit(do_not_specialize=["OUT", "N_GROUPS", "PAIR_OFF"])
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, y_ptr, OUT, N_GROUPS, PAIR_OFF,
    HALF_G: tl.constexpr, PAIR: tl.constexpr, ACT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row = tl.program_id(1)  # the row of x
    ro = pid * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO] output rows
    mo = ro < OUT
    ro64 = ro.to(tl.int64)
    in_half = N_GROUPS * HALF_G  # bytes per weight row
    ob = tl.arange(0, HALF_G)
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_O], dtype=tl.float32)
    xrow = x_ptr + row * (2 * in_half)
    for c0 in range(0, N_GROUPS, BLOCK_G):
        og = c0 + tl.arange(0, BLOCK_G)  # [BG] groups of this chunk
        mg = og < N_GROUPS
        col = og[:, None] * HALF_G + ob[None, :]  # [BG, HG] byte columns
        mcol = mg[:, None] & (ob[None, :] < HALF_G)
        xe = tl.load(xrow + 2 * col, mask=mcol, other=0.0).to(tl.float32)  # [BG, HG] even inputs
        xo = tl.load(xrow + 2 * col + 1, mask=mcol, other=0.0).to(tl.float32)  # odd inputs
        xs = tl.sum(xe + xo, axis=1)  # [BG] sum of x per group
        m3 = mo[:, None, None] & mcol[None, :, :]
        bp = w_ptr + ro64[:, None, None] * in_half + col[None, :, :]  # [BO, BG, HG]
        gm = mo[:, None] & mg[None, :]
        sp = ro64[:, None] * N_GROUPS + og[None, :]  # [BO, BG]
        b = tl.load(bp, mask=m3, other=0x88).to(tl.int32)
        lo = ((b & 15) - 8).to(tl.float32)
        hi = ((b >> 4) - 8).to(tl.float32)
        part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BO, BG]
        s = tl.load(s_ptr + sp, mask=gm, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + sp, mask=gm, other=0.0).to(tl.float32)
        acc += tl.sum(part * s + m * xs[None, :], axis=1)
        if PAIR:
            b2 = tl.load(bp + PAIR_OFF * in_half, mask=m3, other=0x88).to(tl.int32)
            lo2 = ((b2 & 15) - 8).to(tl.float32)
            hi2 = ((b2 >> 4) - 8).to(tl.float32)
            part2 = tl.sum(lo2 * xe[None, :, :] + hi2 * xo[None, :, :], axis=2)
            s2 = tl.load(s_ptr + sp + PAIR_OFF * N_GROUPS, mask=gm, other=0.0).to(tl.float32)
            m2 = tl.load(m_ptr + sp + PAIR_OFF * N_GROUPS, mask=gm, other=0.0).to(tl.float32)
            acc_p += tl.sum(part2 * s2 + m2 * xs[None, :], axis=1)
    if PAIR:
        acc = apply_act(acc, ACT) * acc_p
    tl.store(y_ptr + row * OUT + ro, acc.to(y_ptr.dtype.element_ty), mask=mo)


def int4_gemv(x: Tensor, pack: Int4Rows, *, act: str = "silu", pair: bool = False) -> Tensor:
    """y = x Wᵀ for x [N, in] (N small: the weights are read once per row), or with ``pair`` (W = [gate;
    up], 2F rows) act(x W_gateᵀ) * (x W_upᵀ) [N, F]. Returns x's dtype.

    Example:
        >>> int4_gemv(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16), pack)  # doctest: +SKIP
    """
    n_in = pack.in_features
    x2 = x.reshape(-1, n_in).contiguous()  # [N, in]
    out = pack.out_features // 2 if pair else pack.out_features
    cfg = dict(CONFIGS["pair" if pair else "single"])
    bo, bg = cfg.pop("BLOCK_O"), cfg.pop("BLOCK_G")
    groups = n_in // pack.group
    bg = min(bg, triton.next_power_of_2(groups))
    y = torch.empty(x2.shape[0], out, device=x.device, dtype=x.dtype)  # [N, out]
    _int4_gemv_kernel[(triton.cdiv(out, bo), x2.shape[0])](
        x2, pack.w, pack.s, pack.m, y, out, groups, out,
        HALF_G=pack.group // 2, PAIR=pair, ACT=ACT_CODES[act], BLOCK_O=bo, BLOCK_G=bg, **cfg,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out)


def int4_gated_ffn(x: Tensor, gate_up: Int4Rows, down: Int4Rows, act: str = "silu") -> Tensor:
    """down(act(gate x) * up x) from int4 weights in two launches (``gate_up`` = :func:`concat_rows` of
    gate and up). x [..., D] -> [..., D] in x's dtype.

    Example:
        >>> int4_gated_ffn(x, concat_rows(g, u), d)  # doctest: +SKIP
    """
    h = int4_gemv(x, gate_up, act=act, pair=True)  # [..., F]
    return int4_gemv(h, down)


def ffn_pack(gate: tuple, up: tuple, down: tuple, bits: int) -> tuple[Int4Rows, Int4Rows] | None:
    """(gate_up, down) packs of a gated FFN from its three (q, scale, zero_point) triples, or None where this
    path does not fit (more than 4 bits, a group size that is not an even power of two, groups that differ).

    Example:
        >>> ffn_pack(g, u, d, 4)  # doctest: +SKIP
    """
    if bits > 4:
        return None
    groups = {t[0].shape[1] // t[1].shape[1] for t in (gate, up, down)}
    g = groups.pop()
    if groups or g < 2 or g & (g - 1):
        return None
    gu = concat_rows(int4_pack(*gate), int4_pack(*up))
    return gu, int4_pack(*down)


def quant_ffn(x: Tensor, packs: tuple[Int4Rows, Int4Rows], act: str = "silu") -> Tensor:
    """:func:`int4_gated_ffn` on the packs of :func:`ffn_pack`.

    Example:
        >>> quant_ffn(x, ffn_pack(g, u, d, 4))  # doctest: +SKIP
    """
    return int4_gated_ffn(x, packs[0], packs[1], act)
