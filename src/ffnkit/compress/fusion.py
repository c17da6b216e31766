"""FFN Fusion (NVIDIA, 2503.18908): runs of consecutive FFNs become one wider FFN computed in parallel.

For consecutive blocks the sequential FFNs ``x + f1(x) + f2(x + f1(x) + …)`` are replaced by
``x + f1(x) + f2(x)``: one FFN of width n1 + n2 whose W_in / W_gate rows and W_out columns are the
concatenation of the originals, reading ONE input — the first block's normed FFN input. Each original
FFN had its own RMSNorm; norm_j(x) = g_j ⊙ x / rms(x), so FFN j's rows of W_in and W_gate are
multiplied by g_j / g_first (exact when the norms differ only by their gain: same eps). The later
FFNs of the run are then removed (:class:`ffnkit.modules.zero.ZeroFFN`). Given the same input,
the fused FFN is exactly the sum of the originals (tested).

Which runs: the **dependency score** of blocks i < j is the cosine distance between block j's FFN
output with and without block i's FFN (FFN i zeroed), averaged over calibration tokens; one forward
per i gives a whole row, so the matrix costs L forwards. A run's score is the largest dependency
inside it; ``runs="auto"`` fuses the ``max_runs`` lowest-scoring, non-overlapping runs of
``run_length`` blocks (the paper's dependency matrix, which it uses after removing attention).

Supported: gated FFNs behind one pre-FFN RMSNorm (Llama, Mistral, Qwen2/3, SmolLM3, Gemma, Phi-3);
other layouts (post-FFN norms, LayerNorm with a bias, MoE) raise a clear error.

Example:
    >>> report = fuse_ffns_(model, FusionConfig(runs="auto", max_runs=2), tokenizer=tok)
    >>> report.runs                      # [[24, 25], [26, 27]]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffnkit.core.config import JsonConfig
from ffnkit.core.edit import set_ffn_weights_
from ffnkit.core.errors import InvalidArgumentError, LayerIndexError, UnsupportedArchitectureError
from ffnkit.core.ffn import FFN

__all__ = [
    "FusionConfig",
    "FusionReport",
    "dependency_matrix",
    "fuse_ffns_",
    "fused_weights",
    "set_ffn_weights_",  # lives in ffnkit.core.edit (the one place that changes FFN shapes)
]

# the pre-FFN norm inside a block, by family (only families with ONE norm between residual and FFN)
FFN_NORM = {
    **{
        t: "post_attention_layernorm"
        for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "phi3")
    },
}
_GAIN_PLUS_ONE = ("GemmaRMSNorm",)  # Gemma's RMSNorm scales by (1 + weight)


# ----- config and report --------------------------------------------------------------------------
@dataclass
class FusionConfig(JsonConfig):
    """Which FFN runs to fuse: ``runs="auto"`` (by dependency) or explicit ``[[first, …, last], …]``.

    Example:
        >>> FusionConfig(runs=[[20, 21]]).to_dict()["runs"]
        [[20, 21]]
    """

    runs: str | list[list[int]] = "auto"
    max_runs: int = 1  # auto: how many runs to fuse
    run_length: int = 2  # auto: blocks per run
    samples: int = 8
    seq_len: int = 128
    batch_size: int = 4
    corpus: str = "shakespeare"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.runs, str):
            if self.runs != "auto":
                raise InvalidArgumentError(f"runs must be 'auto' or a list of block runs, got {self.runs!r}")
        else:
            runs = [list(map(int, r)) for r in self.runs]
            for r in runs:
                if len(r) < 2 or r != list(range(r[0], r[0] + len(r))):
                    raise InvalidArgumentError(
                        f"a run is >= 2 consecutive block numbers, like [20, 21]; got {r}"
                    )
            flat = [i for r in runs for i in r]
            if len(set(flat)) != len(flat):
                raise InvalidArgumentError("fusion runs overlap; give disjoint runs")
            self.runs = runs
        if self.max_runs < 1 or self.run_length < 2:
            raise InvalidArgumentError("max_runs must be >= 1 and run_length >= 2")
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise InvalidArgumentError("samples and batch_size must be >= 1 and seq_len >= 2")


@dataclass
class FusionReport:
    """What ``fuse_ffns_`` did (JSON-ready through ``to_dict``)."""

    transform: str
    config: dict[str, Any]
    runs: list[list[int]]
    run_scores: list[float | None]  # the largest dependency inside each run
    dependency: dict[str, Any] | None  # consecutive-pair scores and the candidate runs
    widths: list[dict[str, Any]]  # per run: first block, fused width
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- weights ------------------------------------------------------------------------------------
def _norm_gain(norm: nn.Module, where: str) -> Tensor:
    """The effective per-channel gain g of an RMSNorm (Gemma: 1 + weight), float64 [d]."""
    w = getattr(norm, "weight", None)
    if w is None or getattr(norm, "bias", None) is not None or "RMSNorm" not in type(norm).__name__:
        raise UnsupportedArchitectureError(
            f"{where}: FFN fusion folds RMSNorm gains; this norm is {type(norm).__name__} "
            "(with a bias or no gain) — fusion supports Llama-family blocks only"
        )
    g = w.detach().double().cpu()
    return g + 1.0 if type(norm).__name__ in _GAIN_PLUS_ONE else g


def _eps(norm: nn.Module) -> float | None:
    for k in ("variance_epsilon", "eps"):
        if hasattr(norm, k):
            return float(getattr(norm, k))
    return None


def fused_weights(ffns: list[FFN], gains: list[Tensor]) -> dict[str, Tensor]:
    """Canonical weights of the fused FFN: rows of W_in / W_gate concatenated (FFN j's scaled by
    g_j / g_first), columns of W_out concatenated. Float64 on the CPU.

    Example:
        >>> w = fused_weights([f1, f2], [g1, g2]); w["W_in"].shape     # [n1 + n2, d]
    """
    g0 = gains[0]
    if bool((g0.abs() < 1e-12).any()):
        raise InvalidArgumentError(
            "the first norm of the run has a zero gain: its channels cannot be rescaled"
        )
    w_in, w_gate, w_out, b_in, b_gate = [], [], [], [], []
    b_out = None
    for f, g in zip(ffns, gains, strict=True):
        scale = (g / g0)[None, :]  # [1, d]: norm_j(x) = (g_j / g_0) ⊙ norm_0(x)
        w_in.append(f.W_in.detach().double().cpu() * scale)  # [n_j, d]
        w_gate.append(f.W_gate.detach().double().cpu() * scale)
        w_out.append(f.W_out.detach().double().cpu())  # [d, n_j]
        n = f.d_ff
        b_in.append(
            f.b_in.detach().double().cpu() if f.b_in is not None else torch.zeros(n, dtype=torch.float64)
        )
        b_gate.append(
            f.b_gate.detach().double().cpu() if f.b_gate is not None else torch.zeros(n, dtype=torch.float64)
        )
        if f.b_out is not None:
            b = f.b_out.detach().double().cpu()
            b_out = b if b_out is None else b_out + b
    has_in = any(f.b_in is not None for f in ffns)
    has_gate = any(f.b_gate is not None for f in ffns)
    return {
        "W_in": torch.cat(w_in),  # [n1 + n2, d]
        "W_gate": torch.cat(w_gate),
        "W_out": torch.cat(w_out, dim=1),  # [d, n1 + n2]
        "b_in": torch.cat(b_in) if has_in else None,
        "b_gate": torch.cat(b_gate) if has_gate else None,
        "b_out": b_out,
    }


# ----- dependency -------------------------------------------------------------------------------
def _check_family(model: nn.Module) -> str:
    family = getattr(model.config, "model_type", "")
    if family not in FFN_NORM:
        raise UnsupportedArchitectureError(
            f"FFN fusion supports gated FFNs behind one RMSNorm ({', '.join(sorted(FFN_NORM))}); "
            f"{family!r} is not one of them"
        )
    return family


def _dense_by_layer(model: nn.Module) -> dict[int, FFN]:
    from ffnkit.core.archs import find_ffns

    out = {}
    for f in find_ffns(model):
        if f.kind != "gated":
            raise UnsupportedArchitectureError(
                f"{f.name} is a {f.kind} FFN; FFN fusion concatenates gated dense FFNs only"
            )
        out[f.layer] = f
    return out


@torch.no_grad()
def dependency_matrix(
    model: nn.Module, batches: Tensor, *, batch_size: int = 4, progress: bool = False
) -> dict[str, Any]:
    """D[i][j] (i < j) = 1 − mean_t cos(f_j(t), f_j(t) with FFN i zeroed); L + 1 forwards.

    Example:
        >>> dep = dependency_matrix(model, batches); dep["pairs"][0]    # {'i': 0, 'j': 1, 'score': …}
    """
    from ffnkit.core.blocks import zero_output
    from ffnkit.core.capture import site_hooks
    from ffnkit.core.progress import track
    from ffnkit.core.runner import run as run_batches

    ffns = sorted(_dense_by_layer(model).values(), key=lambda f: f.layer)
    layers = [f.layer for f in ffns]
    outs: dict[int, list[Tensor]] = {}
    handles = []

    def keep(layer: int):
        def hook(mod, args, out):
            outs.setdefault(layer, []).append((out[0] if isinstance(out, tuple) else out).float())

        return hook

    def run() -> dict[int, Tensor]:
        outs.clear()
        for _ in run_batches(model, batches, batch_size=batch_size):
            pass
        return {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for k, v in outs.items()}  # [N, d]

    try:
        for f in ffns:
            module, _, _ = site_hooks(f, "out")
            handles.append(module.register_forward_hook(keep(f.layer)))
        base = run()
        n = len(ffns)
        dep = torch.full((n, n), float("nan"), dtype=torch.float64)
        for a in track(range(n), progress, "ffn dependency", unit="layer"):
            module, _, _ = site_hooks(ffns[a], "out")
            h = module.register_forward_hook(zero_output, prepend=True)  # zero FFN a, read the later ones
            try:
                cut = run()
            finally:
                h.remove()
            for b in range(a + 1, n):
                cos = F.cosine_similarity(base[layers[b]], cut[layers[b]], dim=-1)  # [N]
                dep[a, b] = float(1.0 - cos.double().mean())
    finally:
        for h in handles:
            h.remove()
    pairs = [
        {"i": layers[a], "j": layers[a + 1], "score": float(dep[a, a + 1])} for a in range(len(layers) - 1)
    ]
    return {
        "metric": "1 - mean over tokens of cos(FFN j output, FFN j output with FFN i zeroed)",
        "layers": layers,
        "matrix": [[None if v != v else float(v) for v in row] for row in dep.tolist()],
        "pairs": pairs,
        "calibration": {"samples": int(batches.shape[0]), "seq_len": int(batches.shape[1])},
    }


def _run_score(dep: dict[str, Any], run: list[int]) -> float | None:
    pos = {layer: k for k, layer in enumerate(dep["layers"])}
    if any(i not in pos for i in run):
        return None
    vals = [dep["matrix"][pos[a]][pos[b]] for ai, a in enumerate(run) for b in run[ai + 1 :]]
    return max(v for v in vals if v is not None)


def auto_runs(dep: dict[str, Any], run_length: int, max_runs: int) -> list[list[int]]:
    """The ``max_runs`` lowest-scoring disjoint runs of ``run_length`` consecutive layers.

    Example:
        >>> auto_runs(dependency_matrix(model, batches), 2, 1)     # [[26, 27]]
    """
    layers = dep["layers"]
    cands = []
    for k in range(len(layers) - run_length + 1):
        run = layers[k : k + run_length]
        if run == list(range(run[0], run[0] + run_length)):
            cands.append((_run_score(dep, run), run))
    cands.sort(key=lambda t: (t[0], t[1][0]))
    chosen: list[list[int]] = []
    used: set[int] = set()
    for _, run in cands:
        if len(chosen) >= max_runs:
            break
        if used.isdisjoint(run):
            chosen.append(run)
            used.update(run)
    return sorted(chosen)


# ----- the transform ------------------------------------------------------------------------------
def fuse_ffns_(
    model: nn.Module,
    config: FusionConfig,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    dependency: dict[str, Any] | None = None,
    progress: bool = False,
) -> FusionReport:
    """Fuse runs of consecutive FFNs into one wider FFN each; the later FFNs are removed. Atomic.

    ``dependency``: a precomputed :func:`dependency_matrix` of this model (reused across calls).

    Example:
        >>> rep = fuse_ffns_(model, FusionConfig(runs=[[26, 27]]))
        >>> rep.widths        # [{'first': 26, 'fused_d_ff': 3072, 'removed': [27]}]
    """
    from ffnkit.compress.sublayer_removal import SUBLAYERS_KIND
    from ffnkit.core.archs import find_ffns
    from ffnkit.core.blocks import block_modules
    from ffnkit.core.edit import plan_ffn_weights
    from ffnkit.core.transaction import Transaction
    from ffnkit.evaluate import count_parameters
    from ffnkit.modules.zero import ZeroFFN

    start = time.perf_counter()
    family = _check_family(model)
    by_layer = _dense_by_layer(model)
    before = count_parameters(model, find_ffns(model))
    if config.runs == "auto" and dependency is None:
        if calibration is None and tokenizer is None:
            raise InvalidArgumentError("runs='auto' needs calibration text: pass tokenizer= or calibration=")
        if calibration is None:
            from ffnkit.data import calibration_batches, load_corpus

            calibration = calibration_batches(
                load_corpus(config.corpus), tokenizer, config.samples, config.seq_len, config.seed
            )
        dependency = dependency_matrix(
            model, torch.as_tensor(calibration).long(), batch_size=config.batch_size, progress=progress
        )
    runs = auto_runs(dependency, config.run_length, config.max_runs) if config.runs == "auto" else config.runs
    blocks = block_modules(model)
    norm_name = FFN_NORM[family]
    plans = []
    for run in runs:
        for i in run:
            if not 0 <= i < len(blocks):
                raise LayerIndexError(f"block {i} is out of range: this model has {len(blocks)} blocks")
            if i not in by_layer:
                raise InvalidArgumentError(f"block {i} has no FFN left to fuse (removed earlier)")
        norms = [getattr(blocks[i], norm_name) for i in run]
        eps = {_eps(n) for n in norms}
        if len(eps) != 1:
            raise InvalidArgumentError(
                f"run {run}: the norms have different eps {sorted(eps)}; cannot fold gains"
            )
        gains = [_norm_gain(n, f"layers.{i}.{norm_name}") for i, n in zip(run, norms, strict=True)]
        ffns = [by_layer[i] for i in run]
        plans.append((run, ffns, fused_weights(ffns, gains)))
    # commit: widen the first FFN of each run, then remove the others (undo everything on failure)
    with torch.no_grad():
        widenings = [plan_ffn_weights(ffns[0], w) for _, ffns, w in plans]  # what set_ffn_weights_ does
    with Transaction(model) as tx:
        for swaps in widenings:
            tx.apply(swaps)
        removed_rows = []
        for _, ffns, _ in plans:
            for f in ffns[1:]:
                zero = ZeroFFN(f.layer)
                tx.replace(f.name, zero)
                removed_rows.append(zero.to_record(f.name))
        if removed_rows:
            tx.record({"kind": SUBLAYERS_KIND, "removed": removed_rows, "reason": "ffn_fusion"})
            tx.record_structure(if_recorded=True)
        tx.record_structure()  # the widened FFNs (replayed after the removal above)
    after = count_parameters(model, find_ffns(model))
    report = FusionReport(
        transform="fuse_ffns",
        config=config.to_dict(),
        runs=[list(r) for r in runs],
        run_scores=[_run_score(dependency, r) if dependency else None for r in runs],
        dependency=(
            {k: dependency[k] for k in ("metric", "pairs", "calibration", "layers")} if dependency else None
        ),
        widths=[{"first": r[0], "fused_d_ff": f[0].d_ff, "removed": r[1:]} for r, f, _ in plans],
        parameters_before=before,
        parameters_after=after,
        seconds=time.perf_counter() - start,
        notes=[
            "the later FFNs of a run now read the first one's input: x + f1(x) + f2(x) instead of "
            "x + f1(x) + attn(...) + f2(...); FFN parameters are unchanged (one wider matrix per run)"
        ],
    )
    model.ffnkit_reports = [*list(getattr(model, "ffnkit_reports", []) or []), report.to_dict()]
    return report
