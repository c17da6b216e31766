"""Benchmark: greedy decode of a Llama-3-8B-shaped model, dense FFN vs ffnkit's SparseFFN module, tokens/s.

The model is a minimal Llama decoder written here with the shapes and operations of Llama-3-8B (32 layers,
d 4096, d_ff 14336, 32 query / 8 key-value heads of 128, vocab 128256, RMSNorm, rotary embeddings, GQA
attention over a static KV cache, SwiGLU FFN), random bf16 weights (speed does not depend on the values).
One decode step (embedding -> 32 layers -> lm_head -> argmax -> next token and position written back on the
device) is captured in a CUDA graph per configuration, so Python overhead does not hide the FFN. The small
ops are torch.compile'd once and shared by every configuration (each checked against eager): the residual
add fused with the next RMSNorm, the SwiGLU product, the greedy argmax, and the attention core (rotary,
KV-cache write, GQA attention), of which six formulations (``bmm``: baddbmm/softmax/bmm; ``sum``: broadcast
products and sums that the compiler fuses; ``sdpa``: F.scaled_dot_product_attention; ``triton``: one Triton
launch, a program per KV head; ``triton_split32`` / ``triton_split64``: one launch split over blocks of 32
/ 64 cache positions too, merged in the launch; the Triton ones in ``decode_kernels.py``) are checked
against eager ``bmm``, timed on the dense model, and the fastest is kept for all. The
attention projections (q/k/v fused, o) the same way: cuBLAS (nn.Linear) or ffnkit's Triton GEMV
(``ffnkit.kernels.gemv``, each ``--gemv-configs`` launch config, with and without the residual add + input
RMSNorm fused into the q/k/v launch: ``rms_norm_gemv``), each checked against F.linear in float32 on layer
0, timed on the dense model (``--proj-rounds``), the fastest kept for every configuration (but
``teal_attn_50``, whose projections are TEAL's). Each configuration
replays its graph for ``--tokens`` tokens from a random 128-token cache, configurations alternate within
every round, and the median over rounds is reported (warm-up and compilation excluded), with the speed-up
over ``dense`` and over the fastest dense configuration of the run (``best_dense``: the fair baseline when
``--pdl`` gives dense the same shared-part kernels).

Configurations (all FFNs through the kernels ffnkit's ``SparseFFN`` dispatches to at decode):
``dense``: nn.Linear (cuBLAS) gate, up, down (the baseline of every speed-up). ``dense_gemv``: the same
three products through ``ffnkit.kernels.gemv`` (a second dense reference). ``predictor_L``: every FFN replaced by a ``SparseFFN`` in
``predictor`` mode (Deja Vu: a random rank-64 predictor; t_mid per layer at the L quantile of its scores
on 16 calibration steps; the module's decode path: z = A x, then ``predicted_ffn``, which scores the
neurons inside the gather kernel). ``gather_L``: ``gather_ffn`` on the same modules' packed weights with a
fixed random active set of exactly (1 - L) of the neurons (the kernel alone, no predictor).
``gather_L_partials``: the same active sets through the same fused kernel, which returns its programs'
unreduced float32 partial sums (``launch_fused_1(partials=True)``); the next residual add + RMSNorm launch
sums them (``decode_kernels.partials_add_rms_norm``), one launch per layer fewer. ``--pdl NAMES``: each
named configuration captured twice more: ``NAME_tnorm`` with the residual add + RMSNorm as a Triton kernel
(``decode_kernels.add_rms_norm``) instead of the compiled one and the argmax as a Triton kernel
(``decode_kernels.argmax``; ``--pdl-attn``: another attention formulation for these sets), and ``NAME_pdl`` the same with every Triton
kernel of the step (the GEMV, the gather kernel and its reduce, attention, add + norm) launched with
programmatic dependent launch (``ffnkit.kernels.programmatic_launch(prefetch_active=True)``: a kernel may
start while the previous one finishes, loading its weights before it waits; the greedy tokens of the two
must be identical, ``check_pdl_tokens_equal_tnorm``), and for gather sets ``NAME_pdl_waitfirst``, the same
with the library's default ``prefetch_active=False`` (the gather kernel waits before reading its active
list, as it must for a list computed on the device just before). cuBLAS kernels (dense's FFN, the output head) launch as
before. ``teal_L``:
``SparseFFN`` in ``input`` mode (TEAL: t_in and t_mid per layer at the L quantiles of |x| and |h|);
``teal_attn_50``: TEAL on the attention projections too (q/k/v fused, o; ``sparse_input_linear``). The
measured kept shares are reported. ``--atomic``: gather_50 and predictor_50 again with the fused kernel
summing its partials itself (``CONFIGS["batch1"]["reduce"] = "atomic"``: one launch per FFN). Capturing
each configuration in a CUDA graph is the check that the module's decode path never syncs.

Run:  python benchmarks/sparsity_decode_gpu.py --out benchmarks/results/sparsity_decode_h200.json
CPU smoke test of the harness (tiny shapes, eager, no graphs):
      python benchmarks/sparsity_decode_gpu.py --device cpu --tiny --out /tmp/decode_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import decode_kernels as DK  # beside this script
import torch
import torch.nn.functional as F
from torch import nn

from ffnkit.kernels import gather_ffn, gemv, rms_norm_gemv, sparse_input_linear
from ffnkit.kernels.benchmark import environment
from ffnkit.kernels.dense_gemv import parse_gemv_config
from ffnkit.modules.sparse_ffn import SparseFFN, SparseSpec

S = {"D": 4096, "FF": 14336, "LAYERS": 32, "HEADS": 32, "KV_HEADS": 8, "HEAD_DIM": 128, "VOCAB": 128256}
TINY = {"D": 256, "FF": 704, "LAYERS": 2, "HEADS": 4, "KV_HEADS": 2, "HEAD_DIM": 64, "VOCAB": 1000}
DEV = {"device": "cuda"}
RANK = 64  # the predictor's rank (ffnkit's SparsityConfig.predictor_rank default)


def kw() -> dict:
    return {"device": DEV["device"], "dtype": torch.bfloat16}


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, RMSNorm(h + delta)): the residual add fused with the next norm."""
    h = h + delta
    return h, F.rms_norm(h, (h.shape[-1],), w, 1e-5)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy choice (compiled: eager argmax over 128,256 logits is one slow single-block reduction)."""
    return logits.argmax(-1)


def add_norm(h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add + RMSNorm; ``delta`` may be a gather FFN's unreduced float32 partials [G, 1, D]
    (``GatherPartialsFFN``), whose sum then happens inside this launch (``partials_add_rms_norm``)."""
    if delta.dim() == 3:
        return DK.partials_add_rms_norm(delta, h, w, 1e-5)
    return FNS["add_rms_norm"](h, delta, w)


def rotary_and_cache(qkv, cos, sin, k_cache, v_cache, pos):
    """Rotary embedding of q and k, and the KV-cache write of the new token. Returns q [KV, G, hd]."""
    h, kvh, hd = S["HEADS"], S["KV_HEADS"], S["HEAD_DIM"]
    nq = (h + kvh) * hd
    qk = qkv[:, :nq].reshape(h + kvh, hd)  # [H + KV, hd]
    half = hd // 2
    qk = qk * cos + torch.cat([-qk[:, half:], qk[:, :half]], -1) * sin
    k_cache.index_copy_(2, pos, qk[h:].reshape(1, kvh, 1, hd))
    v_cache.index_copy_(2, pos, qkv[:, nq:].reshape(1, kvh, 1, hd))
    return qk[:h].reshape(kvh, h // kvh, hd)  # heads grouped per KV head


def attn_core_bmm(qkv, cos, sin, k_cache, v_cache, pos, bias) -> torch.Tensor:
    """GQA attention of one token over the static cache through baddbmm / softmax / bmm."""
    q = rotary_and_cache(qkv, cos, sin, k_cache, v_cache, pos)
    s = torch.baddbmm(bias, q, k_cache[0].transpose(1, 2), alpha=S["HEAD_DIM"] ** -0.5)  # [KV, G, L]
    p = s.softmax(-1, dtype=torch.float32).to(qkv.dtype)
    return torch.bmm(p, v_cache[0]).reshape(1, S["HEADS"] * S["HEAD_DIM"])  # [1, H * hd]


def attn_core_sum(qkv, cos, sin, k_cache, v_cache, pos, bias) -> torch.Tensor:
    """The same attention as broadcast products and sums (pointwise + reductions the compiler can fuse)."""
    q = rotary_and_cache(qkv, cos, sin, k_cache, v_cache, pos).float()  # [KV, G, hd]
    k, v = k_cache[0].float(), v_cache[0].float()  # [KV, L, hd]
    s = (q[:, :, None, :] * k[:, None, :, :]).sum(-1) * S["HEAD_DIM"] ** -0.5 + bias.float()  # [KV, G, L]
    p = s.softmax(-1)
    o = (p[:, :, :, None] * v[:, None, :, :]).sum(2)  # [KV, G, hd]
    return o.to(qkv.dtype).reshape(1, S["HEADS"] * S["HEAD_DIM"])


def attn_core_sdpa(qkv, cos, sin, k_cache, v_cache, pos, bias) -> torch.Tensor:
    """The same attention through F.scaled_dot_product_attention (GQA, the additive mask)."""
    q = rotary_and_cache(qkv, cos, sin, k_cache, v_cache, pos)  # [KV, G, hd]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(0), k_cache, v_cache, attn_mask=bias.unsqueeze(0), scale=S["HEAD_DIM"] ** -0.5
    )  # [1, KV, G, hd]: each KV head attends with its G query heads as G query positions
    return o.reshape(1, S["HEADS"] * S["HEAD_DIM"])


def _triton_core(fn, **kw):
    """An attention formulation of :mod:`decode_kernels` with the harness's signature (``bias`` unused:
    the kernels attend to positions <= pos)."""
    return lambda qkv, cos, sin, k_cache, v_cache, pos, bias: fn(
        qkv, cos, sin, k_cache, v_cache, pos, S, **kw
    )


ATTN = {
    "bmm": attn_core_bmm, "sum": attn_core_sum, "sdpa": attn_core_sdpa,
    "triton": _triton_core(DK.attn_core_triton),
    **{f"triton_split{b}": _triton_core(DK.attn_core_split, block=b) for b in (32, 64)},
}  # fmt: skip
# the small ops of a step; main() replaces them with torch.compile'd versions (fewer kernel launches)
FNS = {"add_rms_norm": add_rms_norm, "swiglu": swiglu, "attn_core": attn_core_bmm, "argmax": argmax}
# fuse_norm: a GemvLinear q/k/v projection takes the residual add and the input norm into its launch
PROJ = {"fuse_norm": False}


class GemvLinear(nn.Module):
    """A bias-free projection through :func:`ffnkit.kernels.gemv` (the Triton GEMV on CUDA at batch 1) on
    the nn.Linear's own weight (no copy). With ``PROJ["fuse_norm"]`` the layer calls :meth:`norm_forward`
    for the q/k/v projection instead: residual add + RMSNorm + GEMV in one launch (``rms_norm_gemv``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self.weight)

    def norm_forward(self, h, delta, norm_w) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(h + delta) W^T, h + delta)."""
        return rms_norm_gemv(h, self.weight, norm_w, 1e-5, delta)


class MLP(nn.Module):
    """The Llama / Hugging Face FFN: down(silu(gate x) * up x)."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False, **kw())
        self.up_proj = nn.Linear(d, f, bias=False, **kw())
        self.down_proj = nn.Linear(f, d, bias=False, **kw())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(FNS["swiglu"](self.gate_proj(x), self.up_proj(x)))


class Attention(nn.Module):
    def __init__(self, max_len: int):
        super().__init__()
        h, kvh, hd, d = S["HEADS"], S["KV_HEADS"], S["HEAD_DIM"], S["D"]
        self.qkv = nn.Linear(d, (h + 2 * kvh) * hd, bias=False, **kw())  # q, k, v fused
        self.o_proj = nn.Linear(h * hd, d, bias=False, **kw())
        self.k_cache = torch.randn(1, kvh, max_len, hd, **kw())
        self.v_cache = torch.randn(1, kvh, max_len, hd, **kw())

    def forward(self, x, pos, cos, sin, bias, qkv=None) -> torch.Tensor:
        """x: the normed input [1, D], or None with ``qkv`` already computed (the fused norm + q/k/v)."""
        qkv = self.qkv(x) if qkv is None else qkv
        o = FNS["attn_core"](qkv, cos, sin, self.k_cache, self.v_cache, pos, bias)
        return self.o_proj(o)  # [1, D]


class Layer(nn.Module):
    def __init__(self, max_len: int):
        super().__init__()
        self.input_norm = nn.Parameter(torch.ones(S["D"], **kw()))
        self.post_norm = nn.Parameter(torch.ones(S["D"], **kw()))
        self.attn, self.mlp = Attention(max_len), MLP(S["D"], S["FF"])

    def forward(self, h, delta, pos, cos, sin, bias):
        """(h, delta) -> (h', FFN output): the previous block's output is added here, fused with the norm."""
        q = self.attn.qkv
        if PROJ["fuse_norm"] and isinstance(q, GemvLinear) and delta.dim() == 2:
            qkv, h = q.norm_forward(h, delta, self.input_norm)
            o = self.attn(None, pos, cos, sin, bias, qkv)
        else:
            h, a = add_norm(h, delta, self.input_norm)
            o = self.attn(a, pos, cos, sin, bias)
        h, a = add_norm(h, o, self.post_norm)
        return h, self.mlp(a)


class Model(nn.Module):
    def __init__(self, layers: int, max_len: int):
        super().__init__()
        dev = DEV["device"]
        self.embed = nn.Embedding(S["VOCAB"], S["D"], **kw())
        self.layers = nn.ModuleList([Layer(max_len) for _ in range(layers)])
        self.norm = nn.Parameter(torch.ones(S["D"], **kw()))
        self.lm_head = nn.Linear(S["D"], S["VOCAB"], bias=False, **kw())
        hd = S["HEAD_DIM"]
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
        ang = torch.arange(max_len, device=dev).float()[:, None] * inv[None, :]  # [L, hd/2]
        self.cos = torch.cat([ang.cos(), ang.cos()], -1).to(torch.bfloat16)  # [L, hd]
        self.sin = torch.cat([ang.sin(), ang.sin()], -1).to(torch.bfloat16)
        self.positions = torch.arange(max_len, device=dev)

    def forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.embed(tok)  # [1, D]
        delta = torch.zeros_like(h)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # [1, hd]
        # additive mask over the static cache: no host sync, fixed shapes
        bias = torch.where(self.positions <= pos, 0.0, float("-inf")).to(h.dtype).view(1, 1, -1)  # [1, 1, L]
        for layer in self.layers:
            h, delta = layer(h, delta, pos, cos, sin, bias)
        _, a = add_norm(h, delta, self.norm)
        return self.lm_head(a)  # [1, V]


# ------------------------------------------------------------------------------------------ sparse FFNs


class GatherFFN(nn.Module):
    """The FFN over a fixed active set of neurons through :func:`ffnkit.kernels.gather_ffn`."""

    def __init__(self, packed: torch.Tensor, idx: torch.Tensor):
        super().__init__()
        self.packed, self.idx = packed, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_ffn(x, self.packed, self.idx)


class GatherPartialsFFN(GatherFFN):
    """The same FFN whose output is the fused kernel's unreduced float32 partial sums [G, 1, D]: the next
    residual add + RMSNorm sums them (:func:`add_norm`), one launch fewer per layer than ``GatherFFN``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ffnkit.kernels.triton_sparse_ffn import launch_fused_1

        return launch_fused_1(x.reshape(1, -1), self.packed, self.idx, "silu", None, partials=True)


class TealLinear(nn.Module):
    def __init__(self, linear: nn.Linear, t: float):
        super().__init__()
        self.w_t, self.t, self.stats = linear.weight.data.T.contiguous(), t, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            self.stats.append(float((x.abs() >= self.t).float().mean()))
        return sparse_input_linear(x, self.w_t, self.t)


SPEC = SparseSpec("up_proj", "gate_proj", "down_proj", None, act_kernel="silu", act_hf="silu")


def sparse_module(mlp: MLP, mode: str, rank: int = 0) -> SparseFFN:
    """ffnkit's SparseFFN around the harness's MLP (its own Linear children, no copy of them)."""
    return SparseFFN(mlp, SPEC, mode=mode, d_model=S["D"], d_ff=S["FF"], rank=rank).to(DEV["device"])


def collect(model: Model, tokens: int) -> dict[str, list[torch.Tensor]]:
    """Inputs of each FFN ("ffn{i}"), its down projection ("mid{i}") and the attention projections, over
    ``tokens`` eager decode steps (float32, flattened)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        sites = (
            ("ffn", layer.mlp),
            ("qkv", layer.attn.qkv),
            ("o", layer.attn.o_proj),
            ("mid", layer.mlp.down_proj),
        )
        for name, mod in sites:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, key=f"{name}{i}": seen.setdefault(key, []).append(a[0].detach().float().flatten())
            ))  # fmt: skip
    tok = torch.randint(0, S["VOCAB"], (1,), device=DEV["device"])
    fused, PROJ["fuse_norm"] = PROJ["fuse_norm"], False  # the q/k/v hook needs the normed input
    with torch.no_grad():
        for p in range(tokens):
            tok = model(tok, torch.tensor([p], device=DEV["device"])).argmax(-1)
    PROJ["fuse_norm"] = fused
    for h in hooks:
        h.remove()
    return seen


def quantile(values: list[torch.Tensor], level: float) -> float:
    v = torch.cat(values)
    if v.numel() > 8_000_000:
        v = v[torch.randperm(v.numel(), device=v.device)[:8_000_000]]
    return float(torch.quantile(v, level))


# ------------------------------------------------------------------------------------------- harness


def projection_variants(specs: list[str], fuse: bool) -> dict[str, tuple[dict | None, bool]]:
    """name -> (Triton GEMV launch config or None for cuBLAS, fused norm) of the attention projections."""
    out: dict[str, tuple[dict | None, bool]] = {"cublas": (None, False)}
    for spec in specs:
        cfg = parse_gemv_config(spec)
        out[f"gemv[{spec}]"] = (cfg, False)
        if fuse:
            out[f"gemv_norm[{spec}]"] = (cfg, True)
    return out


_GEMV_DEFAULTS: dict = {}


def set_projections(model: Model, linears: list, cfg: dict | None, fuse: bool) -> list:
    """Put cuBLAS (``cfg`` None: the nn.Linear modules) or GemvLinear on every layer's q/k/v and o, with
    ``triton_gemv.CONFIGS`` set to ``cfg`` (a graph bakes the launch in at capture). Returns the modules."""
    if DEV["device"] == "cuda":
        import ffnkit.kernels.triton_gemv as TG

        if not _GEMV_DEFAULTS:
            _GEMV_DEFAULTS.update({k: dict(v) if isinstance(v, dict) else v for k, v in TG.CONFIGS.items()})
        TG.CONFIGS.update({k: dict(v) if isinstance(v, dict) else v for k, v in _GEMV_DEFAULTS.items()})
        if cfg is not None:
            TG.CONFIGS["path"] = cfg["path"]
            TG.CONFIGS[cfg["path"]].update({k: v for k, v in cfg.items() if k != "path"})
    mods = linears if cfg is None else [(GemvLinear(q), GemvLinear(o)) for q, o in linears]
    for layer, (q, o) in zip(model.layers, mods, strict=True):
        layer.attn.qkv, layer.attn.o_proj = q, o
    PROJ["fuse_norm"] = fuse and cfg is not None
    return mods


@torch.no_grad()
def check_projections(model: Model) -> float:
    """Largest relative error of layer 0's q/k/v (with its input norm, fused or not) and o projections as
    the model runs them, against F.linear in float32 on fresh random inputs."""
    layer, d = model.layers[0], S["D"]
    h, delta, x = (torch.randn(1, d, **kw()) for _ in range(3))
    hf = h.float() + delta.float()
    want_qkv = F.linear(F.rms_norm(hf, (d,), layer.input_norm.float(), 1e-5), layer.attn.qkv.weight.float())
    if PROJ["fuse_norm"]:
        qkv, _ = layer.attn.qkv.norm_forward(h, delta, layer.input_norm)
    else:
        qkv = layer.attn.qkv(F.rms_norm(h + delta, (d,), layer.input_norm, 1e-5))
    o = layer.attn.o_proj(x)
    want_o = F.linear(x.float(), layer.attn.o_proj.weight.float())
    return max(
        float((qkv.float() - want_qkv).norm() / want_qkv.norm()),
        float((o.float() - want_o).norm() / want_o.norm()),
    )


def compile_small_ops(max_len: int, variants: tuple[str, ...]) -> tuple[str, dict]:
    """torch.compile the fused add+norm, the SwiGLU product and each attention formulation (each checked
    against eager on random inputs); any that fails stays eager. Returns (what happened, compiled cores)."""
    dev, d, ff, kvh, hd = DEV["device"], S["D"], S["FF"], S["KV_HEADS"], S["HEAD_DIM"]
    pos = torch.tensor([5], device=dev)
    bias = (
        torch.where(torch.arange(max_len, device=dev) <= pos, 0.0, float("-inf"))
        .to(torch.bfloat16)
        .view(1, 1, -1)
    )
    kv = [torch.randn(1, kvh, max_len, hd, **kw()) for _ in range(2)]
    cos_sin = [torch.rand(1, hd, **kw()) for _ in range(2)]
    qkv = torch.randn(1, (S["HEADS"] + 2 * kvh) * hd, **kw())
    args = {
        "add_rms_norm": (torch.randn(1, d, **kw()), torch.randn(1, d, **kw()), torch.rand(d, **kw())),
        "swiglu": tuple(torch.randn(1, ff, **kw()) for _ in range(2)),
        "argmax": (torch.randn(1, S["VOCAB"], **kw()),),
        **{f"attn_{v}": (qkv, *cos_sin, kv[0], kv[1], pos, bias) for v in variants},
    }  # fmt: skip
    fns = {"add_rms_norm": add_rms_norm, "swiglu": swiglu, "argmax": argmax}
    fns.update({f"attn_{v}": ATTN[v] for v in variants})
    done, out = [], {}
    for name, fn in fns.items():
        try:
            triton_core = name.startswith("attn_triton")  # its own kernel: nothing to compile
            if DEV["device"] != "cuda" and not triton_core:
                raise RuntimeError("compile only on cuda")
            c = fn if triton_core else torch.compile(fn, dynamic=False)
            a1 = [t.clone() for t in args[name]]
            a2 = [t.clone() for t in args[name]]
            got, want = c(*a1), (attn_core_bmm if name.startswith("attn_") else fn)(*a2)  # eager oracle
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            for g_, w_ in zip(got, want, strict=True):
                err = float((g_.float() - w_.float()).norm() / w_.float().norm())
                if err > (0 if name == "argmax" else 2e-2):
                    raise ValueError(f"compiled {name} differs from eager: {err}")
            out[name] = c
            done.append(name)
        except Exception as exc:  # keep eager (an attention variant that fails its check is dropped)
            print(f"compile {name} failed: {exc!r}"[:300], file=sys.stderr, flush=True)
            if not name.startswith("attn_") or name in ("attn_bmm", "attn_sum"):
                out[name] = fn
    FNS["add_rms_norm"], FNS["swiglu"], FNS["argmax"] = out["add_rms_norm"], out["swiglu"], out["argmax"]
    return ",".join(done) or "none", {v: out[f"attn_{v}"] for v in variants if f"attn_{v}" in out}


def capture(model: Model, tok: torch.Tensor, pos: torch.Tensor, start: int):
    """The decode step as a CUDA graph (on CPU: the eager step, for the smoke test)."""

    def step():
        nxt = FNS["argmax"](model(tok, pos))
        tok.copy_(nxt)
        pos.add_(1)

    with torch.no_grad():
        pos.fill_(start)
        step()  # compile the kernels outside the capture
        if DEV["device"] != "cuda":
            return step
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pos.fill_(start)
            step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        pos.fill_(start)
        with torch.cuda.graph(g):
            step()
    return g.replay


def greedy_tokens(replay, tok: torch.Tensor, pos: torch.Tensor, start: int, tokens: int) -> list[int]:
    """The tokens a captured step produces from token 7 at ``start`` (host syncs: outside any timing)."""
    tok.fill_(7)
    pos.fill_(start)
    out = []
    for _ in range(tokens):
        replay()
        out.append(int(tok.item()))
    return out


def time_graphs(
    configs: dict, pos: torch.Tensor, start: int, tokens: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per token of each configuration's graph, ``rounds`` times, configurations alternating."""
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, replay in configs.items():
            pos.fill_(start)
            replay()
            replay()
            if DEV["device"] != "cuda":
                t0 = time.perf_counter()
                pos.fill_(start)
                for _ in range(tokens):
                    replay()
                times[name].append((time.perf_counter() - t0) / tokens)
                continue
            torch.cuda.synchronize()
            pos.fill_(start)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(tokens):
                replay()
            e.record()
            e.synchronize()
            times[name].append(s.elapsed_time(e) / 1e3 / tokens)
    return times


def profile_graph(replay, pos: torch.Tensor, start: int, tokens: int) -> dict:
    """Device time per token of each kernel (by name) over ``tokens`` replays, under torch.profiler; the
    sum next to the wall time per token shows what the gaps between kernels cost."""
    from torch.profiler import ProfilerActivity, profile

    pos.fill_(start)
    replay()
    torch.cuda.synchronize()
    pos.fill_(start)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(tokens):
            replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key[:90], "calls_per_token": round(e.count / tokens, 2),
                         "us_per_token": round(us / tokens, 2)})  # fmt: skip
    rows.sort(key=lambda r: -r["us_per_token"])
    return {"kernels_us_per_token": round(sum(r["us_per_token"] for r in rows), 1), "top": rows[:14]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test of the harness)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--levels", default="0.25,0.4,0.5,0.65", help="gather_L levels (fixed active set)")
    ap.add_argument("--pred-levels", default="0.4,0.5,0.65", help="predictor_L levels")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--attn",
        default="bmm,sum,sdpa,triton,triton_split32,triton_split64",
        help="attention formulations to try (fastest kept)",
    )
    ap.add_argument(
        "--gemv-configs",
        default="chunks:4:1024:4,chunks:8:512:4,rows:2:8:0,rows:4:8:0,rows:4:8:2",
        help="Triton GEMV launch configs tried for the attention projections next to cuBLAS (fastest kept)",
    )
    ap.add_argument("--no-gemv-norm", action="store_true", help="do not try the fused norm + q/k/v GEMV")
    ap.add_argument("--proj-rounds", type=int, default=3, help="rounds of the projection trial")
    ap.add_argument("--no-teal", action="store_true")
    ap.add_argument("--teal-configs", type=Path, default=None, help="JSON of TEAL kernel CONFIGS to use")
    ap.add_argument(
        "--teal-levels", default="0.4,0.5,0.65", help="teal_L levels (50%% always, with teal_attn_50)"
    )
    ap.add_argument(
        "--atomic", action="store_true", help="also gather_50 / predictor_50 with the in-kernel reduce"
    )
    ap.add_argument(
        "--profile",
        default="",
        help="configs to profile after timing (comma list): device time per kernel name per token",
    )
    ap.add_argument(
        "--pdl",
        default="",
        help="configs captured again with programmatic dependent launch (NAME_pdl) and with the Triton add +"
        " norm alone (NAME_tnorm), comma list",
    )
    ap.add_argument(
        "--pdl-attn", default="", help="attention formulation of the --pdl sets (default: the trial's)"
    )
    ap.add_argument(
        "--gemv-prefetch",
        type=int,
        default=None,
        help="chunks of W the GEMV loads before its PDL wait (1 or 2)",
    )
    ap.add_argument(
        "--fused-sweep",
        default="",
        help="extra predicted_ffn configs BLOCK_K:PROGRAMS_PER_SM:num_warps,... for predictor_50",
    )
    args = ap.parse_args()
    DEV["device"] = args.device
    if args.gemv_prefetch is not None and args.device == "cuda":
        import ffnkit.kernels.triton_gemv as TG

        TG.CONFIGS["chunks"]["PREFETCH"] = args.gemv_prefetch
    if args.teal_configs and args.device == "cuda":
        import ffnkit.kernels.triton_teal as TT

        TT.CONFIGS.update(json.loads(args.teal_configs.read_text()))
    record_configs = TT.CONFIGS if args.teal_configs and args.device == "cuda" else None
    if args.tiny:
        S.update(TINY)
    if args.layers:
        S["LAYERS"] = args.layers
    torch.manual_seed(0)
    dev = args.device
    start, max_len = 128, 128 + 2 * args.tokens + 8
    variants = tuple(v for v in args.attn.split(",") if v)
    compiled, cores = compile_small_ops(max_len, variants)
    model = Model(S["LAYERS"], max_len)
    dense_mlps = [layer.mlp for layer in model.layers]
    dense_attn = [(layer.attn.qkv, layer.attn.o_proj) for layer in model.layers]
    record = {
        "benchmark": "sparsity_decode_gpu",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment(dev),
        "model": {**S, "dtype": "bfloat16", "cache_start": start, "predictor_rank": RANK,
                  "weight_bytes": sum(p.numel() * 2 for p in model.parameters()),
                  "ffn_weight_bytes": sum(p.numel() * 2 for m in dense_mlps for p in m.parameters())},
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "small_ops_compiled": compiled,
        "configs": {},
        "teal_kernel_configs": record_configs,
    }  # fmt: skip

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")

    tok = torch.zeros(1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    configs: dict[str, object] = {}
    keep_alive: list = []
    built: dict[str, tuple] = {}  # name -> (ffns, attn, info) of every captured configuration

    def add(name: str, ffns: list[nn.Module], attn: list | None = None, info: dict | None = None) -> None:
        for layer, ffn in zip(model.layers, ffns, strict=True):
            layer.mlp = ffn
        if attn is not None:
            for layer, (q, o) in zip(model.layers, attn, strict=True):
                layer.attn.qkv, layer.attn.o_proj = q, o
        try:
            configs[name] = capture(model, tok, pos, start)
            keep_alive.append((ffns, attn))
            built[name] = (ffns, attn, info)
            record["configs"][name] = {"captured": dev == "cuda", **(info or {})}
        except Exception as exc:
            record["configs"][name] = {"error": repr(exc)[:400], **(info or {})}
            print(name, "failed:", repr(exc)[:400], file=sys.stderr, flush=True)
        for layer, (q, o) in zip(model.layers, dense_attn, strict=True):
            layer.attn.qkv, layer.attn.o_proj = q, o
        for layer, m in zip(model.layers, dense_mlps, strict=True):
            layer.mlp = m
        save()

    # the attention formulation: the fastest on the dense model, then the same for every configuration
    if len(cores) > 1:
        trial = {}
        for v, fn in cores.items():
            FNS["attn_core"] = fn
            try:
                trial[v] = capture(model, tok, pos, start)
            except Exception as exc:  # a formulation that cannot be captured is dropped
                print(f"attention {v} failed: {exc!r}"[:300], file=sys.stderr, flush=True)
        t = time_graphs(trial, pos, start, args.tokens, 2)
        record["attn_core_trial_ms"] = {v: round(statistics.median(ts) * 1e3, 3) for v, ts in t.items()}
        best = min(t, key=lambda v: statistics.median(t[v]))
        del trial
    else:
        best = next(iter(cores))
    FNS["attn_core"] = cores[best]
    record["attn_core"] = best
    print("attention core:", best, record.get("attn_core_trial_ms"), file=sys.stderr, flush=True)

    # the attention projections: cuBLAS or the Triton GEMV (each launch config, with and without the fused
    # norm), each checked against F.linear in float32, timed on the dense model; the fastest is kept for all
    linear_attn = list(dense_attn)
    variants = projection_variants([v for v in args.gemv_configs.split(",") if v], not args.no_gemv_norm)
    trial, checks, logits_err = {}, {}, {}
    probe_tok, probe_pos = torch.tensor([7], device=dev), torch.tensor([start], device=dev)
    with torch.no_grad():
        ref_logits = model(probe_tok, probe_pos).float()  # cuBLAS, eager
    for name, (cfg, fuse) in variants.items():
        try:
            set_projections(model, linear_attn, cfg, fuse)
            checks[name] = check_projections(model)
            with torch.no_grad():  # the whole step as the layers run it (the fused path included)
                lg = model(probe_tok, probe_pos).float()
            logits_err[name] = float((lg - ref_logits).norm() / ref_logits.norm())
            if checks[name] > 2e-2 or logits_err[name] > 0.25:
                raise ValueError(f"differs from F.linear: {checks[name]}, logits {logits_err[name]}")
            trial[name] = capture(model, tok, pos, start)
        except Exception as exc:  # a variant that fails its check or its capture is dropped
            print(f"projection {name} failed: {exc!r}"[:300], file=sys.stderr, flush=True)
    t = time_graphs(trial, pos, start, args.tokens, args.proj_rounds)
    record["attn_proj_trial_ms"] = {v: round(statistics.median(ts) * 1e3, 4) for v, ts in t.items()}
    record["check_attn_proj_rel_err"] = {v: round(e, 5) for v, e in checks.items()}
    record["check_attn_proj_logits_rel_err_vs_cublas"] = {v: round(e, 5) for v, e in logits_err.items()}
    proj = min(t, key=lambda v: statistics.median(t[v]))
    del trial
    cfg, fuse = variants[proj]
    dense_attn[:] = set_projections(model, linear_attn, cfg, fuse)
    record["attn_proj"] = proj
    if cfg is not None and dev == "cuda":
        import ffnkit.kernels.triton_gemv as TG

        record["attn_proj_gemv_configs"] = json.loads(json.dumps(TG.CONFIGS))
    print("attention projections:", proj, record["attn_proj_trial_ms"], file=sys.stderr, flush=True)

    add("dense", dense_mlps, info={"ffn": "nn.Linear (cuBLAS) gate, up, down", "ffn_bytes_skipped": 0.0})
    seen = collect(model, 16)
    if cfg is not None:  # a second dense reference: the FFN's three products through the GEMV too
        gemv_mlps = []
        for m in dense_mlps:
            gm = MLP.__new__(MLP)
            nn.Module.__init__(gm)
            gm.gate_proj, gm.up_proj, gm.down_proj = (
                GemvLinear(lin) for lin in (m.gate_proj, m.up_proj, m.down_proj)
            )
            gemv_mlps.append(gm)
        add("dense_gemv", gemv_mlps, info={
            "ffn": "ffnkit.kernels.gemv gate, up, down (the attention projections' launch config)",
            "ffn_bytes_skipped": 0.0,
        })  # fmt: skip

    # predictor mode: one SparseFFN per layer (its packed weights shared by every level and by gather_L)
    g = torch.Generator(device=dev).manual_seed(1)
    pred_mods, scores = [], []
    with torch.no_grad():
        for i, m in enumerate(dense_mlps):
            sp = sparse_module(m, "predictor", RANK)
            sp.pred_a.copy_(torch.randn(RANK, S["D"], generator=g, device=dev) / S["D"] ** 0.5)
            sp.pred_b.copy_(torch.randn(S["FF"], RANK, generator=g, device=dev) / RANK**0.5)
            sp.pred_bias.copy_(0.5 * torch.randn(S["FF"], generator=g, device=dev))
            xs = torch.stack([v for v in seen[f"ffn{i}"]]).to(dev)  # [T, D]
            scores.append(sp.predict(xs).flatten())  # [T * F] calibration scores
            pred_mods.append(sp)
        # the module's kernel path on layer 0 against its masked dense path, before any timing
        sp = pred_mods[0]
        sp.t_mid.fill_(quantile([scores[0]], 0.5))
        x = seen["ffn0"][-1].to(torch.bfloat16).view(1, 1, -1)
        fast, slow = sp(x), sp.masked_forward(x)
        record["check_predictor_rel_err"] = float((fast.float() - slow.float()).norm() / slow.float().norm())
    for level in [float(v) for v in args.pred_levels.split(",") if v]:
        kept = []
        with torch.no_grad():
            for sp, sc in zip(pred_mods, scores, strict=True):
                t_mid = quantile([sc], level)
                sp.t_mid.fill_(t_mid)
                kept.append(float((sc > t_mid).float().mean()))
        add(f"predictor_{round(level * 100)}", pred_mods, info={
            "ffn": "SparseFFN mode=predictor (z = A x, then predicted_ffn)", "ffn_neurons_skipped_calibration": round(1 - statistics.mean(kept), 4),
        })  # fmt: skip
    if args.fused_sweep and dev == "cuda":
        import ffnkit.kernels.triton_sparse_ffn as T

        default = dict(T.CONFIGS["pred_1"])
        with torch.no_grad():
            for sp, sc in zip(pred_mods, scores, strict=True):
                sp.t_mid.fill_(quantile([sc], 0.5))
        for spec in args.fused_sweep.split(","):
            bk, per_sm, warps = (int(v) for v in spec.split(":"))
            T.CONFIGS["pred_1"] = {**default, "BLOCK_K": bk, "PROGRAMS_PER_SM": per_sm, "num_warps": warps}
            add(
                f"predictor_50_k{bk}p{per_sm}w{warps}",
                pred_mods,
                info={"pred_1": dict(T.CONFIGS["pred_1"])},
            )
        T.CONFIGS["pred_1"] = default
    pred_t50 = [quantile([sc], 0.5) for sc in scores]
    del scores
    packed = [sp._packed() for sp in pred_mods]
    with torch.no_grad():
        probe = GatherFFN(packed[0], torch.randperm(S["FF"], device=dev)[: S["FF"] // 2].sort().values)
        x = torch.randn(1, S["D"], **kw())
        want = gather_ffn(x, probe.packed, probe.idx, backend="reference")
        record["check_gather_rel_err"] = float((probe(x).float() - want.float()).norm() / want.float().norm())
        triton_ok = dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if triton_ok:  # h + FFN(x) and its norm through the partials launch, against the eager add + norm
            h0, w0 = torch.randn(1, S["D"], **kw()), torch.rand(S["D"], **kw()) + 0.5
            for _ in range(2):  # twice: the first call must leave its ticket and sum re-armed
                got = add_norm(h0, GatherPartialsFFN(probe.packed, probe.idx)(x), w0)
            ref = add_rms_norm(h0, want, w0)
            record["check_partials_add_norm_rel_err"] = [
                float((g_.float() - r_.float()).norm() / r_.float().norm())
                for g_, r_ in zip(got, ref, strict=True)
            ]
            if max(record["check_partials_add_norm_rel_err"]) > 2e-2:
                raise SystemExit(f"partials add + norm differs: {record['check_partials_add_norm_rel_err']}")
    for level in [float(v) for v in args.levels.split(",") if v]:
        keep = round((1 - level) * S["FF"])
        ffns = [GatherFFN(p, torch.randperm(S["FF"], device=dev)[:keep].sort().values) for p in packed]
        add(f"gather_{round(level * 100)}", ffns, info={
            "ffn": "gather_ffn on SparseFFN's packed weights, fixed random active set", "ffn_bytes_skipped": level,
        })  # fmt: skip
        if triton_ok:  # the same active sets, the FFN's reduce folded into the next add + norm launch
            add(f"gather_{round(level * 100)}_partials", [GatherPartialsFFN(f.packed, f.idx) for f in ffns], info={
                "ffn": "gather_ffn's fused kernel, partial sums reduced in the next residual add + RMSNorm launch",
                "ffn_bytes_skipped": level,
            })  # fmt: skip

    if args.atomic and dev == "cuda":
        # the same FFNs with the partial sums reduced inside the fused kernel (no reduce launch)
        import ffnkit.kernels.triton_sparse_ffn as T

        T.CONFIGS["batch1"]["reduce"] = "atomic"
        with torch.no_grad():
            ok = all(
                float((probe(x).float() - want.float()).norm() / want.float().norm()) < 1e-2 for _ in range(3)
            )
            record["check_atomic_gather_ok"] = ok
        if ok:
            keep = S["FF"] // 2
            ffns = [GatherFFN(p, torch.randperm(S["FF"], device=dev)[:keep].sort().values) for p in packed]
            add(
                "gather_50_atomic",
                ffns,
                info={"ffn": "gather_ffn, reduce inside the kernel", "ffn_bytes_skipped": 0.5},
            )
            with torch.no_grad():
                for sp, t in zip(pred_mods, pred_t50, strict=True):
                    sp.t_mid.fill_(t)
            add(
                "predictor_50_atomic",
                pred_mods,
                info={"ffn": "SparseFFN mode=predictor, reduce inside the kernel"},
            )
        T.CONFIGS["batch1"]["reduce"] = "kernel"
    if not args.no_teal:
        teal = [sparse_module(m, "input") for m in dense_mlps]
        abs_in = [[v.abs() for v in seen[f"ffn{i}"]] for i in range(len(teal))]
        abs_mid = [[v.abs() for v in seen[f"mid{i}"]] for i in range(len(teal))]

        def teal_thresholds(level: float) -> None:
            # the graphs bake the thresholds in at capture: each level is captured after its own fill
            with torch.no_grad():
                for sp, vin, vmid in zip(teal, abs_in, abs_mid, strict=True):
                    sp.t_in.fill_(quantile(vin, level))
                    sp.t_mid.fill_(quantile(vmid, level))

        with torch.no_grad():
            attn = [
                (TealLinear(q, quantile([v.abs() for v in seen[f"qkv{i}"]], 0.5)),
                 TealLinear(o, quantile([v.abs() for v in seen[f"o{i}"]], 0.5)))
                for i, (q, o) in enumerate(linear_attn)
            ]  # fmt: skip
        teal_levels = sorted({float(v) for v in args.teal_levels.split(",") if v} | {0.5})
        for level in teal_levels:
            teal_thresholds(level)
            pct = round(level * 100)
            add(f"teal_{pct}", teal, info={
                "ffn": f"SparseFFN mode=input (teal_ffn), {pct}% quantiles of |x| and |h|",
            })  # fmt: skip
            if level == 0.5:
                add("teal_attn_50", teal, attn, info={
                    "ffn": "SparseFFN mode=input", "attention": "sparse_input_linear on qkv and o, 50% quantile",
                })  # fmt: skip
        teal_thresholds(0.5)
        with torch.no_grad():
            x = seen["ffn0"][-1].to(torch.bfloat16).view(1, 1, -1)
            fast, slow = teal[0](x), teal[0].masked_forward(x)
            record["check_teal_rel_err"] = float((fast.float() - slow.float()).norm() / slow.float().norm())
        # measured kept shares on fresh decode steps (eager, outside the timing)
        for layer, m in zip(model.layers, teal, strict=True):
            layer.mlp = m
        fresh = collect(model, 16)
        kin = statistics.mean(
            float((torch.cat(fresh[f"ffn{i}"]).abs() >= float(m.t_in)).float().mean())
            for i, m in enumerate(teal)
        )
        mids = []
        with torch.no_grad():
            for i, m in enumerate(teal):
                xs = torch.stack(fresh[f"ffn{i}"]).to(torch.bfloat16)  # [T, D]
                xs = torch.where(xs.abs() >= m.t_in.to(xs.dtype), xs, 0)
                hmid = F.silu(m.gate_proj(xs).float()) * m.up_proj(xs).float()  # [T, F]
                mids.append(float((hmid.abs() >= float(m.t_mid)).float().mean()))
        kattn = statistics.mean(
            float((torch.cat(fresh[f"{s}{i}"]).abs() >= t.t).float().mean())
            for i, (q, o) in enumerate(attn) for s, t in (("qkv", q), ("o", o))
        )  # fmt: skip
        kmid = statistics.mean(mids)
        record["teal_measured"] = {"ffn_inputs_kept": round(kin, 4), "ffn_intermediates_kept": round(kmid, 4),
                                   "ffn_bytes_skipped": round(1 - (2 * kin + kmid) / 3, 4), "attn_inputs_kept": round(kattn, 4)}  # fmt: skip
        for layer, m in zip(model.layers, dense_mlps, strict=True):
            layer.mlp = m
        save()

    pdl_names = [v for v in args.pdl.split(",") if v in built]
    if pdl_names and dev == "cuda":
        # the same FFNs with the add + norm in Triton (NAME_tnorm), then with every Triton kernel of the step
        # launched with programmatic dependent launch (NAME_pdl); greedy tokens of both must be identical
        import ffnkit.kernels.triton_sparse_ffn as T

        compiled_norm, compiled_argmax, core = FNS["add_rms_norm"], FNS["argmax"], FNS["attn_core"]
        with torch.no_grad():
            a3 = (torch.randn(1, S["D"], **kw()), torch.randn(1, S["D"], **kw()), torch.rand(S["D"], **kw()))
            record["check_triton_add_norm_rel_err"] = [
                float((g_.float() - r_.float()).norm() / r_.float().norm())
                for g_, r_ in zip(DK.add_rms_norm(*a3), add_rms_norm(*a3), strict=True)
            ]
        with torch.no_grad():
            lg = torch.randn(1, S["VOCAB"], **kw())
            record["check_triton_argmax_equal"] = bool(torch.equal(DK.argmax(lg), lg.argmax(-1)))
        FNS["add_rms_norm"], FNS["argmax"] = DK.add_rms_norm, DK.argmax
        if args.pdl_attn:  # the attention formulation of the Triton sets (its prefetch may pay only with PDL)
            FNS["attn_core"] = cores[args.pdl_attn]
        record["pdl_sets"] = {
            "attn_core": args.pdl_attn or record["attn_core"],
            "gemv_prefetch": args.gemv_prefetch,
        }
        for name in pdl_names:
            add(f"{name}_tnorm", *built[name])
        T.LAUNCH["pdl"] = True
        T.LAUNCH["prefetch_active"] = True  # the harness's active sets are fixed: never written in a step
        for name in pdl_names:
            add(f"{name}_pdl", *built[name])
        T.LAUNCH["prefetch_active"] = False  # the library's default: the gather kernel waits first
        for name in pdl_names:
            if name.startswith("gather"):
                add(f"{name}_pdl_waitfirst", *built[name])
        T.LAUNCH["pdl"] = False
        FNS["add_rms_norm"], FNS["argmax"], FNS["attn_core"] = compiled_norm, compiled_argmax, core
        record["check_pdl_tokens_equal_tnorm"] = {
            name: greedy_tokens(configs[f"{name}_pdl"], tok, pos, start, args.tokens)
            == greedy_tokens(configs[f"{name}_tnorm"], tok, pos, start, args.tokens)
            for name in pdl_names
            if f"{name}_pdl" in configs and f"{name}_tnorm" in configs
        }
        save()
    times = time_graphs(configs, pos, start, args.tokens, args.rounds)
    dense_s = statistics.median(times["dense"])
    # the fairest baseline: the fastest dense configuration of the run (every shared-part trick included)
    best_dense = min((n for n in times if n.startswith("dense")), key=lambda n: statistics.median(times[n]))
    best_s = statistics.median(times[best_dense])
    record["best_dense"] = best_dense
    for name, ts in times.items():
        med = statistics.median(ts)
        record["configs"][name].update(
            ms_per_token=round(med * 1e3, 3), tokens_per_s=round(1 / med, 1), speedup_vs_dense=round(dense_s / med, 3),
            speedup_vs_best_dense=round(best_s / med, 3), rounds_ms=[round(t * 1e3, 3) for t in ts],
        )  # fmt: skip
    save()
    for name in [v for v in args.profile.split(",") if v]:
        if dev == "cuda" and name in configs:
            record["configs"][name]["profile"] = profile_graph(configs[name], pos, start, 8)
            save()
            prof = record["configs"][name]["profile"]
            print(name, "kernels", prof["kernels_us_per_token"], "us/token", json.dumps(prof["top"][:8]))
    print(f"{'config':20s} {'ms/token':>9s} {'tok/s':>8s} {'x dense':>8s} {'x ' + best_dense:>12s}")
    for name, c in record["configs"].items():
        if "ms_per_token" in c:
            print(
                f"{name:20s} {c['ms_per_token']:9.3f} {c['tokens_per_s']:8.1f} {c['speedup_vs_dense']:8.3f}"
                f" {c['speedup_vs_best_dense']:12.3f}"
            )
        else:
            print(name, c)
    keys = ("attn_core", "attn_core_trial_ms", "attn_proj", "attn_proj_trial_ms", "check_gather_rel_err", "check_predictor_rel_err", "check_teal_rel_err", "teal_measured")  # fmt: skip
    print(json.dumps({k: record.get(k) for k in keys}))


if __name__ == "__main__":
    main()
