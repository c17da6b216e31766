"""Cost of best's W_out refit (``ffnkit.sparsity.refit.refit_out_``) for one FFN: seconds and peak memory.

The refit streams the normal equations of a [d_ff, d_ff] least-squares problem in float64 and solves it once
per layer, so its cost grows with d_ff² (memory) and d_ff³ (the solve). This times it on one FFN of a given
shape (random weights: the cost does not depend on the values), TEAL-style masks at the 50% quantiles of the
inputs and intermediates, ``--tokens`` calibration tokens. Multiply by the number of layers for a model.

    python benchmarks/sparsity_refit_cost.py --shape smollm2 --device cpu --out /tmp/refit_cost_cpu.json
    PYTHONPATH=src python benchmarks/sparsity_refit_cost.py --shape llama3-8b --device cuda \
        --out $OUT/sparsity_refit_cost_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ffnkit.core.archs import find_ffns
from ffnkit.evaluate import environment
from ffnkit.sparsity.calibrate import LayerPlan, build_sparse
from ffnkit.sparsity.refit import refit_out_

SHAPES = {"smollm2": (576, 1536), "llama3-8b": (4096, 14336)}  # (d_model, d_ff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ridge", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    d, f = SHAPES[args.shape]
    config = LlamaConfig(
        vocab_size=256, hidden_size=d, intermediate_size=f, num_hidden_layers=1,
        num_attention_heads=max(d // 128, 1), num_key_value_heads=max(d // 512, 1),
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    ffn = find_ffns(model)[0]
    x = torch.randn(args.tokens, d, device=args.device, dtype=torch.float32)
    with torch.no_grad():
        g = x.to(dtype) @ ffn.W_gate.T
        h = (torch.nn.functional.silu(g) * (x.to(dtype) @ ffn.W_in.T)).float()
    sample = torch.randperm(args.tokens)[:512]  # quantile() takes at most 16M entries
    t_in = float(x[sample].abs().flatten().quantile(0.5))
    t_mid = float(h[sample].abs().flatten().quantile(0.5))
    del g, h
    module = build_sparse(ffn, "input")
    LayerPlan(index=ffn.index, t_in=t_in, t_mid=t_mid).apply(module)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    report = refit_out_(module, ffn, x, ridge=args.ridge)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    doc = {
        "benchmark": "sparsity_refit_cost",
        "command": "python " + " ".join(sys.argv),
        "shape": {"name": args.shape, "d_model": d, "d_ff": f},
        "device": args.device,
        "dtype": str(dtype),
        "tokens": args.tokens,
        "ridge": args.ridge,
        "seconds_per_layer": seconds,
        "peak_extra_memory_GB": (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else None,
        "refit": report,
        "environment": environment(),
    }
    print(json.dumps({k: doc[k] for k in ("shape", "device", "seconds_per_layer", "peak_extra_memory_GB", "refit")}))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
