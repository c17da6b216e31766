"""Benchmark: which healing recipe recovers the most perplexity for a fixed number of training tokens.

The healing goal is set in wall-clock time on 2 CPU cores; a CPU run of one recipe takes 10 minutes, so
the recipes are compared here at a fixed token budget (what the CPU gets through in its 10 minutes, see
heal_best.py's ``tokens_seen``), which any device can run quickly. The winner is then confirmed on the
CPU under the real time budget by heal_best.py. Pruning as in the goal: ``best`` (FLAP scores, global
allocation, W_out refit) at 30% of FFN parameters. Perplexity: last 4,096 tokens of Persuasion.

Run:  python benchmarks/heal_sweep.py --device cuda --tokens 96000 --out benchmarks/results/heal_sweep_h200.json
Smoke run:  python benchmarks/heal_sweep.py --tokens 2048 --recipes "ffn lr3e-4" --eval-tokens 512 --out /tmp/sweep.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

# name → (corpus the pruning calibrates on, HealConfig fields)
RECIPES: dict[str, tuple[str, dict]] = {
    "ffn lr1e-4": ("shakespeare", {"lr": 1e-4}),
    "ffn lr3e-4": ("shakespeare", {"lr": 3e-4}),
    "ffn lr1e-3": ("shakespeare", {"lr": 1e-3}),
    "blocks lr1e-4": ("shakespeare", {"lr": 1e-4, "params": "blocks"}),
    "blocks lr3e-4": ("shakespeare", {"lr": 3e-4, "params": "blocks"}),
    "blocks lr1e-3": ("shakespeare", {"lr": 1e-3, "params": "blocks"}),
    "ffn lr3e-4 hidden1": ("shakespeare", {"lr": 3e-4, "hidden_weight": 1.0}),
    "blocks lr3e-4 hidden1": ("shakespeare", {"lr": 3e-4, "params": "blocks", "hidden_weight": 1.0}),
    "ffn lr3e-4 seq128": ("shakespeare", {"lr": 3e-4, "seq_len": 128, "batch_size": 8, "samples": 512}),
    "ffn lr3e-4 seq512": ("shakespeare", {"lr": 3e-4, "seq_len": 512, "batch_size": 2, "samples": 128}),
    "ffn lr3e-4 final0": ("shakespeare", {"lr": 3e-4, "final_lr": 0.0}),
    "ffn lr3e-4 samples512": ("shakespeare", {"lr": 3e-4, "samples": 512}),
    "ffn lr3e-4 heal-austen": ("shakespeare", {"lr": 3e-4, "corpus": "austen"}),
    "blocks lr3e-4 heal-austen": ("shakespeare", {"lr": 3e-4, "params": "blocks", "corpus": "austen"}),
    "ffn lr3e-4 all-austen": ("austen", {"lr": 3e-4, "corpus": "austen"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--tokens", type=int, default=96_000, help="training tokens per recipe")
    ap.add_argument("--recipes", default="", help="comma-separated names (default: all)")
    ap.add_argument("--extra", default="", help="JSON {name: [prune corpus, HealConfig fields]} added")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (fewer: a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/heal_sweep.json")
    args = ap.parse_args()

    from ffnkit.evaluate import environment
    from ffnkit.pipeline import (
        PerplexityProtocol,
        PipelineConfig,
        Step,
        evaluation_set,
        heal_config,
        heal_step,
        load_step,
        measure,
        run_step,
    )

    recipes = dict(RECIPES)
    recipes.update({k: tuple(v) for k, v in json.loads(args.extra or "{}").items()})
    names = [n.strip() for n in args.recipes.split(",") if n.strip()] or list(recipes)
    model, tok = load_step(PipelineConfig(model=args.model, device=args.device))
    evaluation = evaluation_set(PerplexityProtocol(corpus="austen", max_tokens=args.eval_tokens), tok)
    dense = measure(model, evaluation).perplexity
    reference = copy.deepcopy(model).eval()
    pruned: dict[str, torch.nn.Module] = {}
    results = []
    for name in names:
        prune_corpus, fields = recipes[name]
        if prune_corpus not in pruned:
            m = copy.deepcopy(reference)
            step = Step("flap", {"ratio": args.ratio, "allocation": "global", "reconstruct": True})
            run_step(m, step, tokenizer=tok, corpus=prune_corpus)
            pruned[prune_corpus] = m
        model = copy.deepcopy(pruned[prune_corpus])
        before = measure(model, evaluation).perplexity
        config = heal_config({"max_minutes": 600.0, **fields})
        config.steps = max(1, args.tokens // (config.batch_size * config.seq_len))
        t0 = time.time()
        report = heal_step(model, reference, config.to_dict(), tokenizer=tok)
        seconds = time.time() - t0
        after = measure(model, evaluation).perplexity
        row = {
            "recipe": name,
            "prune_corpus": prune_corpus,
            "heal": config.to_dict(),
            "tokens_seen": report.tokens_seen,
            "pruned_perplexity": before,
            "healed_perplexity": after,
            "healed_over_dense": after / dense,
            "kl_first_last10": [
                report.loss_curve[0],
                sum(report.loss_curve[-10:]) / len(report.loss_curve[-10:]),
            ],
            "trainable_parameters": report.trainable_parameters,
            "seconds": seconds,
        }
        results.append(row)
        print(
            json.dumps({k: row[k] for k in ("recipe", "pruned_perplexity", "healed_perplexity", "seconds")}),
            flush=True,
        )
        del model
    doc = {
        "benchmark": "healing recipes at a fixed token budget (best pruning at the given ratio)",
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "device": args.device,
        "dense_perplexity": dense,
        "ratio": args.ratio,
        "tokens_per_recipe": args.tokens,
        "results": results,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    main()
