"""The ``tma`` prefill route of the Triton expert executor: persistent grouped GEMMs that load weights by TMA.

For sm90+ GPUs (Hopper: H100/H200) and large batches. Same contract as the other routes of
:mod:`ffnkit.kernels.moe_triton`; the pairs are counting-sorted by expert first
(:func:`ffnkit.kernels.moe_stream.sort_by_expert`). Two kernels, each launched once per SM (persistent: a
program walks the tiles ``pid, pid + NUM_SMS, ...``, so no program waits for a wave to drain):

1. ``_gate_up_tma_kernel``: for a block of BLOCK_M sorted rows of one expert and BLOCK_N of its F neurons,
   gathers the rows' tokens from x by id (no permuted copy of x is written; ``GATHER=False`` instead reads a
   permuted copy through TMA), loads the expert's gate tile and up tile in one TMA load (``JOINT``, the
   default: a 3-D descriptor over gate_up viewed as [E * 2, F, D]; else two loads from [E * 2F, D]),
   multiplies in float32, and writes only h = act(gate) * up (no [S, 2F] product is written).
2. ``_down_tma_kernel``: h's rows (TMA) times the expert's down tile (TMA). ``ATOMIC=False`` writes the rows
   in sorted order for :func:`~ffnkit.kernels.moe_stream.combine_rows` (deterministic); ``ATOMIC=True``
   scales each row by its router weight and adds it into a float32 output with atomics (no [S, D]
   intermediate; the summation order of a token's K rows then varies from run to run).

Why by hand: torch's grouped GEMM (CUTLASS) cannot gather its input rows or fuse the activation, and the
stream kernels around it (permute, act, combine) cost 20-25% of a prefill at 4,096 tokens
(benchmarks/results/moe_prefill_sweep_h200.json). The row block -> expert lookup is the one of the
``sorted`` route (a cumulative sum over the per-expert counts in registers: no host sync, capturable).

Tiles must divide the shapes (F and D by the gate/up kernel's BLOCK_N and BLOCK_K, D and F by the down
kernel's); :func:`tma_supported` says whether a call fits, and the executor falls back to the other routes
otherwise. Measured (benchmarks/moe_tma_sweep.py, H200, OLMoE shapes): the route beats torch's grouped GEMMs
with ffnkit's stream kernels from 1,024 tokens, but its GEMMs run at 68-76% of the dense cuBLAS rate, so a
prefill stays 1.5-1.7x its compute floor (README, "Mixture of experts").

Example:
    >>> import torch  # doctest: +SKIP
    >>> from ffnkit.kernels.moe_tma import tma_experts
    >>> y = tma_experts(x, gate_up, down, idx, w)  # doctest: +SKIP
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ffnkit.kernels.moe_stream import combine_rows, expert_of_block, scatter_rows, sort_by_expert
from ffnkit.kernels.triton_sparse_ffn import ACT_CODES, apply_act

# Launch parameters (GROUP_M: row blocks whose column tiles are interleaved, so that the programs running
# together share an expert's weight tiles in L2; FLATTEN: Triton pipelines across tile boundaries).
TMA_CONFIGS: dict[str, dict[str, object]] = {
    # the fastest summed over 4,096 and 16,384 tokens of the candidates in three sweeps on an H200
    # (benchmarks/results/moe_tma_sweep_h200*.json): 128 x (gate 128 + up 128) x 64 tiles with one joint
    # weight load, gathered x rows; the down GEMM 128 x 256 x 64 with a flattened persistent loop
    "gate_up": {
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "GROUP_M": 4,
        "num_warps": 8,
        "num_stages": 4,
        "FLATTEN": False,
        "GATHER": True,
        "JOINT": True,
    },  # fmt: skip
    "down": {
        "BLOCK_M": 128,
        "BLOCK_N": 256,
        "BLOCK_K": 64,
        "GROUP_M": 4,
        "num_warps": 8,
        "num_stages": 3,
        "FLATTEN": True,
        "ATOMIC": False,
    },  # fmt: skip
}


@triton.jit
def _tile_rows(tile, counts_ptr, E, N_TILES_N, TOTAL_M, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
               E_PAD: tl.constexpr):  # fmt: skip
    """(expert, first sorted row, end row of that expert, column tile) of persistent tile ``tile``."""
    per_group = GROUP_M * N_TILES_N
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(TOTAL_M - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    e, row0, row_stop, _ = expert_of_block(pid_m, counts_ptr, E, BLOCK_M, E_PAD)
    # TMA coordinates are int32 (the counts are int64)
    return e.to(tl.int32), row0.to(tl.int32), row_stop.to(tl.int32), pid_n


@triton.jit
def _total_row_blocks(counts_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    oe = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + oe, mask=oe < E, other=0).to(tl.int32)
    return tl.sum((cnt + BLOCK_M - 1) // BLOCK_M, axis=0)


@triton.jit
def _gate_up_tma_kernel(x_ptr, xs_desc, w_desc, order_ptr, counts_ptr, h_ptr, E, F, D, K: tl.constexpr,
                        ACT: tl.constexpr, E_PAD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        NUM_SMS, FLATTEN: tl.constexpr, GATHER: tl.constexpr,
                        JOINT: tl.constexpr):  # fmt: skip
    """h[r, n] = act(x[tok r] . gate_e[n]) * (x[tok r] . up_e[n]) over persistent [BLOCK_M, BLOCK_N] tiles.

    ``JOINT``: ``w_desc`` is 3-D over gate_up viewed as [E * 2, F, D] and one TMA load brings the gate and
    the up tile together ([2, BN, BK]), multiplied in one [BM, 2 BN] product (one wide MMA instead of two
    that each read the x tile again); the accumulator's two halves are split for the epilogue.
    """
    n_tiles_n = F // BLOCK_N
    total_m = _total_row_blocks(counts_ptr, E, BLOCK_M, E_PAD)
    ok = tl.arange(0, BLOCK_K)
    on = tl.arange(0, BLOCK_N)
    for tile in tl.range(tl.program_id(0), total_m * n_tiles_n, NUM_SMS, flatten=FLATTEN):
        e, row0, row_stop, pid_n = _tile_rows(
            tile, counts_ptr, E, n_tiles_n, total_m, GROUP_M, BLOCK_M, E_PAD
        )
        rows = row0 + tl.arange(0, BLOCK_M)  # [BM] sorted positions
        mr = rows < row_stop
        # rows past the expert's end read token 0 (a valid row) and are never stored
        tok = tl.load(order_ptr + rows, mask=mr, other=0) // K  # [BM]
        a_ptrs = x_ptr + tok[:, None].to(tl.int64) * D + ok[None, :]  # [BM, BK]
        w_row = e * 2 * F + pid_n * BLOCK_N
        if JOINT:
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                if GATHER:
                    a = tl.load(a_ptrs + k0)
                else:
                    a = xs_desc.load([row0, k0])
                wgu = tl.reshape(w_desc.load([2 * e, pid_n * BLOCK_N, k0]), [2 * BLOCK_N, BLOCK_K])
                if IEEE:
                    acc = tl.dot(a, wgu.T, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, wgu.T, acc)
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))
        else:
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                if GATHER:
                    a = tl.load(a_ptrs + k0)
                else:
                    a = xs_desc.load([row0, k0])
                wg = w_desc.load([w_row, k0])  # [BN, BK]
                wu = w_desc.load([w_row + F, k0])
                if IEEE:
                    acc_g = tl.dot(a, wg.T, acc_g, input_precision="ieee")
                    acc_u = tl.dot(a, wu.T, acc_u, input_precision="ieee")
                else:
                    acc_g = tl.dot(a, wg.T, acc_g)
                    acc_u = tl.dot(a, wu.T, acc_u)
        h = apply_act(acc_g, ACT) * acc_u
        out = h_ptr + rows[:, None].to(tl.int64) * F + (pid_n * BLOCK_N + on)[None, :]
        tl.store(out, h.to(h_ptr.dtype.element_ty), mask=mr[:, None])


@triton.jit
def _down_tma_kernel(h_desc, w_desc, order_ptr, wt_ptr, counts_ptr, y_ptr, E, F, D, K: tl.constexpr,
                     E_PAD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS,
                     FLATTEN: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    """y[r, n] = h[r] . down_e[n] (sorted rows), or out[tok r, n] += w[r] * that with ``ATOMIC``."""
    n_tiles_n = D // BLOCK_N
    total_m = _total_row_blocks(counts_ptr, E, BLOCK_M, E_PAD)
    on = tl.arange(0, BLOCK_N)
    for tile in tl.range(tl.program_id(0), total_m * n_tiles_n, NUM_SMS, flatten=FLATTEN):
        e, row0, row_stop, pid_n = _tile_rows(
            tile, counts_ptr, E, n_tiles_n, total_m, GROUP_M, BLOCK_M, E_PAD
        )
        rows = row0 + tl.arange(0, BLOCK_M)
        mr = rows < row_stop
        w_row = e * D + pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            a = h_desc.load([row0, k0])  # [BM, BK]; rows of the next expert or past S are never stored
            b = w_desc.load([w_row, k0])  # [BN, BK]
            if IEEE:
                acc = tl.dot(a, b.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
        cols = (pid_n * BLOCK_N + on)[None, :]
        if ATOMIC:
            pair = tl.load(order_ptr + rows, mask=mr, other=0)  # [BM]
            wt = tl.load(wt_ptr + pair, mask=mr, other=0.0).to(tl.float32)
            dest = y_ptr + (pair // K)[:, None].to(tl.int64) * D + cols
            tl.atomic_add(dest, acc * wt[:, None], mask=mr[:, None], sem="relaxed")
        else:
            out = y_ptr + rows[:, None].to(tl.int64) * D + cols
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mr[:, None])


# --------------------------------------------------------------------------------------------- host side


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_supported(x: Tensor, gate_up: Tensor, configs: dict | None = None) -> bool:
    """True when the ``tma`` route runs this call: a CUDA device of compute capability >= 9.0, bf16 or fp16,
    and tiles that divide the expert shapes.

    Example:
        >>> tma_supported(torch.zeros(1, 8), torch.zeros(2, 16, 8))
        False
    """
    c = configs or TMA_CONFIGS
    _, f2, d = gate_up.shape
    f = f2 // 2
    fits = (
        f % c["gate_up"]["BLOCK_N"] == 0
        and d % c["gate_up"]["BLOCK_K"] == 0
        and d % c["down"]["BLOCK_N"] == 0
        and f % c["down"]["BLOCK_K"] == 0
    )
    return bool(
        fits
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def _meta(c: dict) -> dict:
    return {k: v for k, v in c.items() if k not in ("GATHER", "ATOMIC", "JOINT", "PERSISTENT")}


def _common(x: Tensor, e: int, s: int, n_tiles_n: int, cfg: dict, num_sms: int | None) -> dict:
    """Shared launch arguments; ``PERSISTENT=False`` launches one program per possible tile instead."""
    if cfg.get("PERSISTENT", True):
        sms = num_sms or _num_sms(x.device.index or 0)
    else:
        sms = (triton.cdiv(s, cfg["BLOCK_M"]) + min(e, s)) * n_tiles_n  # at most one partial block per expert
    return dict(E_PAD=triton.next_power_of_2(e), IEEE=x.dtype == torch.float32, NUM_SMS=sms)


def launch_gate_up(
    x: Tensor, gate_up: Tensor, order: Tensor, counts: Tensor, k: int, act: str, cfg: dict,
    *, xs: Tensor | None = None, num_sms: int | None = None,
) -> Tensor:  # fmt: skip
    """h [S, F] (sorted rows) = act(x gate_e) * (x up_e): the first kernel alone (``xs``: the permuted copy
    of x that ``GATHER=False`` reads).

    Example:
        >>> h = launch_gate_up(x, gate_up, order, counts, 8, "silu", TMA_CONFIGS["gate_up"])  # doctest: +SKIP
    """
    e, f2, d = gate_up.shape
    gather = bool(cfg.get("GATHER", True))
    if not gather and xs is None:
        raise ValueError("GATHER=False reads the permuted rows: pass xs (moe_stream.scatter_rows)")
    src = x if gather else xs
    xs_desc = TensorDescriptor.from_tensor(src, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    joint = bool(cfg.get("JOINT", False))
    if joint:  # gate and up tiles in one load: [2, BN, BK] from [E * 2, F, D]
        w_desc = TensorDescriptor.from_tensor(
            gate_up.view(e * 2, f2 // 2, d), [2, cfg["BLOCK_N"], cfg["BLOCK_K"]]
        )
    else:
        w_desc = TensorDescriptor.from_tensor(gate_up.view(e * f2, d), [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    s = order.numel()
    h = x.new_empty(s, f2 // 2)  # [S, F] sorted order
    common = _common(x, e, s, f2 // 2 // cfg["BLOCK_N"], cfg, num_sms)
    _gate_up_tma_kernel[(common["NUM_SMS"],)](
        x, xs_desc, w_desc, order, counts, h, e, f2 // 2, d, K=k, ACT=ACT_CODES[act], GATHER=gather,
        JOINT=joint, **common, **_meta(cfg),
    )  # fmt: skip
    return h


def launch_down(
    h: Tensor, down: Tensor, order: Tensor, w: Tensor, counts: Tensor, k: int, cfg: dict,
    *, num_sms: int | None = None,
) -> Tensor:  # fmt: skip
    """The second kernel alone: y [S, D] in sorted order, or with ``ATOMIC`` the weighted sums [T, D] in
    float32 (``w`` [T, K] the router weights, read only then).

    Example:
        >>> y = launch_down(h, down, order, w, counts, 8, TMA_CONFIGS["down"])  # doctest: +SKIP
    """
    e, d, f = down.shape
    s = order.numel()
    h_desc = TensorDescriptor.from_tensor(h, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    d_desc = TensorDescriptor.from_tensor(down.view(e * d, f), [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    atomic = bool(cfg.get("ATOMIC", False))
    if atomic:
        y = torch.zeros(s // k, d, dtype=torch.float32, device=h.device)  # [T, D] float32 sums
    else:
        y = h.new_empty(s, d)  # [S, D] sorted order
    common = _common(h, e, s, d // cfg["BLOCK_N"], cfg, num_sms)
    meta = _meta(cfg)
    if atomic:  # the atomics' epilogue with a flattened loop needs 272 KB of shared memory (H200: 227 KB)
        meta["FLATTEN"] = False
    _down_tma_kernel[(common["NUM_SMS"],)](
        h_desc, d_desc, order, w.reshape(-1).contiguous(), counts, y, e, f, d, K=k, ATOMIC=atomic,
        **common, **meta,
    )  # fmt: skip
    return y


def tma_experts(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    idx: Tensor,
    w: Tensor,
    act: str = "silu",
    *,
    configs: dict | None = None,
    num_sms: int | None = None,
) -> Tensor:
    """Prefill route: counting sort, the persistent TMA gate/up GEMM (gather + activation fused), the
    persistent TMA down GEMM, then the combine (or atomics into float32 with ``ATOMIC``).

    ``configs`` replaces :data:`TMA_CONFIGS` (benchmarks sweep it); ``num_sms`` the number of persistent
    programs (default: the device's SM count; the Triton interpreter takes any).

    Example:
        >>> tma_experts(x, gate_up, down, idx, w)  # doctest: +SKIP
    """
    c = configs or TMA_CONFIGS
    e = gate_up.shape[0]
    k = idx.shape[1]
    order, pos, counts, _ = sort_by_expert(idx, e)
    xs = None if c["gate_up"].get("GATHER", True) else scatter_rows(x, pos, k)
    h = launch_gate_up(x, gate_up, order, counts, k, act, c["gate_up"], xs=xs, num_sms=num_sms)
    y = launch_down(h, down, order, w, counts, k, c["down"], num_sms=num_sms)
    if c["down"].get("ATOMIC", False):
        return y.to(x.dtype)
    return combine_rows(y, pos, idx, w, e)


__all__ = ["TMA_CONFIGS", "launch_down", "launch_gate_up", "tma_experts", "tma_supported"]
