"""What ``--align N`` costs: ``best`` at 30% of FFN parameters with every kept width a multiple of 1, 32, 256.

Why it matters: llama.cpp quantises each matrix in blocks along its rows; ``ffn_down``'s rows are d_ff
long, so Q8_0/Q4_0 (blocks of 32) need d_ff % 32 == 0 and k-quants d_ff % 256 == 0, else that matrix
stays F16. Protocol (as benchmarks/compress_frontier.py, README "Measuring"): perplexity of the last
4,096 tokens of Austen's Persuasion (evaluation split) in non-overlapping 512-token windows; calibration
32 × 256 tokens of Shakespeare (seed 0); statistics (with Cov(m)) and the per-layer sensitivity curves
measured once on the dense model and shared by the three runs, so the runs differ only in the rounding.
CPU, no healing. ``--save-dir`` also saves each model (for benchmarks/export_llamacpp.py) and then checks
which block types ``ffn_down`` gets: in ffnkit's Q8_0 export, and (with llama-cpp-python) in llama.cpp's
own ``Q4_K_M`` quantisation of the F16 export (``llama_model_quantize``, read back with the gguf package).
``--quant-only`` runs that check on models saved before and adds it to the existing ``--out`` file.

    python benchmarks/export_align.py --aligns 1,32,64,256 --out benchmarks/results/export_align_cpu.json \
        --save-dir /tmp/align
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ffnkit.compress.prune import BEST, PruneConfig, prune_
from ffnkit.compress.scores import collect_stats
from ffnkit.core.archs import find_ffns
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import environment
from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, evaluation_set, load_step, measure


def ffn_down_types(path: Path) -> dict[str, int]:
    """GGML type name -> number of ``blk.*.ffn_down.weight`` tensors in the GGUF file ``path``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors if t.name.endswith("ffn_down.weight")))


def quant_check(save_dir: Path, aligns: list[int]) -> dict[int, dict]:
    """Per align: ``ffn_down``'s types in ffnkit's Q8_0 export and in llama.cpp's Q4_K_M of the F16 export."""
    import ctypes

    from ffnkit.export import ExportConfig, export_loaded
    from ffnkit.io import load

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    out: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for align in aligns:
            model, tok = load(save_dir / f"align{align}")
            q8 = Path(tmp) / "q8.gguf"
            res = export_loaded(model, tok, ExportConfig("gguf", str(q8), dtype="q8_0"))
            row = {
                "q8_0_ffn_down": ffn_down_types(q8),
                "q8_0_fallback_f16": len(res["fallback"]),
                "q8_0_bytes": res["bytes"],
            }
            if llama_cpp is not None:
                f16, qk = Path(tmp) / "f16.gguf", Path(tmp) / "q4km.gguf"
                export_loaded(model, tok, ExportConfig("gguf", str(f16), dtype="f16"))
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
                params.nthread = 1
                rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(qk).encode(), ctypes.byref(params))
                row["q4_k_m_ffn_down"] = (
                    ffn_down_types(qk) if rc == 0 else f"llama_model_quantize failed ({rc})"
                )
                row["q4_k_m_bytes"] = qk.stat().st_size if rc == 0 else None
            out[align] = row
            print(f"align {align}: {row}", file=sys.stderr, flush=True)
            del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--aligns", default="1,32,256")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--save-dir", default="", help="save each pruned model as DIR/align<N>")
    ap.add_argument("--quant-only", action="store_true", help="only the block-type check of --save-dir")
    ap.add_argument("--out", default="benchmarks/results/export_align_cpu.json")
    args = ap.parse_args()
    aligns = [int(a) for a in args.aligns.split(",")]
    if args.quant_only:  # add the block-type check to a finished run
        doc = json.loads(Path(args.out).read_text())
        checks = quant_check(Path(args.save_dir), aligns)
        for r in doc["results"]:
            r.update(checks.get(r["align"], {}))
        doc["quant_check_command"] = "python " + " ".join(sys.argv)
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        return
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)

    dense, tok = load_step(PipelineConfig(model="smollm2-135m"))
    evaluation = evaluation_set(
        PerplexityProtocol(corpus="austen", max_tokens=args.eval_tokens, window=512), tok
    )
    calib = calibration_batches(load_corpus("shakespeare"), tok, args.samples, args.seq_len, seed=0)
    dense_m = measure(dense, evaluation)
    log(f"dense perplexity {dense_m.perplexity:.3f}")
    stats = collect_stats(dense, calib, covariance=True)
    log("statistics collected")
    curves = None
    results = []
    for align in aligns:
        model = copy.deepcopy(dense)
        config = PruneConfig(
            **BEST, ratio=args.ratio, align=align, samples=args.samples, seq_len=args.seq_len
        )
        start = time.perf_counter()
        report = prune_(model, config, calibration=calib, stats=stats, curves=curves)
        seconds = time.perf_counter() - start
        if curves is None:  # the first run measured them: share them with the others
            s = report.sensitivity
            curves = {(int(k), None): (s["ratios"], v) for k, v in s["kl"].items()}
        ppl = measure(model, evaluation)
        widths = [f.d_ff for f in find_ffns(model)]
        results.append(
            {
                "align": align,
                "perplexity": ppl.perplexity,
                "perplexity_vs_dense": ppl.perplexity / dense_m.perplexity,
                "ffn_ratio_removed": report.ffn_ratio_removed,
                "d_ff": widths,
                "widths_multiple_of_32": sum(w % 32 == 0 for w in widths),
                "widths_multiple_of_256": sum(w % 256 == 0 for w in widths),
                "parameters": report.parameters_after,
                "prune_seconds": seconds,
            }
        )
        log(f"align {align:4d}: ppl {ppl.perplexity:.3f}, removed {report.ffn_ratio_removed:.4f}")
        if args.save_dir:
            from ffnkit.io import save

            save(model, tok, Path(args.save_dir) / f"align{align}", report=report, overwrite=True)
        del model
    if args.save_dir:
        checks = quant_check(Path(args.save_dir), aligns)
        for r in results:
            r.update(checks[r["align"]])
    base = results[0]
    for r in results:
        r["perplexity_vs_align1"] = r["perplexity"] / base["perplexity"]
    doc = {
        "benchmark": "export_align",
        "command": "python " + " ".join(sys.argv),
        "model": "smollm2-135m (the GGUF Q4_1 weights of the built-in model, dequantised to float32)",
        "method": {**BEST, "ratio": args.ratio},
        "evaluation": {**dense_m.protocol, "corpus": evaluation.corpus, "split": evaluation.split},
        "calibration": {"corpus": "shakespeare", "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "dense": {"perplexity": dense_m.perplexity, "parameters": dense_m.parameters},
        "results": results,
        "notes": (
            "Statistics and sensitivity curves are shared by the runs (measured in the first); the runs "
            "differ only in rounding the allocated widths to multiples of 'align' (largest remainder, total "
            "kept within one step). CPU, shared 2-core machine."
        ),
        "seconds": time.perf_counter() - t0,
        "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
