"""The CPU quantised-matmul kernels equal dequantise-then-matmul (an oracle written here in float64), and
QuantizedLinear dispatches to them without changing what it stores."""

from __future__ import annotations

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels import cpu_quant, use_backend
from ffnkit.kernels.quant_matmul import check_ints, pack_quant, quant_linear
from ffnkit.modules.quantized import QuantizedLinear

needs_c = pytest.mark.skipif(cpu_quant.quant_library() is None, reason="no C++ compiler for the CPU kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # x and biases: the same inputs on every run


def ints(out: int, n: int, bits: int, g: int, asym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(lo, hi, (out, n), generator=gen, dtype=torch.int8)
    scale = torch.rand(out, n // g, generator=gen) * 0.02 + 0.005
    zp = torch.randint(lo, hi, (out, n // g), generator=gen, dtype=torch.int8) if asym else None
    return q, scale, zp


def oracle(x, q, scale, zp, bias=None):
    """y = x · Wᵀ (+ b) in float64 with W = (q - z) · s expanded over each group."""
    g = q.shape[1] // scale.shape[1]
    z = 0 if zp is None else zp.double().repeat_interleave(g, 1)
    w = (q.double() - z) * scale.double().repeat_interleave(g, 1)  # [out, in]
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@needs_c
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("g", [16, 32, 64, 128])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("batch", [1, 3, 4, 9])
def test_cpu_kernel_equals_dequantise_then_matmul(bits, g, asym, batch):
    out, n = 40, 128
    q, scale, zp = ints(out, n, bits, g, asym)
    pack = pack_quant(q, scale, zp, bits=bits, backend="cpu")
    assert pack.path == ("cpu_int4" if bits <= 4 else "cpu_int8")
    x = torch.randn(batch, n)
    y = quant_linear(x, pack)
    ref = oracle(x, q, scale, zp)
    assert y.shape == (batch, out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_c
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_low_precision_activations(dtype):
    q, scale, zp = ints(24, 64, 4, 32, True)
    pack = pack_quant(q, scale.to(dtype), zp, bits=4, dtype=dtype, backend="cpu")
    x = torch.randn(2, 5, 64, dtype=dtype)
    y = quant_linear(x, pack, bias=torch.ones(24, dtype=dtype))
    ref = oracle(x.reshape(10, 64), q, scale.to(dtype), zp, torch.ones(24))
    assert y.shape == (2, 5, 24) and y.dtype == dtype
    torch.testing.assert_close(y.reshape(10, 24).double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@needs_c
def test_group_sizes_pick_the_path_that_fits():
    q, scale, zp = ints(8, 48, 4, 8, True)  # 4 bits, groups of 8: the int8 loop
    pack = pack_quant(q, scale, zp, bits=4, backend="cpu")
    assert pack.path == "cpu_int8"
    x = torch.randn(2, 48)
    torch.testing.assert_close(quant_linear(x, pack).double(), oracle(x, q, scale, zp), rtol=1e-5, atol=1e-5)
    q, scale, zp = ints(8, 48, 4, 12, False)  # groups of 12: no C loop fits
    pack = pack_quant(q, scale, zp, bits=4, backend="cpu")
    assert pack.path == "reference" and "group size 12" in pack.note
    torch.testing.assert_close(quant_linear(x, pack).double(), oracle(x, q, scale, zp), rtol=1e-5, atol=1e-5)


def test_without_the_c_library_the_cpu_backend_packs_for_reference(monkeypatch):
    monkeypatch.setattr(cpu_quant, "quant_library", lambda: None)
    q, scale, zp = ints(8, 32, 4, 16, True)
    pack = pack_quant(q, scale, zp, bits=4, backend="cpu")
    assert pack.path == "reference" and "unavailable" in pack.note
    x = torch.randn(1, 32)
    torch.testing.assert_close(quant_linear(x, pack).double(), oracle(x, q, scale, zp), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_one_line_errors():
    q, scale, _ = ints(8, 32, 4, 16, False)
    with pytest.raises(InvalidArgumentError, match="int8"):
        check_ints(q.to(torch.int32), scale, None, 4)
    with pytest.raises(InvalidArgumentError, match="groups"):
        check_ints(q, torch.ones(8, 3), None, 4)
    with pytest.raises(InvalidArgumentError, match="needs CUDA"):
        pack_quant(q, scale, None, bits=4, backend="triton")
    with pytest.raises(InvalidArgumentError, match="features"):
        quant_linear(torch.randn(1, 31), pack_quant(q, scale, None, bits=4))


@needs_c
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_dispatches_and_matches_the_reference_backend(bits):
    q, scale, zp = ints(48, 128, bits, 64, True)
    mod = QuantizedLinear.from_ints(q, scale, zp, torch.randn(48), bits=bits)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        y = mod(x)
        with use_backend("reference"):
            ref = mod(x)
    assert mod.kernel_pack("cpu", torch.float32).path == ("cpu_int4" if bits == 4 else "cpu_int8")
    tol = 1e-5 * ref.abs().max().item()  # float32 sums of 128 products, in another order
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=tol)
    torch.testing.assert_close(y.double(), oracle(x, q, scale, zp, mod.bias), rtol=1e-5, atol=tol)


def test_gradients_take_the_reference_path():
    q, scale, zp = ints(16, 64, 4, 32, True)
    mod = QuantizedLinear.from_ints(q, scale, zp, None, bits=4)
    x = torch.randn(2, 64, requires_grad=True)
    mod(x).sum().backward()  # the kernels have no backward: this must not go through them
    w = (q.double() - zp.double().repeat_interleave(32, 1)) * scale.double().repeat_interleave(32, 1)
    torch.testing.assert_close(x.grad.double(), w.sum(0).expand(2, 64), rtol=1e-5, atol=1e-5)
    assert "_kernel_packs" not in mod.__dict__


@needs_c
def test_repacked_copy_follows_loaded_weights_and_is_not_saved():
    a = QuantizedLinear.from_ints(*ints(32, 64, 4, 32, True, seed=1), None, bits=4)
    b = QuantizedLinear.from_ints(*ints(32, 64, 4, 32, True, seed=2), None, bits=4)
    keys = set(a.state_dict())
    x = torch.randn(1, 64)
    with torch.no_grad():
        before = a(x)
        a.load_state_dict(b.state_dict())  # fills the buffers in place, as ffnkit.load does
        after = a(x)
    assert set(a.state_dict()) == keys  # the cache is no buffer: the saved format is unchanged
    assert not torch.equal(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after, b(x))
    a.clear_kernel_cache()
    assert "_kernel_packs" not in a.__dict__


@needs_c
@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_prefill_dequantises_bit_for_bit_like_the_reference(bits, asym):
    """From DEQUANT_ROWS rows on, the C dequantisation + BLAS gives the reference backend's output exactly."""
    q, scale, zp = ints(40, 128, bits, 32, asym)
    mod = QuantizedLinear.from_ints(q, scale, zp, torch.randn(40), bits=bits)
    x = torch.randn(2, cpu_quant.DEQUANT_ROWS, 128)
    with torch.no_grad():
        y = mod(x)
        with use_backend("reference"):
            ref = mod(x)
    assert torch.equal(y, ref)


@needs_c
def test_modules_built_in_inference_mode_run_the_kernels():
    """Inference tensors have no version counter: the cache must still work for them."""
    q, scale, zp = ints(16, 64, 4, 32, True)
    with torch.inference_mode():
        mod = QuantizedLinear.from_ints(q, scale, zp, None, bits=4)
        x = torch.randn(1, 64)
        y = mod(x)
    assert mod.kernel_pack("cpu", torch.float32).path == "cpu_int4"
    torch.testing.assert_close(y.double(), oracle(x, q, scale, zp), rtol=1e-5, atol=1e-5)


def test_fused_ffn_has_no_cpu_path_and_falls_back_to_the_three_modules():
    from ffnkit.kernels.quant_matmul import pack_quant_ffn
    from ffnkit.modules.quantized import quantized_gated_ffn

    g = torch.Generator().manual_seed(0)

    def mod(out: int, n: int) -> QuantizedLinear:
        q = torch.randint(-8, 8, (out, n), generator=g, dtype=torch.int8)
        return QuantizedLinear.from_ints(q, torch.rand(out, n // 32, generator=g) * 0.05, None, None, bits=4)

    gate, up, down = mod(96, 64), mod(96, 64), mod(64, 96)
    assert pack_quant_ffn(gate.ints(), up.ints(), down.ints(), bits=4) is None
    x = torch.randn(1, 64, generator=g)
    with torch.no_grad():
        y = quantized_gated_ffn(x, gate, up, down, "relu")
        want = down(torch.relu(gate(x)) * up(x))
    torch.testing.assert_close(y, want, atol=0, rtol=0)
    with pytest.raises(InvalidArgumentError, match="bits must be"):
        pack_quant_ffn(gate.ints(), up.ints(), down.ints(), bits=9)
