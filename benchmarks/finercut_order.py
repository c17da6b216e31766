"""Benchmark: FinerCut's full greedy removal order on the default model (every attention and FFN sublayer).

The greedy loop is O(L²) forwards (≈1,800 for 60 sublayers), affordable on a GPU. Calibration follows
FinerCut: 10 samples × 256 tokens (here from the default corpus' calibration split).

Run:  python benchmarks/finercut_order.py --device cuda --out benchmarks/results/finercut_order_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="Stop after N removals (default: all).")
    ap.add_argument("--out", default="benchmarks/results/finercut_order_cpu.json")
    args = ap.parse_args()

    from ffnkit.data import calibration_batches, load_corpus
    from ffnkit.evaluate import environment
    from ffnkit.inspect.importance import block_influence, finercut
    from ffnkit.sources.models import load_model

    model, tok = load_model(args.model, device=args.device)
    batches = calibration_batches(load_corpus(args.corpus), tok, n_samples=args.samples, seq_len=args.seq_len)
    t0 = time.time()
    order = finercut(model, batches, steps=args.steps, progress=True)
    seconds = time.time() - t0
    bi = block_influence(model, batches)
    quarter = order.order[: len(order.order) // 4]
    doc = {
        "benchmark": "FinerCut greedy sublayer removal order (JS divergence of next-token distributions)",
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "calibration": {"corpus": args.corpus, "samples": args.samples, "seq_len": args.seq_len},
        "seconds": seconds,
        "finercut": order.to_dict(),
        "first_quarter": {
            "removed": [r["name"] for r in quarter],
            "attention": sum(r["kind"] == "attn" for r in quarter),
            "ffn": sum(r["kind"] == "ffn" for r in quarter),
            "js_after": quarter[-1]["js"] if quarter else 0.0,
        },
        "shortgpt": bi.to_dict(),
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
    print(
        json.dumps({"seconds": seconds, "first": [(r["name"], round(r["js"], 4)) for r in order.order[:15]]})
    )


if __name__ == "__main__":
    main()
