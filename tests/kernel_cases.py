"""Shared cases for the kernel equality tests (tests/unit/test_kernels.py on CPU, tests/gpu on CUDA).

Every case draws fresh random weights and inputs, runs a kernel on the backend under test and on the
``reference`` backend (masked dense, float32), and compares by ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import torch

from ffnkit.kernels import (
    gather_ffn,
    pack_ffn,
    pack_teal,
    predicted_ffn,
    sparse_input_linear,
    teal_ffn,
    threshold_ffn,
)
from ffnkit.kernels import reference as ref

# Stated tolerances (relative Frobenius error against the float32 reference): float32 kernels accumulate in
# float32 in another order (~1e-7); bf16/fp16 results are rounded once to the output dtype (<= 2^-8 per
# element), batched GPU products also round h to the weight dtype before W_down.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 1e-2}
SHAPES = [(37, 29), (64, 48), (130, 257)]  # (d_ff, d_model): odd, small, and wider than one GPU tile
LEVELS = ("all", "half", "ninety", "one", "none")  # share of neurons in idx: 100%, 50%, 10%, 1 neuron, none
ACTS = ("silu", "gelu", "gelu_tanh", "relu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.float().norm() == 0:
        return float(a.float().norm())
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_ffn(f: int, d: int, dtype: torch.dtype, device: str, seed: int):
    """Fresh random gated FFN (W_gate, W_up [F, D], W_down [D, F]) scaled like a trained layer, packed."""
    g = torch.Generator().manual_seed(seed)
    wg = torch.randn(f, d, generator=g) / d**0.5
    wu = torch.randn(f, d, generator=g) / d**0.5
    wd = torch.randn(d, f, generator=g) / f**0.5
    ws = tuple(w.to(device=device, dtype=dtype) for w in (wg, wu, wd))
    return ws, pack_ffn(*ws)


def make_x(rows: int, d: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def make_idx(level: str, f: int, device: str, seed: int) -> torch.Tensor:
    perm = torch.randperm(f, generator=torch.Generator().manual_seed(seed))
    k = {"all": f, "half": f // 2, "ninety": max(1, f // 10), "one": 1, "none": 0}[level]
    return perm[:k].to(device)


def midpoint_threshold(values: torch.Tensor, keep: int) -> float:
    """A threshold keeping exactly ``keep`` of ``values`` (distinct), halfway between two neighbours so a
    rounding difference between kernel and reference cannot flip an entry."""
    if keep >= values.numel():
        return 0.0
    if keep <= 0:
        return float(values.max()) * 2 + 1.0
    top = values.double().flatten().topk(keep + 1).values
    return float((top[keep - 1] + top[keep]) / 2)


def cats_threshold(x: torch.Tensor, packed: torch.Tensor, share_kept: float, act: str) -> float:
    a = ref.activation(act, x.double() @ packed[:, 0].double().T).abs()  # [N, F]
    return midpoint_threshold(a.flatten(), round(share_kept * a.numel()))


def input_threshold(x: torch.Tensor, share_kept: float) -> float:
    return midpoint_threshold(x.double().abs().flatten(), round(share_kept * x.numel()))


def check_gather(backend: str, f: int, d: int, rows: int, level: str, dtype, device: str, act="silu", seed=0):
    _, packed = make_ffn(f, d, dtype, device, seed)
    x = make_x(rows, d, dtype, device, seed + 1)
    idx = make_idx(level, f, device, seed + 2)
    out = gather_ffn(x, packed, idx, act=act, backend=backend)
    expect = gather_ffn(x, packed, idx, act=act, backend="reference")
    assert out.shape == x.shape and out.dtype == x.dtype
    if level == "none":
        assert torch.count_nonzero(out) == 0
    return rel_err(out, expect)


def check_scaled_union(backend: str, f: int, d: int, rows: int, dtype, device: str, seed=0) -> float:
    """Per-row active sets through ``scale`` equal each row computed alone on its own set (an oracle that
    shares nothing with the union path)."""
    _, packed = make_ffn(f, d, dtype, device, seed)
    x = make_x(rows, d, dtype, device, seed + 1)
    g = torch.Generator().manual_seed(seed + 3)
    masks = torch.rand(rows, f, generator=g) < 0.3  # [N, F]
    union = masks.any(0).nonzero().flatten()
    scale = masks[:, union].float().to(device)  # [N, K]
    out = gather_ffn(x, packed, union.to(device), scale=scale, backend=backend)
    alone = torch.cat(
        [
            gather_ffn(x[n : n + 1], packed, masks[n].nonzero().flatten().to(device), backend="reference")
            for n in range(rows)
        ]
    )
    return rel_err(out, alone)


def check_predicted(
    backend: str, f: int, d: int, rows: int, share_kept: float, dtype, device: str, act="silu", rank=5, seed=0
) -> float:
    """Deja Vu's scored FFN against an oracle that shares nothing with it: the scores in float64, the
    threshold halfway between two scores (no rounding flips a neuron), then each row alone through the
    reference gather over its own kept neurons."""
    _, packed = make_ffn(f, d, dtype, device, seed)
    x = make_x(rows, d, dtype, device, seed + 1)
    g = torch.Generator().manual_seed(seed + 4)
    z = torch.randn(rows, rank, generator=g)
    pb, bias = torch.randn(f, rank, generator=g), torch.randn(f, generator=g)
    scores = z.double() @ pb.double().T + bias.double()  # [N, F]
    t = midpoint_threshold(scores.flatten(), round(share_kept * scores.numel()))
    if share_kept >= 1.0:
        t = float(scores.min()) - 1.0
    out = predicted_ffn(x, packed, z.to(device), pb.to(device), bias.to(device), t, act=act, backend=backend)
    keep = scores > t
    alone = torch.cat(
        [
            gather_ffn(
                x[n : n + 1], packed, keep[n].nonzero().flatten().to(device), act=act, backend="reference"
            )
            for n in range(rows)
        ]
    )
    assert out.shape == x.shape and out.dtype == x.dtype
    if share_kept == 0.0:
        assert torch.count_nonzero(out) == 0
    return rel_err(out, alone)


def check_threshold(
    backend: str, f: int, d: int, rows: int, share_kept: float, dtype, device: str, act="silu", seed=0
):
    _, packed = make_ffn(f, d, dtype, device, seed)
    x = make_x(rows, d, dtype, device, seed + 1)
    t = cats_threshold(x, packed, share_kept, act)
    out = threshold_ffn(x, packed, t, act=act, backend=backend)
    return rel_err(out, threshold_ffn(x, packed, t, act=act, backend="reference"))


def check_input_linear(
    backend: str, n_in: int, n_out: int, rows: int, share_kept: float, dtype, device: str, seed=0
):
    w_t = make_x(n_in, n_out, dtype, device, seed)  # [in, out]
    x = make_x(rows, n_in, dtype, device, seed + 1)
    t = input_threshold(x, share_kept)
    out = sparse_input_linear(x, w_t, t, backend=backend)
    assert out.shape == (rows, n_out) and out.dtype == dtype
    return rel_err(out, sparse_input_linear(x, w_t, t, backend="reference"))


def check_teal(
    backend: str, f: int, d: int, rows: int, share_kept: float, dtype, device: str, seed=0
) -> float:
    (wg, wu, wd), _ = make_ffn(f, d, dtype, device, seed)
    weights = pack_teal(wg, wu, wd)
    x = make_x(rows, d, dtype, device, seed + 1)
    t_in = input_threshold(x, share_kept)
    xs = torch.where(x.double().abs() >= t_in, x.double(), 0.0)
    gu = xs @ weights.gate_up_t.double()
    h = ref.activation("silu", gu[:, :f]) * gu[:, f:]
    t_mid = midpoint_threshold(h.abs().flatten(), round(share_kept * h.numel()))
    out = teal_ffn(x, weights, t_in, t_mid, backend=backend)
    expect = ref.teal_ffn(x, weights.gate_up_t, weights.down_t, t_in, t_mid)
    return rel_err(out, expect)


def random_thresholds(values: torch.Tensor, seed: int) -> torch.Tensor:
    """One threshold per column of ``values`` [N, C]: uniform in [0, 2 x the column's mean |value|], so
    each column keeps a different share (from none to all)."""
    g = torch.Generator().manual_seed(seed)
    scale = values.double().abs().mean(0).cpu()  # [C]
    return (torch.rand(scale.shape, generator=g, dtype=torch.float64) * 2 * scale).float()


def check_threshold_per_neuron(
    backend: str, f: int, d: int, rows: int, dtype, device: str, act="silu", seed=0
) -> float:
    """CATS with one threshold per neuron against an oracle built here: the dense FFN in float64 with
    neuron i zeroed in row n where |act(gate)[n, i]| <= t_i."""
    (wg, wu, wd), packed = make_ffn(f, d, dtype, device, seed)
    x = make_x(rows, d, dtype, device, seed + 1)
    a = ref.activation(act, x.double() @ wg.double().T)  # [N, F]
    t = random_thresholds(a, seed + 2).to(device)  # [F]
    h = torch.where(a.abs() > t.double(), a * (x.double() @ wu.double().T), 0.0)
    expect = h @ wd.double().T
    out = threshold_ffn(x, packed, t, act=act, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    return rel_err(out, expect)


def check_teal_per_channel(backend: str, f: int, d: int, rows: int, dtype, device: str, seed=0) -> float:
    """TEAL with one threshold per input channel and per intermediate neuron against a float64 oracle."""
    (wg, wu, wd), _ = make_ffn(f, d, dtype, device, seed)
    weights = pack_teal(wg, wu, wd)
    x = make_x(rows, d, dtype, device, seed + 1)
    t_in = random_thresholds(x, seed + 2).to(device)  # [D]
    xs = torch.where(x.double().abs() >= t_in.double(), x.double(), 0.0)
    h = ref.activation("silu", xs @ wg.double().T) * (xs @ wu.double().T)  # [N, F]
    t_mid = random_thresholds(h, seed + 3).to(device)  # [F]
    expect = torch.where(h.abs() >= t_mid.double(), h, 0.0) @ wd.double().T
    out = teal_ffn(x, weights, t_in, t_mid, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    return rel_err(out, expect)
