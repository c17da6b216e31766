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
