"""Quality-vs-sparsity frontier of every activation-sparsity rule on the default model (issue 9).

Sparsity = the share of FFN weight bytes a batch-1 decode step does not read (over W_in, W_gate, W_out).
Evaluation: perplexity of the last ``--eval-tokens`` tokens of each ``--corpora`` evaluation split (default:
Austen's Persuasion, 4,096 tokens, non-overlapping 512-token windows: the README's protocol), dense model in
the same run. Calibration: ``--samples`` × ``--seq-len`` windows of the Shakespeare calibration split; the FFN
inputs are captured once on the dense model (one :class:`ffnkit.sparsity.Calibration`) and shared by every
rule and level. Both sparsity measures (share of zeroed activations per site, share of weight bytes skipped)
are counted on the evaluation text itself while its perplexity is measured. No training.

    python benchmarks/sparsity_frontier.py --out benchmarks/results/sparsity_frontier_cpu.json
    python benchmarks/sparsity_frontier.py --levels 0.4 --rules teal,best --samples 4 --eval-tokens 1024 \
        --out /tmp/sparsity_smoke.json      # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from ffnkit.core.archs import find_ffns
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import environment
from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, evaluation_set, load_step, measure
from ffnkit.sparsity import Calibration, SparsityConfig, sparsify_
from ffnkit.sparsity.transform import count_sparsity

RULES = ["teal", "best", "cats", "chess", "stat-topk", "predictor"]
TARGETS = {"0.4": 1.08, "0.5": 1.20}  # best's perplexity at most this × dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="0.4,0.5,0.25,0.65,0.8")  # the targets' levels first
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--corpora", default="austen", help="evaluation corpora, comma-separated")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens per layer for thresholds")
    ap.add_argument("--path-tokens", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--set", action="append", default=[], help="FIELD=VALUE for every SparsityConfig")
    ap.add_argument("--out", default="benchmarks/results/sparsity_frontier_cpu.json")
    args = ap.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    rules = args.rules.split(",")
    extra = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)
    torch.manual_seed(0)

    dense, tok = load_step(PipelineConfig(model="smollm2-135m"))
    evals = {
        c: evaluation_set(PerplexityProtocol(corpus=c, max_tokens=args.eval_tokens, window=512), tok)
        for c in args.corpora.split(",")
    }
    dense_ppl = {c: measure(dense, ev).perplexity for c, ev in evals.items()}
    log(f"dense perplexity {dense_ppl}")
    calib = calibration_batches(load_corpus("shakespeare"), tok, args.samples, args.seq_len, seed=0)
    stats = Calibration.collect(dense, find_ffns(dense), calib, args.tokens)
    log("calibration inputs captured")
    results: list[dict] = []

    def write(done: bool) -> None:
        doc = document(args, levels, rules, results, evals, dense_ppl, t0)
        doc["complete"] = done
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")

    for level in levels:
        for rule in rules:
            fields = dict(
                rule=rule,
                sparsity=level,
                samples=args.samples,
                seq_len=args.seq_len,
                tokens=args.tokens,
                path_tokens=args.path_tokens,
                **extra,
            )
            row: dict = {"rule": rule, "sparsity": level}
            try:
                config = SparsityConfig(**fields)
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                result = sparsify_(model, config, stats=stats)
                row["calibrate_seconds"] = time.perf_counter() - start
            except Exception as err:  # a rule that cannot reach the level (CATS above 2/3) is recorded
                row["error"] = " ".join(str(err).split())
                results.append(row)
                log(f"{level:.0%} {rule:10s} -- {row['error']}")
                continue
            row["allocation"] = config.allocation
            row["calibration_bytes_skipped"] = result.calibration["bytes_skipped"]
            row["layers"] = result.layers
            row["evaluation"] = {}
            for corpus, ev in evals.items():
                with count_sparsity(model) as counted:
                    ppl = measure(model, ev).perplexity
                m = counted()
                row["evaluation"][corpus] = {
                    "perplexity": ppl,
                    "perplexity_vs_dense": ppl / dense_ppl[corpus],
                    "bytes_skipped": m.bytes_skipped,
                    "zeroed": m.zeroed,
                    "layers": [{k: r[k] for k in ("index", "zeroed", "bytes_skipped")} for r in m.layers],
                }
            results.append(row)
            first = next(iter(evals))
            e = row["evaluation"][first]
            log(
                f"{level:.0%} {rule:10s} ppl {e['perplexity']:8.3f} (x{e['perplexity_vs_dense']:.3f}) "
                f"bytes skipped {e['bytes_skipped']:.3f} zeroed {e['zeroed']}"
            )
            del model
            write(done=False)  # partial results survive an interrupted run
    write(done=True)
    log(f"wrote {args.out}")


def document(args, levels, rules, results, evals, dense_ppl, t0) -> dict:
    """The results JSON (also written after every row)."""
    summary: dict = {}
    for corpus in evals:
        per = {}
        for level in levels:
            rows = {
                r["rule"]: r["evaluation"][corpus]
                for r in results
                if r["sparsity"] == level and "evaluation" in r
            }
            if not rows:
                continue
            best, teal = rows.get("best"), rows.get("teal")
            singles = {k: v["perplexity"] for k, v in rows.items() if k != "best"}
            per[str(level)] = {
                "perplexity": {k: v["perplexity"] for k, v in rows.items()},
                "best_vs_dense": best["perplexity_vs_dense"] if best else None,
                "best_vs_teal": best["perplexity"] / teal["perplexity"] if best and teal else None,
                "best_beats_every_single_rule": bool(best)
                and all(best["perplexity"] < v for v in singles.values()),
            }
        summary[corpus] = per
    first = next(iter(evals))
    targets = {
        lv: {
            "target": f"best <= {t} x dense",
            "best_vs_dense": summary[first].get(lv, {}).get("best_vs_dense"),
            "reached": (summary[first].get(lv, {}).get("best_vs_dense") or 99) <= t,
        }
        for lv, t in TARGETS.items()
    }
    return {
        "benchmark": "sparsity_frontier",
        "command": "python " + " ".join(sys.argv),
        "model": "smollm2-135m",
        "sparsity_measure": "share of FFN weight bytes a batch-1 decode step does not read (W_in, W_gate, W_out)",
        "evaluation": {
            c: {"corpus": ev.corpus, "split": ev.split, "tokens": int(ev.tokens.numel()), "window": 512}
            for c, ev in evals.items()
        },
        "calibration": {
            "corpus": "shakespeare",
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seed": 0,
            "tokens_per_layer": args.tokens,
            "path_tokens": args.path_tokens,
        },
        "dense": {"perplexity": dense_ppl},
        "results": results,
        "summary": summary,
        "targets": targets,
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }


if __name__ == "__main__":
    main()
