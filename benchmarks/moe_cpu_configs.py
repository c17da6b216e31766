"""Benchmark: the settings of the ``cpu`` expert executor (:data:`ffnkit.kernels.moe_cpu.CONFIGS`), measured.

At the issue's CPU shape (hidden 512, expert width 256, 16 experts, top-4, float32, 2 threads), side by side
in one process, median over rounds of the mean time per call:

- ``switch``: the C kernel (:func:`~ffnkit.kernels.moe_cpu.c_experts`) against the torch paths it replaces
  (per-pair ``gather`` up to ``gather_max_pairs`` pairs, else ``sorted``) at 1 .. 4,096 tokens; the largest
  token count up to which C is faster at every measured size gives ``c_max_pairs``;
- ``pack_min``: ``c_pack_min_tokens`` (tokens an expert needs for the packed broadcast tiles) at 16 to 64
  tokens, where experts get 4 to 16 tokens each;
- ``prefetch``: ``c_prefetch`` (tiles of software prefetch ahead, 0 = off) at 1, 16 and 256 tokens.

Protocol as benchmarks/moe_kernel.py: 4 copies of the weights and 5 routings rotated (no call finds its
weights in a cache), variants alternate within every round, warm-up excluded; each variant is first checked
against the reference. Writes one JSON document with the machine, versions, command and the chosen values.

Run:  python benchmarks/moe_cpu_configs.py --out benchmarks/results/moe_cpu_configs.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ffnkit.kernels import moe_cpu
from ffnkit.kernels.benchmark import write_json
from ffnkit.kernels.moe_bench import SHAPES, environment, make_routing
from ffnkit.kernels.moe_reference import experts_forward as reference_forward


def torch_paths(x, gu, dn, idx, w):
    """The executor's torch paths as they ran before the C kernel (by pair count)."""
    if idx.numel() <= moe_cpu.CONFIGS["gather_max_pairs"]:
        return moe_cpu.gather_experts(x, gu, dn, idx, w)
    return moe_cpu.sorted_experts(x, gu, dn, idx, w)


def time_variants(
    variants: dict[str, tuple[Callable, dict]], tokens: int, copies: list, rounds: int
) -> dict[str, float]:
    """Median over rounds of the mean µs per call of each (fn, CONFIGS overrides), alternating per round."""
    d, e, k = SHAPES["cpu"]["hidden"], SHAPES["cpu"]["experts"], SHAPES["cpu"]["top_k"]
    xs = [torch.randn(tokens, d) for _ in range(2)]
    n_rout = len(copies) + 1  # a period prime to the copies': each copy meets every routing (past the caches)
    routing = [make_routing(tokens, e, k, 1.0, "cpu", 100 * tokens + r) for r in range(n_rout)]
    saved = dict(moe_cpu.CONFIGS)

    def run(fn: Callable, overrides: dict, calls: int) -> float:
        moe_cpu.CONFIGS.update(overrides)
        try:
            t0 = time.perf_counter()
            for i in range(calls):
                gu, dn = copies[i % len(copies)]
                idx, w = routing[i % n_rout]
                fn(xs[i % 2], gu, dn, idx, w)
            return (time.perf_counter() - t0) / calls
        finally:
            moe_cpu.CONFIGS.clear()
            moe_cpu.CONFIGS.update(saved)

    with torch.no_grad():
        idx0, w0 = routing[0]
        ref = reference_forward(xs[0], *copies[0], idx0, w0)
        calls = {}
        for name, (fn, ov) in variants.items():
            moe_cpu.CONFIGS.update(ov)
            out = fn(xs[0], *copies[0], idx0, w0)
            moe_cpu.CONFIGS.clear()
            moe_cpu.CONFIGS.update(saved)
            err = float((out - ref).norm() / ref.norm())
            if err > 1e-5:
                raise RuntimeError(f"{name} at {tokens} tokens differs from the reference: {err:.3g}")
            first = run(fn, ov, 2)
            calls[name] = max(3, min(400, int(0.05 / max(first, 1e-7))))
        times: dict[str, list[float]] = {n: [] for n in variants}
        for _ in range(rounds):
            for name, (fn, ov) in variants.items():
                times[name].append(run(fn, ov, calls[name]))
    return {n: 1e6 * statistics.median(v) for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 16, 64, 256, 1024, 2048, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not moe_cpu.c_available(torch.zeros(1, 2, 1), torch.zeros(1, 1, 1)):
        sys.exit("the C kernels cannot be built here: nothing to measure")
    sh = SHAPES["cpu"]
    d, f, e, k = sh["hidden"], sh["width"], sh["experts"], sh["top_k"]
    g = torch.Generator().manual_seed(0)
    copies = [
        (torch.randn(e, 2 * f, d, generator=g) / d**0.5, torch.randn(e, d, f, generator=g) / f**0.5)
        for _ in range(4)
    ]
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    doc: dict = {"benchmark": "moe_cpu_configs", "shape": sh, "environment": environment("cpu")}
    switch = []
    for t in args.tokens:
        us = time_variants({"c": (moe_cpu.c_experts, {}), "torch": (torch_paths, {})}, t, copies, args.rounds)
        switch.append({"tokens": t, "pairs": t * k, "us": us, "c_speedup": us["torch"] / us["c"]})
        say(f"switch T={t}: C {us['c']:.0f}us, torch {us['torch']:.0f}us")
    doc["switch"] = switch

    def sweep(name: str, field: str, values: tuple[int, ...], tokens: tuple[int, ...]) -> list[dict]:
        """The C kernel at each value of one CONFIGS field, per token count."""
        rows = []
        for t in tokens:
            variants = {str(v): (moe_cpu.c_experts, {field: v}) for v in values}
            rows.append({"tokens": t, "us": time_variants(variants, t, copies, args.rounds)})
            say(f"{name} T={t}: {rows[-1]['us']}")
        return rows

    doc["pack_min"] = pack = sweep("pack_min", "c_pack_min_tokens", (4, 8, 16), (16, 32, 64))
    doc["prefetch"] = pref = sweep("prefetch", "c_prefetch", (0, 1, 2), (1, 16, 256))
    max_pairs = 0
    for row in switch:
        if row["us"]["c"] >= row["us"]["torch"]:
            break
        max_pairs = row["pairs"]

    def best(rows: list[dict]) -> int:
        keys = rows[0]["us"]
        return int(min(keys, key=lambda key: sum(r["us"][key] / min(r["us"].values()) for r in rows)))

    doc["chosen"] = {"c_max_pairs": max_pairs, "c_pack_min_tokens": best(pack), "c_prefetch": best(pref)}
    doc["command"] = " ".join(["python", *sys.argv])
    say(f"chosen: {doc['chosen']}")
    write_json(doc, args.out)


if __name__ == "__main__":
    main()
