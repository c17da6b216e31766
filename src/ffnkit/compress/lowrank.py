"""Low-rank factorisation of FFN matrices: ``lowrank_(model, LowRankConfig("svd-llm", ratio=0.3))``.

Each chosen matrix W [m, n] (canonical orientation: [out, in]) becomes two Linears, A [k, n] then
B [m, k] (a :class:`LowRankLinear` in the module's place), so the FFN computes B·A·x (+ bias).

Methods (the maths: :mod:`ffnkit.compress.lowrank_factors`; the module:
:mod:`ffnkit.modules.lowrank`): ``svd`` (truncated SVD of W), ``asvd``
(ASVD: SVD of W·diag(mean|x|)^α), ``svd-llm`` (SVD-LLM: SVD of W·chol(E[xxᵀ]), the best rank-k
approximation of the outputs W·X on the calibration data).

x is what the matrix reads: the FFN input (site ``in``) for W_in and W_gate, the neuron activations
(site ``post``) for W_out (:mod:`ffnkit.compress.lowrank_stats`). SVD and Cholesky run in float64;
the factors take the model's dtype. The public names of the maths module are importable from here too.

``ratio`` ρ is the share of each matrix's parameters removed: k = ⌊(1−ρ)·m·n/(m+n)⌋ (≥ 1), so the FFN
loses the share ρ of its weights when all its matrices are factorised; ``rank`` gives k directly.
ρ = 0 changes nothing: a matrix is left as it is wherever its factors would not be smaller than it.
(The break-even rank m·n/(m+n) still drops 27% of a 1536×576 matrix's singular directions: plain SVD
of every SmolLM2-135M FFN matrix at rank 418 keeps 91–95% of each one's energy, and perplexity on 4096
tokens of the default corpus goes from 24.6 to 29,756 — the same to 4 digits when the truncated
matrices are written into the plain Linears, so it is the truncation, not the low-rank module.)
``allocation="global"`` instead shares one budget over all chosen matrices (:func:`global_ranks`:
singular values ranked by their share of their matrix's energy per parameter).
Every dense layout (:mod:`ffnkit.core.layouts`: GPT-2's transposed matrices too) becomes a
LowRankLinear; Phi-3's fused gate-and-up projection is factorised as one [2·d_ff, d_model] matrix (choose
``in`` and ``gate`` together). v5 expert tensors (MoE) are not factorised: a clear error says to select
dense layers.

The FFN handle still reads the weights (``find_ffns(model)[i].W_in`` is the product B·A, read-only: a
write raises; edit ``module.A.weight`` / ``module.B.weight`` to change the model; handles taken before
``lowrank_`` raise when used), hooks at every site keep
working, and the change is recorded in ``model.config.ffnkit`` so that ``ffnkit.save``/``load``
rebuild the factor shapes and reproduce the logits exactly.

Example:
    >>> report = lowrank_(model, LowRankConfig("svd-llm", ratio=0.3), tokenizer=tok)
    >>> report.ffn_ratio_removed
    0.30
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.compress.lowrank_factors import (
    METHODS,
    Decomposition,
    decompose,
    factorize,
    global_ranks,
    linalg_threads,
    rank_for_ratio,
)
from ffnkit.compress.lowrank_stats import collect_lowrank_stats
from ffnkit.core.archs import find_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.layouts import find_layout, layout_of
from ffnkit.core.transaction import Transaction
from ffnkit.modules.base import packed_numel
from ffnkit.modules.lowrank import LowRankLinear, build_lowrank

__all__ = [
    "METHODS",
    "LowRankConfig",
    "LowRankReport",
    "Decomposition",
    "collect_lowrank_stats",
    "decompose",
    "factorize",
    "global_ranks",
    "ffn_parameter_count",
    "lowrank_",
    "rank_for_ratio",
    "replay_lowrank",
]

MATRICES = ("in", "gate", "out")
CHANGE_KIND = LowRankLinear.change_kind  # "ffn_lowrank"


# ----- configuration and report -------------------------------------------------------------------
@dataclass
class LowRankConfig(JsonConfig):
    """How to factorise. JSON round trip: ``LowRankConfig.from_dict(json.loads(c.to_json()))``.

    Example:
        >>> LowRankConfig("asvd", ratio=0.2).to_dict()["matrices"]
        ['in', 'gate', 'out']
    """

    method: str = "svd-llm"
    ratio: float | None = None  # share of each matrix's parameters removed, in [0, 1)
    rank: int | None = None  # or an explicit rank for every matrix
    matrices: tuple[str, ...] | list[str] = ("in", "gate", "out")
    layers: list[int] | None = None  # FFN indices (None = all)
    samples: int = 32  # calibration windows (asvd, svd-llm)
    seq_len: int = 256
    seed: int = 0
    corpus: str = "shakespeare"
    alpha: float = 0.5  # ASVD's exponent
    allocation: str = "uniform"  # "uniform": every matrix loses ``ratio``; "global": see global_ranks
    batch_size: int = 4
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(
                f"unknown low-rank method {self.method!r}; use one of {', '.join(METHODS)}"
            )
        if (self.ratio is None) == (self.rank is None):
            raise InvalidArgumentError("give exactly one of ratio= (share of parameters removed) or rank=")
        if self.ratio is not None:
            if not isinstance(self.ratio, int | float) or not 0.0 <= float(self.ratio) < 1.0:
                raise InvalidArgumentError(
                    f"ratio must be in [0, 1) (the share of FFN parameters removed), got {self.ratio}"
                )
            self.ratio = float(self.ratio)
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise InvalidArgumentError(f"rank must be a positive integer, got {self.rank}")
        self.matrices = list(self.matrices)
        bad = [m for m in self.matrices if m not in MATRICES]
        if bad or not self.matrices:
            raise InvalidArgumentError(
                f"matrices must be a non-empty subset of {', '.join(MATRICES)}, got {self.matrices}"
            )
        if self.samples < 1 or self.seq_len < 2:
            raise InvalidArgumentError("samples must be >= 1 and seq_len >= 2")
        if self.allocation not in ("uniform", "global"):
            raise InvalidArgumentError(f"allocation must be 'uniform' or 'global', got {self.allocation!r}")
        if self.allocation == "global" and self.ratio is None:
            raise InvalidArgumentError(
                "allocation='global' shares a parameter budget: give ratio=, not rank="
            )

    @property
    def needs_data(self) -> bool:
        return self.method != "svd"


@dataclass
class LowRankReport:
    """What ``lowrank_`` changed (JSON-ready through ``to_dict``).

    ``layers``: per FFN, per matrix: shape [m, n], rank k, parameters before/after, and
    ``energy_kept``: Σ_{i≤k} σ_i² / Σ σ_i² of the matrix the method decomposes (for svd-llm that is
    1 − ‖(W−W')X‖²/‖WX‖² on the calibration data; for svd, 1 − ‖W−W'‖²/‖W‖²).
    """

    transform: str
    method: str
    config: dict[str, Any]
    layers: list[dict[str, Any]]
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    ffn_ratio_removed: float
    regularised: int = 0  # Cholesky factorisations that needed a ridge on E[xxᵀ]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- planning the swaps -------------------------------------------------------------------------
def _dense(mod: nn.Module) -> Tensor:
    """The matrix W [out, in], whatever its layout."""
    return layout_of(mod).weight(mod)


def _targets(ffn: FFN, matrices: list[str]) -> list[tuple[str, nn.Module, str]]:
    """(label, module, statistics site) of each matrix of ``ffn`` to factorise."""
    if ffn.kind == "moe":
        raise InvalidArgumentError(
            f"{ffn.name} is a mixture of experts: v5 expert tensors cannot be factorised; select dense "
            "layers with layers=[...]"
        )
    out = []
    if ffn.fused_gate_up:
        both = {"in", "gate"} <= set(matrices)
        if not both and ({"in", "gate"} & set(matrices)):
            raise InvalidArgumentError(
                f"{ffn.name} keeps W_gate and W_in in one fused matrix (a fused gate-and-up projection): factorise "
                "'in' and 'gate' together (matrices=('in', 'gate', ...)) or neither"
            )
        if both:
            out.append(("gate_up", ffn.in_proj, "in"))
    else:
        if "in" in matrices:
            out.append(("in", ffn.in_proj, "in"))
        if "gate" in matrices and ffn.gate_proj is not None:
            out.append(("gate", ffn.gate_proj, "in"))
    if "out" in matrices:
        out.append(("out", ffn.out_proj, "post"))
    for label, mod, _ in out:
        layout = find_layout(mod)
        if layout is not None and not layout.dense:
            raise InvalidArgumentError(f"{ffn.name}: matrix {label!r} is already {layout.describe(mod)}")
        if layout is None:
            raise InvalidArgumentError(
                f"{ffn.name}: matrix {label!r} is a {type(mod).__name__}, not a Linear; cannot factorise it"
            )
    return out


def _module_params(mod: nn.Module) -> int:
    """Weights the module stands for: parameters plus packed (quantised) values."""
    return sum(p.numel() for p in mod.parameters()) + packed_numel(mod)


def ffn_parameter_count(ffns: list[FFN]) -> int:
    """FFN parameters as stored (factorised matrices count their factors, not the m·n product).

    Example:
        >>> ffn_parameter_count(find_ffns(model))
        79626240
    """
    total = 0
    for f in ffns:
        if f.kind == "moe":
            total += f.num_parameters()
            continue
        mods = {id(m): m for m in (f.in_proj, f.gate_proj, f.out_proj) if m is not None}
        total += sum(_module_params(m) for m in mods.values())
    return total


def _counts(model: nn.Module) -> dict[str, Any]:
    from ffnkit.evaluate import count_parameters

    ffns = find_ffns(model)
    counts = count_parameters(model)
    counts["ffn"] = ffn_parameter_count(ffns)
    counts["ffn_share"] = counts["ffn"] / counts["total"] if counts["total"] else 0.0
    return counts


def _paths(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _calibration(config: LowRankConfig, calibration: Tensor | None, tokenizer: Any) -> Tensor:
    from ffnkit.data import calibration_ids

    return calibration_ids(config, calibration, tokenizer, what=f"method {config.method!r}")


# ----- the transform ------------------------------------------------------------------------------
def lowrank_(
    model: nn.Module,
    config: LowRankConfig,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    stats: dict[tuple[int, str], dict[str, Tensor]] | None = None,
    progress: bool = False,
) -> LowRankReport:
    """Factorise FFN matrices into two Linears each (fewer parameters), in place and atomically.

    ``calibration``: token ids [n, T] for asvd / svd-llm (default: ``config.samples`` windows of the
    calibration corpus, through ``tokenizer``). ``stats``: from :func:`collect_lowrank_stats` on the
    unfactorised model, to reuse across several runs. Call ``find_ffns`` again afterwards: the handles
    read the new modules.

    Example:
        >>> report = lowrank_(model, LowRankConfig("svd-llm", ratio=0.3), tokenizer=tok)
        >>> report.layers[0]["matrices"]["out"]["rank"]
        293
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    all_ffns = find_ffns(model)
    if config.layers is None:
        ffns = all_ffns
    else:
        from ffnkit.core.archs import select_ffns

        ffns = select_ffns(all_ffns, config.layers)
    plan = [(f, _targets(f, list(config.matrices))) for f in ffns]  # validates before any work
    before = _counts(model)
    # ratio 0 asks to remove nothing: every matrix stays as it is (the rank where factors stop saving
    # parameters, m·n/(m+n), would still cut 27% of a 1536×576 matrix's singular directions)
    nothing = config.ratio == 0.0
    if config.needs_data and stats is None and not nothing:
        ids = _calibration(config, calibration, tokenizer)
        sites = tuple(sorted({s for _, t in plan for _, _, s in t}))
        stats = collect_lowrank_stats(
            model,
            ids,
            ffns,
            sites=sites,
            gram=config.method == "svd-llm",
            batch_size=config.batch_size,
            progress=progress,
        )
    paths = _paths(model)
    swaps: list[tuple[str, LowRankLinear]] = []
    records: list[dict[str, Any]] = []
    regularised = 0
    jobs = [(ffn, label, mod, site) for ffn, targets in plan for label, mod, site in targets]
    for ffn, _, _, site in jobs:
        if config.needs_data and not nothing and not (stats or {}).get((ffn.index, site)):
            raise InvalidArgumentError(
                f"no calibration statistics for {ffn.name} site {site!r}; pass stats= from "
                "collect_lowrank_stats on this model, or calibration="
            )
    by_index: dict[int, dict[str, Any]] = {}
    kept_as_is = 0
    with torch.no_grad(), linalg_threads(1):

        def dec(ffn: FFN, mod: nn.Module, site: str) -> Decomposition:
            st = (stats or {}).get((ffn.index, site), {})
            return decompose(
                _dense(mod),
                config.method,
                mean_abs=st.get("mean_abs"),
                gram=st.get("gram"),
                alpha=config.alpha,
            )

        shapes = [tuple(_dense(mod).shape) for _, _, mod, _ in jobs]
        decs: list[Decomposition | None] = [None] * len(jobs)
        if nothing:
            ranks = [min(m, n) for m, n in shapes]
        elif config.allocation == "global":  # every spectrum first, then one shared budget
            for i, (ffn, _, mod, site) in enumerate(tqdm(jobs, desc="decompositions", disable=not progress)):
                decs[i] = dec(ffn, mod, site)
            ranks = global_ranks([d.s for d in decs], shapes, config.ratio)
        else:
            ranks = [
                config.rank if config.rank is not None else rank_for_ratio(m, n, config.ratio)
                for m, n in shapes
            ]
        bar = tqdm(jobs, desc=f"{config.method} factorisation", disable=not progress)
        for i, (ffn, label, mod, site) in enumerate(bar):
            m, n = shapes[i]
            row = by_index.setdefault(ffn.index, {"index": ffn.index, "name": ffn.name, "matrices": {}})
            if config.rank is None and min(ranks[i], m, n) * (m + n) >= m * n:
                # factors of this rank would not be smaller than the matrix: leave it as it is
                params = _module_params(mod)
                row["matrices"][label] = {
                    "shape": [m, n],
                    "rank": min(m, n),
                    "params_before": params,
                    "params_after": params,
                    "energy_kept": 1.0,
                    "factorised": False,
                }
                kept_as_is += 1
                decs[i] = None
                continue
            d = decs[i] if decs[i] is not None else dec(ffn, mod, site)
            decs[i] = None  # free the float64 factors as we go
            k = min(ranks[i], m, n)
            a, b, info = d.factors(k)
            regularised += int(info["regularised"])
            new = build_lowrank(mod, a, b)
            path = paths[id(mod)]
            swaps.append((path, new))
            records.append(new.to_record(path))
            row["matrices"][label] = {
                "shape": [m, n],
                "rank": k,
                "params_before": _module_params(mod),
                "params_after": _module_params(new),
                "energy_kept": info["energy_kept"],
                "factorised": True,
            }
    rows = list(by_index.values())
    _commit(model, swaps, records)
    after = _counts(model)
    ratio = 1.0 - after["ffn"] / before["ffn"] if before["ffn"] else 0.0
    notes = []
    if config.rank is not None and ratio < 0:
        notes.append("the explicit rank is above m·n/(m+n) for some matrices: they grew")
    if kept_as_is:
        notes.append(
            f"{kept_as_is} matrices left as they are: at ratio {config.ratio} their factors would not be "
            "smaller than the matrix"
        )
    return LowRankReport(
        transform="lowrank",
        method=config.method,
        config=config.to_dict(),
        layers=rows,
        parameters_before=before,
        parameters_after=after,
        ffn_ratio_removed=ratio,
        regularised=regularised,
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def _commit(model: nn.Module, swaps: list[tuple[str, nn.Module]], records: list[dict]) -> None:
    """Swap the modules in and record the change, or (on any failure) leave the model as it was."""
    with Transaction(model) as tx:
        for path, new in swaps:
            tx.replace(path, new)
        if records:
            tx.record({"kind": CHANGE_KIND, "modules": records})


def replay_lowrank(model: nn.Module, change: dict) -> None:
    """Rebuild the factor shapes of an ``ffn_lowrank`` change on a freshly built model (values are placeholders).

    Example:
        >>> replay_lowrank(fresh_model, model.config.ffnkit["changes"][-1])
    """
    for rec in change.get("modules", []):
        LowRankLinear.replay(model, rec)
