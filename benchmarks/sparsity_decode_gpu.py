"""Benchmark: greedy decode of a Llama-3-8B-shaped model, dense FFN vs sparse FFN kernels, tokens/s.

The model is a minimal Llama decoder written here with the shapes and operations of Llama-3-8B (32 layers,
d 4096, d_ff 14336, 32 query / 8 key-value heads of 128, vocab 128256, RMSNorm, rotary embeddings, GQA
attention over a static KV cache, SwiGLU FFN), random bf16 weights (speed does not depend on the values).
One decode step (embedding -> 32 layers -> lm_head -> argmax -> next token and position written back on the
device) is captured in a CUDA graph per configuration, so Python overhead does not hide the FFN (the
RMSNorm, SwiGLU product and rotary/KV-cache/attention core are torch.compile'd first, same for every
configuration, so they take fewer launches; ``--no-compile`` keeps them eager); each
configuration replays its graph for ``--tokens`` tokens from a random 128-token cache, configurations
alternate within every round, and the median over rounds is reported (warm-up and compilation excluded).

Configurations: ``dense`` (cuBLAS via nn.Linear); ``gather_L`` for each level L: the FFN replaced by
:func:`make_sparse_ffn` (predictor-style: a fixed random active set of (1 - L) of the neurons per layer,
:func:`ffnkit.kernels.gather_ffn` on the packed neuron-major weights; fine for speed with random weights);
``teal_ffn_50``: TEAL on the FFN (thresholds calibrated per layer on decode inputs so 50% of the inputs and
of the intermediates fall below them, :func:`ffnkit.kernels.teal_ffn`); ``teal_ffn_attn_50``: TEAL on the
attention projections too (q/k/v fused, o). The measured share of kept inputs of each TEAL site is reported.
Every configuration is captured in a CUDA graph, which is the check that the kernels are capturable at
decode (no host sync, fixed shapes).

Run:  python benchmarks/sparsity_decode_gpu.py --out benchmarks/results/sparsity_decode_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ffnkit.kernels import gather_ffn, pack_ffn, pack_teal, sparse_input_linear, teal_ffn
from ffnkit.kernels.benchmark import environment

D, FF, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 32, 8, 128, 128256


def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, 1e-5)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def attn_core(qkv, cos, sin, k_cache, v_cache, pos, bias) -> torch.Tensor:
    """Rotary embedding, KV-cache write and GQA attention of one token over the static cache."""
    nq = (HEADS + KV_HEADS) * HEAD_DIM
    qk = qkv[:, :nq].reshape(HEADS + KV_HEADS, HEAD_DIM)  # [H + KV, hd]
    half = HEAD_DIM // 2
    qk = qk * cos + torch.cat([-qk[:, half:], qk[:, :half]], -1) * sin
    q = qk[:HEADS].reshape(KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)  # [KV, G, hd]: heads grouped per KV head
    k_cache.index_copy_(2, pos, qk[HEADS:].reshape(1, KV_HEADS, 1, HEAD_DIM))
    v_cache.index_copy_(2, pos, qkv[:, nq:].reshape(1, KV_HEADS, 1, HEAD_DIM))
    s = torch.baddbmm(bias, q, k_cache[0].transpose(1, 2), alpha=HEAD_DIM**-0.5)  # [KV, G, L]
    p = s.softmax(-1, dtype=torch.float32).to(qkv.dtype)
    return torch.bmm(p, v_cache[0]).reshape(1, HEADS * HEAD_DIM)  # [1, H * hd]


# the small ops of a step; main() may replace them with torch.compile'd versions (fewer kernel launches)
FNS = {"rms_norm": rms_norm, "swiglu": swiglu, "attn_core": attn_core}


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device="cuda", dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FNS["rms_norm"](x, self.weight)


class MLP(nn.Module):
    """The Llama / Hugging Face FFN: down(silu(gate x) * up x)."""

    def __init__(self, d: int, f: int):
        super().__init__()
        kw = {"bias": False, "device": "cuda", "dtype": torch.bfloat16}
        self.gate_proj, self.up_proj, self.down_proj = (
            nn.Linear(d, f, **kw),
            nn.Linear(d, f, **kw),
            nn.Linear(f, d, **kw),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(FNS["swiglu"](self.gate_proj(x), self.up_proj(x)))


class Attention(nn.Module):
    def __init__(self, max_len: int):
        super().__init__()
        kw = {"bias": False, "device": "cuda", "dtype": torch.bfloat16}
        self.qkv = nn.Linear(D, (HEADS + 2 * KV_HEADS) * HEAD_DIM, **kw)  # q, k, v fused
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, D, **kw)
        self.k_cache = torch.randn(1, KV_HEADS, max_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        self.v_cache = torch.randn(1, KV_HEADS, max_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias
    ) -> torch.Tensor:
        o = FNS["attn_core"](self.qkv(x), cos, sin, self.k_cache, self.v_cache, pos, bias)
        return self.o_proj(o)  # [1, D]


class Layer(nn.Module):
    def __init__(self, max_len: int):
        super().__init__()
        self.input_norm, self.post_norm = RMSNorm(D), RMSNorm(D)
        self.attn, self.mlp = Attention(max_len), MLP(D, FF)

    def forward(self, x, pos, cos, sin, mask):
        x = x + self.attn(self.input_norm(x), pos, cos, sin, mask)
        return x + self.mlp(self.post_norm(x))


class Model(nn.Module):
    def __init__(self, layers: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D, device="cuda", dtype=torch.bfloat16)
        self.layers = nn.ModuleList([Layer(max_len) for _ in range(layers)])
        self.norm = RMSNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False, device="cuda", dtype=torch.bfloat16)
        inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
        ang = torch.arange(max_len, device="cuda").float()[:, None] * inv[None, :]  # [L, hd/2]
        self.cos = torch.cat([ang.cos(), ang.cos()], -1).to(torch.bfloat16)  # [L, hd]
        self.sin = torch.cat([ang.sin(), ang.sin()], -1).to(torch.bfloat16)
        self.positions = torch.arange(max_len, device="cuda")

    def forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(tok)  # [1, D]
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # [1, hd]
        # additive mask over the static cache: no host sync, fixed shapes
        bias = torch.where(self.positions <= pos, 0.0, float("-inf")).to(x.dtype).view(1, 1, -1)  # [1, 1, L]
        for layer in self.layers:
            x = layer(x, pos, cos, sin, bias)
        return self.lm_head(self.norm(x))  # [1, V]


# ------------------------------------------------------------------------------------------ sparse FFNs


class GatherFFN(nn.Module):
    """The FFN over a fixed active set of neurons through :func:`ffnkit.kernels.gather_ffn`."""

    def __init__(self, packed: torch.Tensor, idx: torch.Tensor):
        super().__init__()
        self.packed, self.idx = packed, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_ffn(x, self.packed, self.idx)


def make_sparse_ffn(mlp: nn.Module, level: float) -> nn.Module:
    """The sparse FFN of this harness: ``mlp``'s weights packed neuron-major and a fixed random active set
    of round((1 - level) * d_ff) neurons (predictor-style; one replaceable function, so a SparseFFN module
    can be plugged in here later).

    Example:
        >>> ffn = make_sparse_ffn(model.layers[0].mlp, 0.5)  # doctest: +SKIP
    """
    f = mlp.gate_proj.weight.shape[0]
    packed = pack_ffn(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data)
    keep = round((1 - level) * f)
    idx = torch.randperm(f, device=packed.device)[:keep].sort().values
    return GatherFFN(packed, idx)


class TealFFN(nn.Module):
    def __init__(self, mlp: nn.Module, t_in: float, t_mid: float):
        super().__init__()
        self.w = pack_teal(mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data)
        self.t_in, self.t_mid, self.stats = t_in, t_mid, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:  # eager measuring pass only (syncs; never inside a graph)
            f = self.w.down_t.shape[0]
            gu = (torch.where(x.abs() >= self.t_in, x, 0) @ self.w.gate_up_t).float()  # [1, 2F]
            h = F.silu(gu[:, :f]) * gu[:, f:]  # [1, F]
            kept_in = float((x.abs() >= self.t_in).float().mean())
            self.stats.append((kept_in, float((h.abs() >= self.t_mid).float().mean())))
        return teal_ffn(x, self.w, self.t_in, self.t_mid)


class TealLinear(nn.Module):
    def __init__(self, linear: nn.Linear, t: float):
        super().__init__()
        self.w_t, self.t, self.stats = linear.weight.data.T.contiguous(), t, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            self.stats.append(float((x.abs() >= self.t).float().mean()))
        return sparse_input_linear(x, self.w_t, self.t)


def calibrate(model: Model, tokens: int, level: float) -> dict[str, list[float]]:
    """Per-layer thresholds that drop ``level`` of the inputs of each site, from ``tokens`` eager decode steps."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        for name, mod in (
            ("ffn", layer.mlp),
            ("qkv", layer.attn.qkv),
            ("o", layer.attn.o_proj),
            ("mid", layer.mlp.down_proj),
        ):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda m, a, key=f"{name}{i}": seen.setdefault(key, []).append(
                        a[0].detach().float().abs().flatten()
                    )
                )
            )
    tok = torch.randint(0, VOCAB, (1,), device="cuda")
    with torch.no_grad():
        for p in range(tokens):
            tok = model(tok, torch.tensor([p], device="cuda")).argmax(-1)
    for h in hooks:
        h.remove()
    return {k: float(torch.quantile(torch.cat(v), level)) for k, v in seen.items()}


# ------------------------------------------------------------------------------------------- harness


def compile_small_ops(max_len: int) -> str:
    """torch.compile the norm, SwiGLU product and attention core (each checked against eager on random
    inputs); any that fails stays eager. Returns what happened."""
    args = {
        "rms_norm": (
            torch.randn(1, D, device="cuda", dtype=torch.bfloat16),
            torch.rand(D, device="cuda", dtype=torch.bfloat16),
        ),
        "swiglu": tuple(torch.randn(1, FF, device="cuda", dtype=torch.bfloat16) for _ in range(2)),
    }
    pos = torch.tensor([5], device="cuda")
    bias = (
        torch.where(torch.arange(max_len, device="cuda") <= pos, 0.0, float("-inf"))
        .to(torch.bfloat16)
        .view(1, 1, -1)
    )
    kv = [torch.randn(1, KV_HEADS, max_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    cos_sin = [torch.rand(1, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    qkv = torch.randn(1, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    args["attn_core"] = (qkv, *cos_sin, kv[0], kv[1], pos, bias)
    done = []
    for name, fn in list(FNS.items()):
        try:
            c = torch.compile(fn, dynamic=False)
            a1 = [t.clone() for t in args[name]]
            a2 = [t.clone() for t in args[name]]
            got, want = c(*a1), fn(*a2)
            err = float((got.float() - want.float()).norm() / want.float().norm())
            if err > 2e-2:
                raise ValueError(f"compiled {name} differs from eager: {err}")
            FNS[name] = c
            done.append(name)
        except Exception as exc:  # keep eager
            print(f"compile {name} failed: {exc!r}"[:300], flush=True)
    return ",".join(done) or "none"


def capture(model: Model, tok: torch.Tensor, pos: torch.Tensor, start: int) -> torch.cuda.CUDAGraph:
    def step():
        nxt = model(tok, pos).argmax(-1)
        tok.copy_(nxt)
        pos.add_(1)

    with torch.no_grad():
        pos.fill_(start)
        step()  # compile the kernels outside the capture
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
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--levels", default="0.25,0.4,0.5,0.65")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-teal", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="keep the small ops eager (more launches)")
    args = ap.parse_args()
    torch.manual_seed(0)
    start, max_len = 128, 128 + 2 * args.tokens + 8
    compiled = compile_small_ops(max_len) if not args.no_compile else "off"
    model = Model(args.layers, max_len)
    dense_mlps = [layer.mlp for layer in model.layers]
    dense_attn = [(layer.attn.qkv, layer.attn.o_proj) for layer in model.layers]
    record = {
        "benchmark": "sparsity_decode_gpu",
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment("cuda"),
        "model": {"layers": args.layers, "d_model": D, "d_ff": FF, "heads": HEADS, "kv_heads": KV_HEADS,
                  "vocab": VOCAB, "dtype": "bfloat16", "cache_start": start,
                  "weight_bytes": sum(p.numel() * 2 for p in model.parameters()),
                  "ffn_weight_bytes": sum(p.numel() * 2 for m in dense_mlps for p in m.parameters())},
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "small_ops_compiled": compiled,
        "configs": {},
    }  # fmt: skip

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")

    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    configs: dict[str, dict] = {}

    def add(name: str, ffns: list[nn.Module], attn: list | None = None, info: dict | None = None) -> None:
        for layer, ffn in zip(model.layers, ffns, strict=True):
            layer.mlp = ffn
        saved_attn = [(layer.attn.qkv, layer.attn.o_proj) for layer in model.layers]
        if attn is not None:
            for layer, (q, o) in zip(model.layers, attn, strict=True):
                layer.attn.qkv, layer.attn.o_proj = q, o
        try:
            g = capture(model, tok, pos, start)
            configs[name] = {"graph": g, "keep": (ffns, attn)}
            record["configs"][name] = {"captured": True, **(info or {})}
        except Exception as exc:
            record["configs"][name] = {"error": repr(exc)[:400], **(info or {})}
            print(name, "failed:", repr(exc)[:400], flush=True)
        for layer, (q, o) in zip(model.layers, saved_attn, strict=True):
            layer.attn.qkv, layer.attn.o_proj = q, o
        save()

    add("dense", dense_mlps, info={"ffn": "nn.Linear (cuBLAS)", "ffn_bytes_skipped": 0.0})
    # a kernel check on layer 0 before timing: the 50% gather equals the masked dense reference
    with torch.no_grad():
        probe = make_sparse_ffn(dense_mlps[0], 0.5)
        x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
        ref = gather_ffn(x, probe.packed, probe.idx, backend="reference")
        record["check_gather_rel_err"] = float((probe(x).float() - ref.float()).norm() / ref.float().norm())
        del probe
    for level in [float(v) for v in args.levels.split(",")]:
        with torch.no_grad():
            ffns = [make_sparse_ffn(m, level) for m in dense_mlps]
        add(
            f"gather_{round(level * 100)}",
            ffns,
            info={"ffn": "make_sparse_ffn (gather, fixed random set)", "ffn_bytes_skipped": level},
        )
    if not args.no_teal:
        for layer, m in zip(model.layers, dense_mlps, strict=True):
            layer.mlp = m
        thr = calibrate(model, 16, 0.5)
        record["teal_thresholds_first_layer"] = {
            k: v for k, v in thr.items() if k.endswith("0") and len(k) <= 4
        }
        with torch.no_grad():
            teal = [TealFFN(m, thr[f"ffn{i}"], thr[f"mid{i}"]) for i, m in enumerate(dense_mlps)]
            attn = [
                (TealLinear(layer.attn.qkv, thr[f"qkv{i}"]), TealLinear(layer.attn.o_proj, thr[f"o{i}"]))
                for i, layer in enumerate(model.layers)
            ]
        add(
            "teal_ffn_50",
            teal,
            info={"ffn": "teal_ffn, thresholds at the 50% quantile of 16 calibration steps"},
        )
        add(
            "teal_ffn_attn_50",
            teal,
            attn,
            info={"ffn": "teal_ffn", "attention": "sparse_input_linear on qkv and o, 50% quantile"},
        )
        # measured kept shares on fresh decode steps (eager, outside the timing)
        for layer, m, (q, o) in zip(model.layers, teal, attn, strict=True):
            layer.mlp, layer.attn.qkv, layer.attn.o_proj = m, q, o
            m.stats, q.stats, o.stats = [], [], []
        with torch.no_grad():
            t = torch.randint(0, VOCAB, (1,), device="cuda")
            for p in range(start, start + 16):
                t = model(t, torch.tensor([p], device="cuda")).argmax(-1)
        kin = statistics.mean(s[0] for m in teal for s in m.stats)
        kmid = statistics.mean(s[1] for m in teal for s in m.stats)
        kattn = statistics.mean(v for q, o in attn for v in q.stats + o.stats)
        record["teal_measured"] = {"ffn_inputs_kept": round(kin, 4), "ffn_intermediates_kept": round(kmid, 4),
                                   "ffn_bytes_skipped": round(1 - (2 * kin + kmid) / 3, 4), "attn_inputs_kept": round(kattn, 4)}  # fmt: skip
        for m, (q, o) in zip(teal, attn, strict=True):
            m.stats = q.stats = o.stats = None
        for layer, (q, o) in zip(model.layers, dense_attn, strict=True):
            layer.attn.qkv, layer.attn.o_proj = q, o
        save()
    # timing: configurations alternate within every round
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for name, c in configs.items():
            pos.fill_(start)
            c["graph"].replay()
            c["graph"].replay()
            torch.cuda.synchronize()
            pos.fill_(start)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(args.tokens):
                c["graph"].replay()
            e.record()
            e.synchronize()
            times[name].append(s.elapsed_time(e) / 1e3 / args.tokens)
    dense_s = statistics.median(times["dense"])
    for name, ts in times.items():
        med = statistics.median(ts)
        record["configs"][name].update(
            ms_per_token=round(med * 1e3, 3), tokens_per_s=round(1 / med, 1), speedup_vs_dense=round(dense_s / med, 3),
            rounds_ms=[round(t * 1e3, 3) for t in ts],
        )  # fmt: skip
    save()
    print(f"{'config':20s} {'ms/token':>9s} {'tok/s':>8s} {'x dense':>8s}")
    for name, c in record["configs"].items():
        if "ms_per_token" in c:
            print(
                f"{name:20s} {c['ms_per_token']:9.3f} {c['tokens_per_s']:8.1f} {c['speedup_vs_dense']:8.3f}"
            )
        else:
            print(name, c)
    print(json.dumps({k: record.get(k) for k in ("check_gather_rel_err", "teal_measured")}))


if __name__ == "__main__":
    main()
