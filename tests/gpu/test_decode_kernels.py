"""The decode benchmark's own kernels (``benchmarks/decode_kernels.py``) and the gather kernel's unreduced
partials, against eager formulations on fresh random inputs.

Tolerances: relative error of the output's norm 2e-2 in bfloat16 (probabilities and outputs rounded to bf16
once, as the eager formulations round them); in float32 1e-4 (sums in another order), 2e-3 for attention
(tl.dot multiplies float32 as TF32). Each kernel runs three times in a row: the
tickets and sums they re-arm must leave the next call exact. Skipped without CUDA and Triton.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ffnkit.kernels import gather_ffn, pack_ffn
from tests.gpu import NEEDS_CUDA_TRITON

pytestmark = NEEDS_CUDA_TRITON

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import decode_kernels as DK  # noqa: E402
from decode_kernels import attn_core_split, attn_core_triton, partials_add_rms_norm  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
ATTN_TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}  # tl.dot multiplies float32 as TF32


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _attention_oracle(qkv, cos, sin, k_cache, v_cache, pos: int, shape: dict):
    """Rotary, cache write, softmax attention over positions <= pos, in float32 (writes the caches)."""
    h, kvh, hd = shape["HEADS"], shape["KV_HEADS"], shape["HEAD_DIM"]
    qk = qkv[:, : (h + kvh) * hd].float().reshape(h + kvh, hd)
    qk = qk * cos.float() + torch.cat([-qk[:, hd // 2 :], qk[:, : hd // 2]], -1) * sin.float()
    k_cache[0, :, pos] = qk[h:].to(k_cache.dtype)
    v_cache[0, :, pos] = qkv[0, (h + kvh) * hd :].reshape(kvh, hd)
    q = qk[:h].reshape(kvh, h // kvh, hd).to(k_cache.dtype).float()
    k, v = k_cache[0, :, : pos + 1].float(), v_cache[0, :, : pos + 1].float()
    p = (q @ k.transpose(1, 2) * hd**-0.5).softmax(-1)  # [KV, G, pos + 1]
    return (p @ v).reshape(1, h * hd)


@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["triton", "split32", "split64"])
@pytest.mark.parametrize(
    "shape,length,positions",
    [
        ({"HEADS": 32, "KV_HEADS": 8, "HEAD_DIM": 128}, 200, [0, 1, 31, 32, 128, 199]),
        ({"HEADS": 6, "KV_HEADS": 2, "HEAD_DIM": 64}, 97, [0, 63, 64, 96]),
        ({"HEADS": 4, "KV_HEADS": 4, "HEAD_DIM": 32}, 40, [5, 39]),
    ],
)
def test_decode_attention_equals_softmax_attention(dtype, kernel, shape, length, positions):
    g = torch.Generator(device="cuda").manual_seed(len(positions))
    h, kvh, hd = shape["HEADS"], shape["KV_HEADS"], shape["HEAD_DIM"]
    caches = [torch.randn(1, kvh, length, hd, device="cuda", generator=g).to(dtype) for _ in range(2)]
    ours = [c.clone() for c in caches]
    for p in positions:  # consecutive calls on the same caches: each step's write is read by the next
        qkv = torch.randn(1, (h + 2 * kvh) * hd, device="cuda", generator=g).to(dtype)
        ang = torch.rand(1, hd // 2, device="cuda", generator=g) * 6.28
        cos, sin = (torch.cat([f(ang), f(ang)], -1).to(dtype) for f in (torch.cos, torch.sin))
        pos = torch.tensor([p], device="cuda")
        want = _attention_oracle(qkv, cos, sin, *caches, p, shape)
        if kernel == "triton":
            got = attn_core_triton(qkv, cos, sin, *ours, pos, shape)
        else:
            got = attn_core_split(qkv, cos, sin, *ours, pos, shape, block=int(kernel[5:]))
        assert _rel(got, want) < ATTN_TOL[dtype], (p, _rel(got, want))
        for mine, theirs in zip(ours, caches, strict=True):  # the cache write (rotary: float32 rounding)
            torch.testing.assert_close(mine[0, :, p], theirs[0, :, p])


@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,f,keep", [(4096, 14336, 7168), (96, 200, 37), (513, 1030, 1)])
def test_partials_sum_to_the_gather_output_and_fold_into_add_norm(dtype, d, f, keep):
    from ffnkit.kernels.triton_sparse_ffn import launch_fused_1  # Triton: only where the marks let it run

    g = torch.Generator(device="cuda").manual_seed(d)
    w_gate, w_up = (torch.randn(f, d, device="cuda", generator=g).to(dtype) / d**0.5 for _ in range(2))
    w_down = torch.randn(d, f, device="cuda", generator=g).to(dtype) / f**0.5
    packed = pack_ffn(w_gate, w_up, w_down)
    idx = torch.randperm(f, device="cuda", generator=g)[:keep].sort().values
    norm_w = (torch.rand(d, device="cuda", generator=g) + 0.5).to(dtype)
    for _ in range(3):
        x = torch.randn(1, d, device="cuda", generator=g).to(dtype)
        h = torch.randn(1, d, device="cuda", generator=g).to(dtype)
        want = gather_ffn(x, packed, idx, backend="reference")
        part = launch_fused_1(x, packed, idx, "silu", None, partials=True)  # [G, 1, D] float32
        assert part.dtype == torch.float32 and part.shape[1:] == (1, d)
        assert _rel(part.sum(0), want) < TOL[dtype]
        h_new, y = partials_add_rms_norm(part, h, norm_w, 1e-5)
        h_ref = h + part.sum(0).to(dtype)
        assert _rel(h_new, h_ref) < TOL[dtype]
        assert _rel(y, F.rms_norm(h_ref.float(), (d,), norm_w.float(), 1e-5)) < TOL[dtype]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm90+"
)
def test_programmatic_dependent_launch_changes_no_bit_in_a_cuda_graph():
    """A chain of the decode kernels (add + norm, GEMV, gather kernel + reduce, TEAL's kernels, attention),
    four layers deep, captured once with plain launches and once with PDL: the replays give the same bits."""
    import ffnkit.kernels.triton_sparse_ffn as T
    import ffnkit.kernels.triton_teal as TT
    from ffnkit.kernels import gemv, programmatic_launch

    g = torch.Generator(device="cuda").manual_seed(0)
    d, f, dt = 512, 1408, torch.bfloat16
    shape = {"HEADS": 4, "KV_HEADS": 1, "HEAD_DIM": 128}
    w_qkv = (torch.randn(6 * 128, d, device="cuda", generator=g) / d**0.5).to(dt)
    w_o = (torch.randn(d, d, device="cuda", generator=g) / d**0.5).to(dt)
    packed = pack_ffn(
        torch.randn(f, d, device="cuda", generator=g).to(dt) / d**0.5,
        torch.randn(f, d, device="cuda", generator=g).to(dt) / d**0.5,
        torch.randn(d, f, device="cuda", generator=g).to(dt) / f**0.5,
    )
    idx = torch.randperm(f, device="cuda", generator=g)[: f // 2].sort().values
    gate_up_t = torch.cat([packed[:, 0].T, packed[:, 1].T], 1).contiguous()  # [d, 2f]
    down_t = packed[:, 2].contiguous()  # [f, d]
    norm_w = (torch.rand(d, device="cuda", generator=g) + 0.5).to(dt)
    cos, sin = torch.ones(1, 128, device="cuda", dtype=dt), torch.zeros(1, 128, device="cuda", dtype=dt)
    h0 = torch.randn(1, d, device="cuda", generator=g).to(dt)
    caches = [torch.randn(1, 1, 64, 128, device="cuda", generator=g).to(dt) for _ in range(2)]
    pos = torch.tensor([40], device="cuda")

    def step(kv):
        h, delta = h0, torch.zeros_like(h0)
        for _ in range(4):
            h, a = DK.add_rms_norm(h, delta, norm_w)
            o = DK.attn_core_split(gemv(a, w_qkv), cos, sin, *kv, pos, shape, block=32)
            h, a = DK.add_rms_norm(h, gemv(o, w_o), norm_w)
            delta = T.gather_ffn(a, packed, idx) + TT.teal_ffn(a, gate_up_t, down_t, 0.5, 0.05)
        return h + delta

    outs = []
    for on, prefetch in ((False, False), (True, False), (True, True)):  # the gather list is fixed here
        with programmatic_launch(on, prefetch_active=prefetch):
            kv = [c.clone() for c in caches]
            step(kv)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(kv)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        outs.append(out.clone())
    assert not T.LAUNCH["pdl"] and not T.LAUNCH["prefetch_active"]  # the block restores the defaults
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.isfinite(outs[0].float()).all()


@pytest.mark.parametrize("n", [7, 1000, 1025, 128256])
def test_triton_argmax_is_the_first_largest_logit(n):
    g = torch.Generator(device="cuda").manual_seed(n)
    for _ in range(3):  # the ticket is re-armed for the next call
        x = torch.randn(1, n, device="cuda", generator=g).to(torch.bfloat16)
        assert torch.equal(DK.argmax(x), x.argmax(-1))
    x[0, n // 3] = x[0, n // 2] = 100.0  # a tie: the first index, as torch.argmax
    assert int(DK.argmax(x)) == n // 3


@pytest.mark.parametrize("d", [96, 4096, 5000])
def test_triton_add_rms_norm_equals_the_eager_one(d):
    g = torch.Generator(device="cuda").manual_seed(d)
    h, delta = (torch.randn(1, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    w = (torch.rand(d, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    h_new, y = DK.add_rms_norm(h, delta, w)
    assert torch.equal(h_new, h + delta)
    assert _rel(y, F.rms_norm((h + delta).float(), (d,), w.float(), 1e-5)) < TOL[torch.bfloat16]
