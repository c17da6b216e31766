"""Benchmark: the default model's perplexity (the documented protocol) and decode speed, CPU or CUDA.

Run:  python benchmarks/foundation_eval.py [--device cpu|cuda] [--out benchmarks/results/foundation_eval_cpu.json]
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--corpora", default="shakespeare,austen")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/foundation_eval_cpu.json")
    args = ap.parse_args()

    from ffnkit.core.archs import find_ffns
    from ffnkit.data import evaluation_tokens, load_corpus
    from ffnkit.evaluate import count_parameters, decode_speed, environment, peak_memory, perplexity
    from ffnkit.sources.models import load_model

    start = time.time()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    load_s = time.time() - start
    results = {}
    for name in args.corpora.split(","):
        corpus = load_corpus(name)
        tokens = evaluation_tokens(corpus, tok)
        t0 = time.time()
        result, memory = peak_memory(perplexity, model, tokens, progress=False)
        results[name] = {
            "perplexity": result.perplexity,
            "protocol": result.protocol,
            "split": corpus.split_info(),
            "seconds": time.time() - t0,
            "peak_memory": memory,
        }
    speed = decode_speed(model, tok, new_tokens=args.new_tokens)
    doc = {
        "benchmark": "perplexity under the documented protocol and batch-1 greedy decode speed",
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "load_seconds": load_s,
        "parameters": count_parameters(model, find_ffns(model)),
        "perplexity": results,
        "decode_speed": speed,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps({k: {"perplexity": v["perplexity"]} for k, v in results.items()}), speed["tokens_per_s"])


if __name__ == "__main__":
    main()
