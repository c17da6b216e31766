"""The ``triton`` backend equals the reference (masked dense, float32) on the same cases as the CPU tests.

Skipped where CUDA or Triton is missing (CI has no GPU); run on the accelerator machine:
    python -m pytest -q tests/gpu
"""

from __future__ import annotations

import pytest
import torch

from ffnkit.kernels import gather_ffn, resolve_backend, threshold_ffn
from tests import kernel_cases as kc
from tests.gpu import NEEDS_CUDA_TRITON

pytestmark = NEEDS_CUDA_TRITON

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("float32", "bfloat16", "float16")
SHAPES = [*kc.SHAPES, (1000, 512)]  # plus one that spans many neuron blocks and k slices


PATHS = ("split", "fused", "dot")  # the three ways a single row can go (CONFIGS["batch1"])


@pytest.fixture
def path(request, monkeypatch):
    """Route batch 1 through the given path (``request.param``) for the duration of a test."""
    import ffnkit.kernels.triton_sparse_ffn as T

    monkeypatch.setitem(T.CONFIGS, "batch1", {"path": request.param})
    return request.param


def test_auto_picks_triton_on_cuda():
    assert resolve_backend(torch.zeros(1, device="cuda")) == "triton"


ROWS_PATHS = [(1, p) for p in PATHS] + [(3, "split"), (16, "split"), (33, "split")]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("rows", "path"), ROWS_PATHS, indirect=["path"])
@pytest.mark.parametrize("level", kc.LEVELS)
def test_gather_ffn_equals_reference(dtype, shape, rows, path, level):
    err = kc.check_gather("triton", *shape, rows, level, dtype, "cuda", seed=rows + len(level))
    assert err <= kc.TOL[dtype], err


@pytest.mark.parametrize("act", kc.ACTS)
@pytest.mark.parametrize(
    ("rows", "path"), [(1, "fused"), (1, "dot"), (1, "split"), (4, "split")], indirect=["path"]
)
def test_gather_ffn_activations(act, rows, path):
    assert kc.check_gather("triton", 64, 48, rows, "half", torch.float32, "cuda", act=act) <= 1e-5


@pytest.mark.parametrize(
    ("rows", "path"), [(1, "fused"), (1, "dot"), (1, "split"), (5, "split")], indirect=["path"]
)
def test_gather_scale_equals_each_row_alone(rows, path):
    assert kc.check_scaled_union("triton", 70, 33, rows, torch.float32, "cuda", seed=rows) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("rows", "path"), [(1, "split"), (1, "dot"), (4, "split"), (16, "split")], indirect=["path"]
)
@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_threshold_ffn_equals_reference(dtype, rows, path, share_kept, act):
    err = kc.check_threshold("triton", 130, 257, rows, share_kept, dtype, "cuda", act=act)
    assert err <= kc.TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("rows", "path"), [(1, "split"), (1, "dot"), (3, "split"), (16, "split")], indirect=["path"]
)
@pytest.mark.parametrize("share_kept", [1.0, 0.6, 0.1, 0.0])
@pytest.mark.parametrize("shape", [(101, 67), (4096, 700)])
def test_sparse_input_linear_equals_reference(dtype, rows, path, share_kept, shape):
    err = kc.check_input_linear("triton", *shape, rows, share_kept, dtype, "cuda")
    assert err <= kc.TOL[dtype], err


@pytest.fixture(params=["default", "blocks", "loop", "loop_wide"])
def compact_blocks(request, monkeypatch):
    """TEAL's launch configs as shipped ("default"), or forced small for each product kernel ("blocks",
    "loop": many compaction blocks, shares of the kept rows and column blocks per product), or "loop" with
    two rows per step and wide column blocks ("loop_wide")."""
    import ffnkit.kernels.triton_teal as TT

    if request.param != "default":
        monkeypatch.setitem(TT.CONFIGS, "BLOCK_C", 16)
        monkeypatch.setitem(TT.CONFIGS, "MIN_C", 16)
        monkeypatch.setitem(TT.CONFIGS, "MAX_C", 32)
        monkeypatch.setattr(TT, "MAX_BLOCKS", 1024)
        cfg = {
            "KIND": request.param,
            "BLOCK_K": 16,
            "BLOCK_M": 16,
            "WAVES": 2,
            "num_warps": 4,
            "num_stages": 2,
        }
        if request.param == "loop_wide":
            cfg = {**cfg, "KIND": "loop", "BLOCK_K": 2, "BLOCK_M": 256, "WAVES": 1}
        for key in ("in_1", "out_1", "in_n", "out_n"):
            # tl.dot needs 16 rows per step
            monkeypatch.setitem(
                TT.CONFIGS, key, {**cfg, "BLOCK_K": max(cfg["BLOCK_K"], 16 * key.endswith("n"))}
            )
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 4, 33])
@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.2, 0.0])
@pytest.mark.parametrize("shape", [(90, 41), (1000, 512)])
def test_teal_ffn_equals_reference(dtype, rows, share_kept, shape, compact_blocks):
    assert kc.check_teal("triton", *shape, rows, share_kept, dtype, "cuda", seed=rows) <= kc.TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_teal_ffn_per_channel_equals_oracle(dtype, rows, compact_blocks):
    err = kc.check_teal_per_channel("triton", 301, 129, rows, dtype, "cuda", seed=rows)
    assert err <= kc.TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("rows", "path"), [(1, "split"), (1, "dot"), (4, "split")], indirect=["path"])
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_threshold_ffn_per_neuron_equals_oracle(dtype, rows, path, act):
    err = kc.check_threshold_per_neuron("triton", 301, 129, rows, dtype, "cuda", act=act, seed=rows)
    assert err <= kc.TOL[dtype], err


@pytest.mark.parametrize("rows", [1, 5])
def test_teal_ffn_zero_input_and_zero_threshold(rows, compact_blocks):
    """An all-zero input gives an all-zero output (nothing kept: no group is live); threshold 0 keeps every
    nonzero input and equals the dense FFN computed here in float64."""
    from ffnkit.kernels import pack_teal, teal_ffn

    (wg, wu, wd), _ = kc.make_ffn(333, 130, torch.float32, "cuda", seed=5)
    w = pack_teal(wg, wu, wd)
    zero = torch.zeros(rows, 130, device="cuda")
    assert torch.count_nonzero(teal_ffn(zero, w, 0.0, 0.0, backend="triton")) == 0
    x = kc.make_x(rows, 130, torch.float32, "cuda", seed=6)
    xd = x.double()
    dense = (torch.nn.functional.silu(xd @ wg.double().T) * (xd @ wu.double().T)) @ wd.double().T
    assert kc.rel_err(teal_ffn(x, w, 0.0, 0.0, backend="triton"), dense) <= 1e-5


def test_teal_and_input_linear_capture_in_a_cuda_graph():
    """TEAL keeps its counts on the device: the whole FFN and the linear replay in a CUDA graph, and a
    replay on new inputs (new kept sets) is still exact."""
    from ffnkit.kernels import pack_teal, sparse_input_linear, teal_ffn

    (wg, wu, wd), _ = kc.make_ffn(700, 256, torch.bfloat16, "cuda", seed=41)
    w = pack_teal(wg, wu, wd)
    x = kc.make_x(1, 256, torch.bfloat16, "cuda", seed=42)
    t_in, t_mid = 0.6, 0.05
    teal_ffn(x, w, t_in, t_mid, backend="triton")  # compile outside the capture
    sparse_input_linear(x, w.gate_up_t, t_in, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = teal_ffn(x, w, t_in, t_mid, backend="triton")
        lin = sparse_input_linear(x, w.gate_up_t, t_in, backend="triton")
    for seed in (43, 44):
        x.copy_(kc.make_x(1, 256, torch.bfloat16, "cuda", seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        expect = teal_ffn(x, w, t_in, t_mid, backend="reference")
        assert kc.rel_err(out, expect) <= kc.TOL[torch.bfloat16]
        expect_lin = sparse_input_linear(x, w.gate_up_t, t_in, backend="reference")
        assert kc.rel_err(lin, expect_lin) <= kc.TOL[torch.bfloat16]


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_sparsity_changes_the_output(path):
    _, packed = kc.make_ffn(40, 24, torch.float32, "cuda", seed=7)
    x = kc.make_x(1, 24, torch.float32, "cuda", seed=8)
    full = gather_ffn(x, packed, torch.arange(40, device="cuda"), backend="triton")
    half = gather_ffn(x, packed, torch.arange(20, device="cuda"), backend="triton")
    assert kc.rel_err(half, full) > 0.1
    assert kc.rel_err(threshold_ffn(x, packed, 0.2, backend="triton"), full) > 1e-3


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_every_output_is_written(path):
    """Repeated calls on fresh inputs agree with the reference each time (no stale or unwritten output)."""
    _, packed = kc.make_ffn(300, 200, torch.bfloat16, "cuda", seed=21)
    idx = torch.randperm(300, device="cuda")[:77].int()
    for seed in range(3):
        x = kc.make_x(1, 200, torch.bfloat16, "cuda", seed=100 + seed)
        out = gather_ffn(x, packed, idx, backend="triton")
        assert torch.isfinite(out).all()
        assert kc.rel_err(out, gather_ffn(x, packed, idx, backend="reference")) <= kc.TOL[torch.bfloat16]


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_graph_capture(path):
    """The kernels can be captured in a CUDA graph (how a decode loop would run them)."""
    _, packed = kc.make_ffn(256, 128, torch.bfloat16, "cuda", seed=31)
    x = kc.make_x(1, 128, torch.bfloat16, "cuda", seed=32)
    idx = torch.arange(0, 256, 3, device="cuda")
    expect = gather_ffn(x, packed, idx, backend="reference")
    gather_ffn(x, packed, idx, backend="triton")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_ffn(x, packed, idx, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert kc.rel_err(out, expect) <= kc.TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize(("shape", "rank"), [((130, 257), 5), ((1000, 512), 64), ((301, 129), 0)])
def test_predicted_ffn_equals_each_row_on_its_own_set(dtype, rows, share_kept, shape, rank):
    err = kc.check_predicted("triton", *shape, rows, share_kept, dtype, "cuda", rank=rank, seed=rows)
    assert err <= kc.TOL[dtype], err


@pytest.mark.parametrize("mode", ["predictor", "input"])
def test_sparse_ffn_module_decode_captures_in_a_cuda_graph(mode):
    """SparseFFN's one-token kernel path never syncs: it replays in a CUDA graph and follows new inputs
    exactly as its masked dense path does (the predictor's scores kept away from the threshold)."""
    from torch import nn

    from ffnkit.modules.sparse_ffn import SparseFFN, SparseSpec

    d, f, r = 256, 700, 16
    g = torch.Generator().manual_seed(51)
    mlp = nn.Module()
    for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
        lin = nn.Linear(shape[1], shape[0], bias=False)
        lin.weight.data = (torch.randn(*shape, generator=g) / shape[1] ** 0.5).to(torch.bfloat16)
        mlp.add_module(name, lin)
    spec = SparseSpec("up_proj", "gate_proj", "down_proj", None, act_kernel="silu", act_hf="silu")
    sparse = SparseFFN(mlp, spec, mode=mode, d_model=d, d_ff=f, rank=r).cuda()
    if mode == "predictor":
        sparse.pred_a.copy_(torch.randn(r, d, generator=g) / d**0.5)
        sparse.pred_b.copy_(torch.randn(f, r, generator=g))
        sparse.pred_bias.copy_(torch.randn(f, generator=g))
        sparse.t_mid.fill_(0.3)
    else:
        sparse.t_in.fill_(0.6)
        sparse.t_mid.fill_(0.02)
    x = kc.make_x(1, d, torch.bfloat16, "cuda", seed=52).view(1, 1, d)
    with torch.no_grad():
        sparse(x)  # compile and pack outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sparse(x)
        for seed in (53, 54):
            x.copy_(kc.make_x(1, d, torch.bfloat16, "cuda", seed=seed).view(1, 1, d))
            graph.replay()
            torch.cuda.synchronize()
            expect = sparse.masked_forward(x)
            assert kc.rel_err(out, expect) <= 3e-2, (seed, kc.rel_err(out, expect))
            assert kc.rel_err(out, sparse.masked_forward(x, masks=False)) > 1e-3  # it did skip neurons


@pytest.fixture
def atomic_reduce(monkeypatch):
    """Batch 1 sums its partials inside the fused kernel (CONFIGS["batch1"]["reduce"] = "atomic")."""
    import ffnkit.kernels.triton_sparse_ffn as T

    monkeypatch.setitem(T.CONFIGS, "batch1", {"path": "fused", "reduce": "atomic"})


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("level", kc.LEVELS)
def test_atomic_reduce_gather_equals_reference(dtype, shape, level, atomic_reduce):
    for seed in range(3):  # repeated calls: the sum and the ticket must be left at zero each time
        err = kc.check_gather("triton", *shape, 1, level, dtype, "cuda", seed=seed)
        assert err <= kc.TOL[dtype], (seed, err)


@pytest.mark.parametrize("share_kept", [1.0, 0.5, 0.0])
def test_atomic_reduce_predicted_equals_oracle(share_kept, atomic_reduce):
    for seed in range(2):
        err = kc.check_predicted(
            "triton", 1000, 512, 1, share_kept, torch.bfloat16, "cuda", rank=64, seed=seed
        )
        assert err <= kc.TOL[torch.bfloat16], (seed, err)


def test_atomic_reduce_replays_in_a_cuda_graph(atomic_reduce):
    _, packed = kc.make_ffn(4096, 1024, torch.bfloat16, "cuda", seed=61)
    x = kc.make_x(1, 1024, torch.bfloat16, "cuda", seed=62)
    idx = torch.randperm(4096, device="cuda")[:2048]
    gather_ffn(x, packed, idx, backend="triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_ffn(x, packed, idx, backend="triton")
    for seed in range(4):
        x.copy_(kc.make_x(1, 1024, torch.bfloat16, "cuda", seed=70 + seed))
        graph.replay()
        torch.cuda.synchronize()
        expect = gather_ffn(x, packed, idx, backend="reference")
        assert kc.rel_err(out, expect) <= kc.TOL[torch.bfloat16], seed
