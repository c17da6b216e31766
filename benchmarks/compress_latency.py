"""Benchmark: CPU latency of every shape in the compression frontier, measured on an idle machine.

Latency depends only on the shapes (FFN widths, low-rank ranks, an added b_out), not on the weights, so
each distinct shape of the perplexity frontiers (compress_frontier_cpu.json and compress_frontier_sensitivity_h200.json: per-layer d_ff of each row;
compress_lowrank.json: the uniform rank at each ratio) is rebuilt on the dense model without any
calibration and timed against the dense model in the same process, the two alternated in every round:
a 1×512 forward (no cache) and greedy decode tokens/s at batch 1 (32 new tokens after the default prompt).
With ``--update`` the rows of those files get the new numbers (their old latencies were taken while five
jobs shared the two cores) and a ``latency_remeasured`` record pointing here.

Run:  python benchmarks/compress_latency.py --rounds 5 --update --out benchmarks/results/compress_latency_cpu.json
      python benchmarks/compress_latency.py --sublayers --rounds 5 --update \
          --out benchmarks/results/compress_latency_sublayers_cpu.json   # FinerCut / ShortGPT removals
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FRONTIERS = ("compress_frontier_cpu.json", "compress_frontier_sensitivity_h200.json")


def _pruned_key(row: dict) -> str:
    """Rows with the same widths and the same added bias share one shape (and one measurement)."""
    bias = bool(row.get("bias_compensation") or row.get("reconstruct"))
    return f"widths:{','.join(map(str, row['d_ff']))}:bias={bias}"


def forward_s(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start


def measure(dense, model, tok, ids: torch.Tensor, rounds: int, new_tokens: int) -> dict:
    """Medians over ``rounds`` of forward seconds and decode tokens/s, dense and candidate alternated."""
    from ffnkit.evaluate import decode_speed

    fwd: dict[str, list[float]] = {"dense": [], "model": []}
    dec: dict[str, list[float]] = {"dense": [], "model": []}
    for m in (dense, model):  # warm-up (the first generate call also builds its configs)
        forward_s(m, ids)
        decode_speed(m, tok, new_tokens=4, repeats=1, warmup=0)
    for _ in range(rounds):
        for key, m in (("dense", dense), ("model", model)):
            fwd[key].append(forward_s(m, ids))
            dec[key].append(decode_speed(m, tok, new_tokens=new_tokens, repeats=1, warmup=0)["tokens_per_s"])
    f = {k: statistics.median(v) for k, v in fwd.items()}
    d = {k: statistics.median(v) for k, v in dec.items()}
    return {
        "forward_1x512_s": f["model"],
        "dense_forward_1x512_s": f["dense"],
        "forward_speedup": f["dense"] / f["model"],
        "decode_tokens_per_s": d["model"],
        "dense_decode_tokens_per_s": d["dense"],
        "decode_speedup": d["model"] / d["dense"],
    }


def pruned_shape(dense, widths: list[int], bias: bool):
    """The dense model cut to the given per-layer widths (first neurons kept; weights do not matter)."""
    from ffnkit.core.archs import find_ffns
    from ffnkit.core.edit import keep_neurons_, set_bias_out_

    model = copy.deepcopy(dense)
    for ffn, w in zip(find_ffns(model), widths, strict=True):
        keep_neurons_(ffn, torch.arange(w), model=model)
    if bias:  # FLAP's compensation and the refit add a b_out where the model has none
        for ffn in find_ffns(model):
            set_bias_out_(ffn, torch.zeros(ffn.d_model), model=model)
    return model


def lowrank_shape(dense, ratio: float):
    from ffnkit.pipeline import Step, run_step

    model = copy.deepcopy(dense)
    run_step(model, Step("svd", {"ratio": ratio}))  # svd, asvd and svd-llm give the same ranks
    return model


def sublayer_shape(dense, removed: list[str]):
    """The dense model with the named sublayers / blocks removed for real (as in the result row)."""
    from ffnkit.compress.sublayers import SublayerConfig, remove_sublayers_

    model = copy.deepcopy(dense)
    remove_sublayers_(model, SublayerConfig("manual", remove=list(removed)))
    return model


# sublayer-removal rows: (file, path of the row list inside it)
SUBLAYER_ROWS = (
    ("compress_structure_finercut_h200.json", ("parts", "finercut", "finercut-ffn")),
    ("compress_structure.json", ("parts", "sublayers", "shortgpt-blocks")),
)


def _rows(doc: dict, keys: tuple[str, ...]) -> list[dict]:
    for k in keys:
        doc = doc[k]
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--update", action="store_true", help="write the numbers into the frontier files")
    ap.add_argument("--limit", type=int, default=0, help="only the first N shapes (a smoke test)")
    ap.add_argument(
        "--sublayers", action="store_true", help="instead: the FinerCut and ShortGPT removal rows"
    )
    ap.add_argument("--out", default=str(RESULTS / "compress_latency_cpu.json"))
    args = ap.parse_args()

    from ffnkit.evaluate import environment
    from ffnkit.pipeline import PipelineConfig, load_step

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    dense, tok = load_step(PipelineConfig(model="smollm2-135m"))
    dense.eval()
    ids = torch.randint(100, 40_000, (1, 512), generator=torch.Generator().manual_seed(0))  # [1, 512]
    frontier_paths = [RESULTS / f for f in FRONTIERS]
    frontiers = [json.loads(p.read_text()) for p in frontier_paths]
    lowrank_path = RESULTS / "compress_lowrank.json"
    lowrank = json.loads(lowrank_path.read_text())

    shapes: dict[str, dict] = {}
    if args.sublayers:
        sub_docs = {name: json.loads((RESULTS / name).read_text()) for name, _ in SUBLAYER_ROWS}
        for name, keys in SUBLAYER_ROWS:
            for row in _rows(sub_docs[name], keys):
                key = "removed:" + ",".join(row["removed"])
                shapes.setdefault(key, {"kind": "sublayers", "removed": row["removed"], "rows": []})
                shapes[key]["rows"].append(f"{name} {keys[-1]} {row['ratio']}")
        frontier_paths, frontiers = [], []
    for path, frontier in zip(frontier_paths, frontiers, strict=True):
        for row in frontier["results"]:
            key = _pruned_key(row)
            shapes.setdefault(
                key, {"kind": "pruned", "widths": row["d_ff"], "bias": "bias=True" in key, "rows": []}
            )
            shapes[key]["rows"].append(f"{path.stem} {row['label']} {row['ratio']}")
    for row in [] if args.sublayers else lowrank["lowrank"]:
        key = f"lowrank:{row['ratio']}"
        shapes.setdefault(key, {"kind": "lowrank", "ratio": row["ratio"], "rows": []})
        shapes[key]["rows"].append(f"lowrank {row['method']} {row['ratio']}")

    if args.limit:
        shapes = dict(list(shapes.items())[: args.limit])
        args.update = False
    measured: dict[str, dict] = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if shape["kind"] == "pruned":
            model = pruned_shape(dense, shape["widths"], shape["bias"])
        elif shape["kind"] == "sublayers":
            model = sublayer_shape(dense, shape["removed"])
        else:
            model = lowrank_shape(dense, shape["ratio"])
        model.eval()
        measured[key] = measure(dense, model, tok, ids, args.rounds, args.new_tokens)
        print(
            f"[{time.perf_counter() - t0:6.0f}s] {i + 1}/{len(shapes)} {shape['rows'][0]}: "
            f"forward ×{measured[key]['forward_speedup']:.2f}, decode ×{measured[key]['decode_speedup']:.2f}",
            file=sys.stderr,
            flush=True,
        )
        del model

    record = {
        "command": "python " + " ".join(sys.argv),
        "protocol": f"CPU, torch threads={torch.get_num_threads()}; 1x512 forward without cache and greedy "
        f"decode of {args.new_tokens} tokens at batch 1; candidate and dense alternated, medians of "
        f"{args.rounds} rounds after a warm-up; shapes rebuilt from the frontier rows (weights do not "
        "change latency)",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
    }
    doc = {
        "benchmark": "compress_latency",
        **record,
        "shapes": [{**shapes[k], "latency": measured[k]} for k in shapes],
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if args.update and args.sublayers:
        pointer = {**record, "file": Path(args.out).name}
        for name, keys in SUBLAYER_ROWS:
            for row in _rows(sub_docs[name], keys):
                row["latency"] = measured["removed:" + ",".join(row["removed"])]
            sub_docs[name]["latency_remeasured_" + keys[-1]] = pointer
            (RESULTS / name).write_text(json.dumps(sub_docs[name], indent=1, default=str) + "\n")
    elif args.update:
        pointer = {**record, "file": Path(args.out).name}
        for path, frontier in zip(frontier_paths, frontiers, strict=True):
            for row in frontier["results"]:
                row["latency"] = measured[_pruned_key(row)]
            frontier["latency_remeasured"] = pointer
            path.write_text(json.dumps(frontier, indent=2, default=str) + "\n")
        frontier = frontiers[0]
        for row in lowrank["lowrank"]:
            lat = measured[f"lowrank:{row['ratio']}"]
            row.update(
                latency_s=lat["forward_1x512_s"],
                dense_latency_s=lat["dense_forward_1x512_s"],
                speedup=lat["forward_speedup"],
                decode_speedup=lat["decode_speedup"],
            )
        uniform = {r["ratio"]: r["latency"] for r in frontier["results"] if r["label"] == "wanda-sp/uniform"}
        for row in lowrank.get("baseline", []):  # uniform Wanda-sp: the frontier's shape at that ratio
            lat = uniform[row["ratio"]]
            row.update(latency_s=lat["forward_1x512_s"], dense_latency_s=lat["dense_forward_1x512_s"])
            row.update(speedup=lat["forward_speedup"], decode_speedup=lat["decode_speedup"])
        lowrank["latency_remeasured"] = pointer
        lowrank_path.write_text(json.dumps(lowrank, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
