"""The GPU quantised matmul (torch's int4 tinygemm behind the ``triton`` backend) equals dequantise-then-matmul.

Skipped where CUDA, Triton (the switch's GPU backend) or torch's int4 op is missing; run on the accelerator:
    python -m pytest -q tests/gpu/test_quant_kernels_gpu.py
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ffnkit.kernels import use_backend
from ffnkit.kernels.quant_matmul import dequant_linear, pack_quant, quant_linear
from ffnkit.modules.quantized import QuantizedLinear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available()
        or importlib.util.find_spec("triton") is None
        or not hasattr(torch.ops.aten, "_weight_int4pack_mm"),
        reason="needs a CUDA device, Triton and aten._weight_int4pack_mm",
    ),
]


def ints(out: int, n: int, bits: int, g: int, asym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(lo, hi, (out, n), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out, n // g, generator=gen) * 0.02 + 0.005).to(torch.bfloat16)
    zp = torch.randint(lo, hi, (out, n // g), generator=gen, dtype=torch.int8) if asym else None
    return q.cuda(), scale.cuda(), None if zp is None else zp.cuda()


def oracle(x, q, scale, zp):
    """float32 product of the bf16 activations and the weights dequantised in float32."""
    return dequant_linear(x.float(), q, scale.float(), zp)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_tinygemm_equals_dequantise_then_matmul(bits, g, asym, batch):
    out, n = 264, 1024
    q, scale, zp = ints(out, n, bits, g, asym)
    pack = pack_quant(q, scale, zp, bits=bits, dtype=torch.bfloat16, backend="triton")
    assert pack.path == "tinygemm", pack.note
    x = torch.randn(batch, n, device="cuda", dtype=torch.bfloat16)
    y = quant_linear(x, pack)
    ref = oracle(x, q, scale, zp)
    assert y.shape == (batch, out) and y.dtype == torch.bfloat16
    # bf16 output and bf16 zero*scale terms: 1% of the largest output bounds every element's error
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 1e-2, err


def test_shapes_tinygemm_cannot_take_fall_back_to_the_reference():
    q, scale, zp = ints(64, 96, 8, 32, True)
    pack = pack_quant(q, scale, zp, bits=8, backend="triton")
    assert pack.path == "reference" and "8-bit" in pack.note
    q4, s4, _ = ints(64, 96, 4, 48, False)
    assert "group size 48" in pack_quant(q4, s4, None, bits=4, backend="triton").note
    x = torch.randn(3, 96, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(quant_linear(x, pack), dequant_linear(x, q, scale, zp))


@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_runs_tinygemm_on_cuda_and_matches_reference(bias):
    q, scale, zp = ints(512, 768, 4, 64, True)
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16) if bias else None
    mod = QuantizedLinear.from_ints(q, scale, zp, b, bits=4)
    x = torch.randn(2, 7, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = mod(x)
        with use_backend("reference"):
            ref = mod(x)
    assert mod.kernel_pack("triton", torch.bfloat16).path == "tinygemm"
    assert y.shape == ref.shape == (2, 7, 512)
    err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 1e-2, err


def test_repacked_copy_follows_loaded_weights():
    """Loading fills the buffers in place: the cached tinygemm copy must be rebuilt, not reused."""
    q, scale, zp = ints(256, 512, 4, 64, True, seed=1)
    mod = QuantizedLinear.from_ints(q, scale, zp, None, bits=4)
    other = QuantizedLinear.from_ints(*ints(256, 512, 4, 64, True, seed=2), None, bits=4)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = mod(x)
        mod.load_state_dict(other.state_dict())
        after, want = mod(x), other(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, want)


# ------------------------------------------------------------------- the fused int4 FFN (Triton, decode)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize(("rows", "f"), [(1, 14336), (3, 1000)])
def test_act_mul_equals_torch(act, rows, f):
    import torch.nn.functional as F

    from ffnkit.kernels.triton_quant import act_mul

    gu = torch.randn(rows, 2 * f, device="cuda", dtype=torch.bfloat16)
    a = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": torch.relu}[act]
    want = a(gu[:, :f].float()) * gu[:, f:].float()
    got = act_mul(gu, act)
    assert got.shape == (rows, f) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


def ffn_modules(d: int, f: int, g: int, asym: bool, seed: int):
    gate = QuantizedLinear.from_ints(*ints(f, d, 4, g, asym, seed=seed), None, bits=4)
    up = QuantizedLinear.from_ints(*ints(f, d, 4, g, asym, seed=seed + 1), None, bits=4)
    down = QuantizedLinear.from_ints(*ints(d, f, 4, g, asym, seed=seed + 2), None, bits=4)
    return gate, up, down


def ffn_oracle(x, gate, up, down, act="silu"):
    """float32 FFN on the dequantised weights (an oracle sharing nothing with the fused kernel)."""
    import torch.nn.functional as F

    def mat(m, v):
        q, s, z = m.ints()
        return dequant_linear(v, q, s.float(), z)

    a = {"silu": F.silu, "relu": torch.relu}[act]
    xf = x.float()
    return mat(down, a(mat(gate, xf)) * mat(up, xf))


@pytest.mark.parametrize("rows", [1, 4, 8, 9])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_quantized_gated_ffn_equals_dequantised_ffn(rows, asym, act):
    from ffnkit.modules.quantized import quantized_gated_ffn

    gate, up, down = ffn_modules(512, 1408, 64, asym, seed=rows)
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16) / 4
    with torch.no_grad():
        y = quantized_gated_ffn(x, gate, up, down, act)
    ref = ffn_oracle(x, gate, up, down, act)
    if rows <= 8:  # decode: the fused kernel ran (more rows: the three modules)
        assert gate.__dict__["_ffn_pack"][1] is not None
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, err


def test_quantized_gated_ffn_captures_in_a_cuda_graph_and_follows_new_weights():
    from ffnkit.modules.quantized import quantized_gated_ffn

    gate, up, down = ffn_modules(256, 704, 64, True, seed=7)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16) / 4
    with torch.no_grad():
        quantized_gated_ffn(x, gate, up, down)  # compile and pack outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = quantized_gated_ffn(x, gate, up, down)
        x.copy_(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16) / 4)
        graph.replay()
        torch.cuda.synchronize()
        ref = ffn_oracle(x, gate, up, down)
        assert (y.float() - ref).abs().max() / ref.abs().max() < 2e-2
        other = ffn_modules(256, 704, 64, True, seed=8)[0]
        gate.load_state_dict(other.state_dict())  # in place: the cached repack must follow
        y2 = quantized_gated_ffn(x, gate, up, down)
        ref2 = ffn_oracle(x, gate, up, down)
        assert (y2.float() - ref2).abs().max() / ref2.abs().max() < 2e-2
