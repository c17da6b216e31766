"""The levers tried to improve ``best`` activation sparsity (issue 9), each on a reduced CPU protocol.

``errors``: per-FFN relative output error ‖y − ŷ‖²/‖y‖² of ``best``'s 50% plan on held-out calibration
tokens (fit on the first 3,072 of 4,096 captured tokens, measured on the last 1,024), without a correction,
with a per-layer output bias (the mean of what the masks remove) and with a ridge least-squares refit of
W_out on the masked intermediate activations. ``probes``: ``best`` at ``--level`` with ``--windows`` probe
windows. ``heal``: ``best`` at ``--level`` with ``heal_minutes``. Perplexity: the last 1,024 tokens of the
Shakespeare and Austen evaluation splits (512-token windows); calibration 16×256 Shakespeare tokens.

    python benchmarks/sparsity_levers.py errors --out /tmp/levers_errors.json
    python benchmarks/sparsity_levers.py probes --windows 2,8,16 --out /tmp/levers_probes.json
    python benchmarks/sparsity_levers.py heal --heal-minutes 5 --heal-lr 3e-4 --out /tmp/levers_heal.json
    python benchmarks/sparsity_levers.py refit --samples 64 --out /tmp/levers_refit.json  # best, then W_out refits
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
from ffnkit.core.lstsq import RidgeTowards
from ffnkit.data import calibration_batches, load_corpus
from ffnkit.evaluate import environment
from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, evaluation_set, load_step, measure
from ffnkit.sparsity import Calibration, SparsityConfig, sparsify_
from ffnkit.sparsity.refit import refit_out_
from ffnkit.sparsity.rules import calibrate_best

PRIOR_RIDGES = (0.3, 1.0, 3.0)  # "refit_prior" ridges, x the mean diagonal of the Gram matrix


def errors(model, cal: Calibration, level: float) -> list[dict]:
    """Per-FFN output errors of best's plan: none / bias / ridge refit of W_out (fit 3/4, measure 1/4)."""
    rows = []
    for p, f in zip(calibrate_best(cal, SparsityConfig("best", level)), cal.ffns, strict=True):
        x = cal.inputs[f.index]  # [N, d]
        wg, wu, wd = (w.detach().float() for w in (f.W_gate, f.W_in, f.W_out))

        def h_of(x, masked, p=p, f=f, wg=wg, wu=wu):
            if masked and p.t_in > 0:
                x = torch.where((x * p.c_in).abs() >= p.t_in, x, torch.zeros_like(x))
            h = f.act_fn(x @ wg.T) * (x @ wu.T)  # [N, f]
            if masked and p.t_mid > 0:
                h = torch.where((h * p.c_mid).abs() >= p.t_mid, h, torch.zeros_like(h))
            return h

        with torch.no_grad():
            fit, ev = slice(0, 3 * x.shape[0] // 4), slice(3 * x.shape[0] // 4, None)
            y, hs = h_of(x, False) @ wd.T, h_of(x, True)  # [N, d], [N, f]
            ys = hs @ wd.T

            def err(yh, y=y, ev=ev):
                return float((yh[ev] - y[ev]).pow(2).sum() / y[ev].pow(2).sum())

            b = (y[fit] - ys[fit]).mean(0)  # [d]
            h = hs[fit].double()
            g = h.T @ h
            ridge = 1e-2 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
            w = torch.linalg.solve(g + ridge, h.T @ y[fit].double()).T.float()  # [d, f]
            row = {"index": f.index, "none": err(ys), "bias": err(ys + b), "refit": err(hs @ w.T)}
            # the MoE conversion's refit (ffnkit.moe.refit): a bias term, ridge towards the dense W_out
            h1 = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)  # [n, f + 1]
            prior = torch.cat([wd.T.double(), torch.zeros(1, wd.shape[0], dtype=torch.float64)])  # [f+1, d]
            for lam in PRIOR_RIDGES:
                solver = RidgeTowards(h1.shape[1], wd.shape[0], free=1)  # the last unknown: a bias
                solver.update(h1, y[fit])
                sol = solver.solve(prior, lam)  # [f + 1, d]
                row[f"refit_prior_{lam:g}"] = err(hs @ sol[:-1].float() + sol[-1].float())
            rows.append(row)
    return rows


@torch.no_grad()
def refit_sparse_down_(model, cal: Calibration, lam: float) -> None:
    """``refit``: each sparse FFN's W_out refitted for its masks on the dense model's calibration inputs,
    shrunk towards the dense W_out (``ffnkit.sparsity.refit``, what ``best`` now does itself)."""
    for f in find_ffns(model):
        refit_out_(f.module, f, cal.inputs[f.index].float(), lam)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["errors", "probes", "heal", "refit"])
    ap.add_argument("--level", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 256 tokens")
    ap.add_argument("--windows", default="2,8")
    ap.add_argument("--heal-minutes", type=float, default=5.0)
    ap.add_argument("--heal-lr", type=float, default=3e-4)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_step(PipelineConfig(model="smollm2-135m", device=args.device))
    ids = calibration_batches(load_corpus("shakespeare"), tok, args.samples, 256, seed=0, progress=False)
    cal = Calibration.collect(model, find_ffns(model), ids, 256 * args.samples)
    doc: dict = {
        "benchmark": "sparsity_levers",
        "command": "python " + " ".join(sys.argv),
        "level": args.level,
    }
    if args.what == "errors":
        rows = errors(model, cal, args.level)
        doc["layers"] = rows
        doc["sum"] = {k: sum(r[k] for r in rows) for k in rows[0] if k != "index"}
    else:
        evs = {
            c: evaluation_set(PerplexityProtocol(corpus=c, max_tokens=args.eval_tokens, window=512), tok)
            for c in ("shakespeare", "austen")
        }
        dense = {c: measure(model, e).perplexity for c, e in evs.items()}
        doc["dense"] = dense
        doc["rows"] = []
        configs = (
            [{"probe_windows": int(w)} for w in args.windows.split(",")]
            if args.what == "probes"
            else [{"heal_minutes": args.heal_minutes, "heal_lr": args.heal_lr}]
            if args.what == "heal"
            else [{"refit": False}]  # best without its own refit, then refitted here at each ridge
        )
        for kw in configs:
            m = copy.deepcopy(model)
            res = sparsify_(m, SparsityConfig("best", args.level, **kw), stats=cal, tokenizer=tok)
            row = {"config": kw, "vs_dense": {c: measure(m, e).perplexity / dense[c] for c, e in evs.items()}}
            row["heldout_bytes_skipped"] = res.measured["bytes_skipped"]
            if res.heal is not None:
                row["heal"] = {k: res.heal[k] for k in ("steps", "seconds", "stopped_by")}
            doc["rows"].append(row)
            print(row, file=sys.stderr, flush=True)
            if args.what == "refit":
                for lam in PRIOR_RIDGES:
                    r = copy.deepcopy(m)
                    refit_sparse_down_(r, cal, lam)
                    row = {"config": {"refit_prior": lam}, "vs_dense": {c: measure(r, e).perplexity / dense[c] for c, e in evs.items()}}  # fmt: skip
                    doc["rows"].append(row)
                    print(row, file=sys.stderr, flush=True)
    doc["seconds"] = time.perf_counter() - t0
    doc["environment"] = environment()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
