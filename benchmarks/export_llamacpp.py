"""llama.cpp runs ffnkit's exports: greedy text equal to ffnkit's, and its decode speed dense vs ``best`` 30%.

Needs llama-cpp-python (``pip install llama-cpp-python``: builds llama.cpp from its source distribution).
For the dense default model and ``best`` at 30% (a folder saved by ``ffnkit compress`` or
benchmarks/export_align.py), each exported to GGUF in every ``--dtypes``: greedy decoding of
``--new-tokens`` tokens from each prompt in llama.cpp (top-k 1, no repetition penalty; the prompt given
as ffnkit's token ids) against ffnkit's own greedy ``generate`` (float32), token for token; then
llama.cpp's decode speed (tokens/s after the prompt, batch 1, ``--threads`` threads), dense and pruned
alternated, median of ``--repeats``.

    python benchmarks/export_llamacpp.py --best /tmp/align/align32 --out benchmarks/results/export_llamacpp_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ffnkit.evaluate import environment
from ffnkit.export import ExportConfig, export_loaded

PROMPTS = [
    "The king said to his daughter",
    "Once upon a time, in a small village,",
    "The capital of France is",
]


def ffnkit_greedy(model, ids: list[int], n: int) -> list[int]:
    """ffnkit's greedy tokens: at most ``n``, ending at the end-of-sequence token if it comes first."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def llama_greedy(llm, ids: list[int], n: int, eos: int | None = None) -> tuple[list[int], float]:
    """Greedy tokens (stopping after ``eos`` when given) and decode seconds (after the first token, which
    includes the prompt)."""
    llm.reset()
    out, first = [], None
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if first is None:
            first = time.perf_counter()
        if len(out) == n or int(tok) == eos:
            break
    return out, time.perf_counter() - first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--best", required=True, help="folder of best at 30% (ffnkit compress ... -o DIR)")
    ap.add_argument("--dtypes", default="f32,f16,q8_0")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/export_llamacpp_cpu.json")
    args = ap.parse_args()
    import llama_cpp

    from ffnkit import load, load_model

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)
    models = {"dense": load_model("smollm2-135m"), "best30": load(args.best)}
    tok = models["dense"][1]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    reference = {
        name: [ffnkit_greedy(m, ids, args.new_tokens) for ids in prompts] for name, (m, _) in models.items()
    }
    log("ffnkit greedy done")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            llms, exports = {}, {}
            for name, (model, mtok) in models.items():
                path = Path(tmp) / f"{name}-{dtype}.gguf"
                exports[name] = export_loaded(model, mtok, ExportConfig("gguf", str(path), dtype=dtype))
                llms[name] = llama_cpp.Llama(
                    str(path), n_ctx=256, n_threads=args.threads, n_batch=64, verbose=False, seed=0
                )
            for name, llm in llms.items():
                got = [llama_greedy(llm, ids, args.new_tokens, tok.eos_token_id)[0] for ids in prompts]
                same = [g == r for g, r in zip(got, reference[name], strict=True)]
                prefix = [  # first differing position (the shorter length when one is a prefix)
                    next(
                        (i for i, (a, b) in enumerate(zip(g, r, strict=False)) if a != b), min(len(g), len(r))
                    )
                    for g, r in zip(got, reference[name], strict=True)
                ]
                rows.append(
                    {
                        "model": name,
                        "dtype": dtype,
                        "architecture": exports[name]["architecture"],
                        "gguf_bytes": exports[name]["bytes"],
                        "fallback_f16": exports[name]["fallback"],
                        "greedy_equal": sum(same),
                        "prompts": len(prompts),
                        "first_difference_at": prefix,
                        "llama_cpp_text": [tok.decode(g) for g in got],
                        "ffnkit_text": [tok.decode(r) for r in reference[name]],
                    }
                )
                log(f"{name} {dtype}: greedy equal {sum(same)}/{len(prompts)}")
            speeds: dict[str, list[float]] = {n: [] for n in llms}
            for _ in range(args.repeats):
                for name, llm in llms.items():
                    _, secs = llama_greedy(llm, prompts[0], args.new_tokens)
                    speeds[name].append((args.new_tokens - 1) / secs)
            for row in rows:
                if row["dtype"] == dtype:
                    row["tokens_per_s"] = statistics.median(speeds[row["model"]])
                    row["tokens_per_s_runs"] = speeds[row["model"]]
            dense, best = (statistics.median(speeds[n]) for n in ("dense", "best30"))
            log(f"{dtype}: {dense:.1f} vs {best:.1f} tokens/s ({best / dense:.2f}x)")
            for llm in llms.values():
                llm.close()
    doc = {
        "benchmark": "export_llamacpp",
        "command": "python " + " ".join(sys.argv),
        "models": {"dense": "smollm2-135m", "best30": str(args.best)},
        "llama_cpp_python": getattr(llama_cpp, "__version__", None),
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "results": rows,
        "speedup": {
            d: next(r["tokens_per_s"] for r in rows if r["dtype"] == d and r["model"] == "best30")
            / next(r["tokens_per_s"] for r in rows if r["dtype"] == d and r["model"] == "dense")
            for d in args.dtypes.split(",")
        },
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "notes": (
            "CPU, shared 2-core machine: speeds are noisy under load (see load_average); dense and pruned run "
            "alternately, so their ratio is side by side. Greedy agreement is against ffnkit's float32 generate "
            "(both stop at the end-of-sequence token or new_tokens); a quantised export can differ from it."
        ),
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
