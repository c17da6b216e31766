"""Low-rank factorisation of FFN matrices: ``lowrank_(model, LowRankConfig("svd-llm", ratio=0.3))``.

Each chosen matrix W [m, n] (canonical orientation: [out, in]) becomes two Linears, A [k, n] then
B [m, k] (a :class:`LowRankLinear` in the module's place), so the FFN computes B·A·x (+ bias).

- ``svd``: truncated SVD of W (the best rank-k approximation of the weights).
- ``asvd`` (ASVD, github hahnyuan/ASVD4LLM): S = diag(mean|x_j|)^α (α = 0.5), SVD of W·S, then
  V ← S⁻¹V; the columns the inputs use most are kept best.
- ``svd-llm`` (SVD-LLM, github AIoT-MLSys-Lab/SVD-LLM): S = chol(E[x xᵀ]) (regularised if not
  positive definite), truncated SVD of W·S = U Σ Vᵀ, factors B = U_k √Σ_k and A = √Σ_k V_kᵀ S⁻¹: the
  best rank-k approximation of the *outputs* W·X on the calibration data.

x is what the matrix reads: the FFN input (site ``in``) for W_in and W_gate, the neuron activations
(site ``post``) for W_out. SVD and Cholesky run in float64; the factors take the model's dtype.

``ratio`` ρ is the share of each matrix's parameters removed: k = ⌊(1−ρ)·m·n/(m+n)⌋ (≥ 1), so the FFN
loses the share ρ of its weights when all its matrices are factorised; ``rank`` gives k directly.
``allocation="global"`` instead shares one budget over all chosen matrices (:func:`global_ranks`:
singular values ranked by their share of their matrix's energy per parameter).
GPT-2's Conv1D becomes a LowRankLinear like the others; Phi-3's fused gate_up is factorised as one
[2·d_ff, d_model] matrix (choose ``in`` and ``gate`` together). v5 expert tensors (MoE) are not
factorised: a clear error says to select dense layers.

The FFN handle still reads the weights (``find_ffns(model)[i].W_in`` is the product B·A, a read-only
copy: edit ``module.A.weight`` / ``module.B.weight`` to change the model), hooks at every site keep
working, and the change is recorded in ``model.config.ffnkit`` so that ``ffnkit.save``/``load``
rebuild the factor shapes and reproduce the logits exactly.

Example:
    >>> report = lowrank_(model, LowRankConfig("svd-llm", ratio=0.3), tokenizer=tok)
    >>> report.ffn_ratio_removed
    0.30
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ffnkit.core.archs import find_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN

__all__ = [
    "METHODS",
    "LowRankConfig",
    "LowRankLinear",
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

METHODS = ("svd", "asvd", "svd-llm")
MATRICES = ("in", "gate", "out")
CHANGE_KIND = "ffn_lowrank"


def _plain(w: Tensor) -> Tensor:
    """A plain tensor: quantised factors (torchao tensor subclasses) are dequantised."""
    if type(w) not in (Tensor, nn.Parameter) and hasattr(w, "dequantize"):
        return w.dequantize()
    return w


# ----- the factorised module ----------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """y = B(A(x)): A = Linear(n → k, no bias), B = Linear(k → m, the original bias).

    ``weight`` gives the product B·A [out, in] (like ``nn.Linear.weight``) and ``bias`` the bias, so
    FFN handles and hooks read it like the Linear it replaces. The product is a fresh copy: writing
    into it does not change the model; pruning a factorised matrix raises a clear error.

    Example:
        >>> lr = LowRankLinear(576, 1536, rank=200)
        >>> lr.weight.shape, lr(torch.randn(2, 576)).shape
        (torch.Size([1536, 576]), torch.Size([2, 1536]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.B(self.A(x))  # [..., n] -> [..., k] -> [..., m]

    @property
    def weight(self) -> Tensor:  # [out, in]
        return _plain(self.B.weight) @ _plain(self.A.weight)

    @property
    def bias(self) -> Tensor | None:  # [out]
        return self.B.bias

    @property
    def in_features(self) -> int:
        return self.A.in_features

    @property
    def out_features(self) -> int:
        return self.B.out_features

    @property
    def rank(self) -> int:
        return self.A.out_features

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "bias" and "B" in self._modules:
            self.B.bias = value  # an added output bias (FLAP's compensation) lives on B
            return
        if name in ("weight", "in_features", "out_features", "nx", "nf") and "B" in self._modules:
            raise InvalidArgumentError(
                f"this matrix is factorised (rank {self.rank}); its shape cannot be edited — prune "
                "before lowrank_, or edit the factors .A / .B"
            )
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        bias = self.B.bias is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={bias}"
        )


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


# ----- the maths ----------------------------------------------------------------------------------
def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """The rank k whose factors A [k, n] and B [m, k] keep the share 1−ratio of the m·n parameters.

    Example:
        >>> rank_for_ratio(1536, 576, 0.3)   # ⌊0.7·1536·576/2112⌋
        293
    """
    return max(1, min(min(m, n), int((1.0 - ratio) * m * n / (m + n))))


def _cholesky(gram: Tensor) -> tuple[Tensor, bool]:
    """Lower Cholesky factor of a (float64) E[xxᵀ]; adds a growing ridge when it is not positive definite."""
    scale = float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for i, ridge in enumerate((0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)):
        chol, info = torch.linalg.cholesky_ex(gram + ridge * scale * eye)
        if int(info) == 0:
            return chol, i > 0
    raise InvalidArgumentError("E[xxᵀ] is not positive definite even with a ridge; use more calibration")


@dataclass
class Decomposition:
    """W = B·A for every rank k ≤ min(m, n): W·S = U Σ Vᵀ in the method's input space, ``right``
    maps V_kᵀ back (V_kᵀ S⁻¹). Truncate with :meth:`factors`."""

    u: Tensor  # [m, r] float64
    s: Tensor  # [r]
    vh: Tensor  # [r, n]
    right: Any  # Tensor [k, n] -> Tensor [k, n]
    regularised: bool = False

    def factors(self, rank: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """(A [k, n], B [m, k], info) at rank k: A = √Σ_k V_kᵀ S⁻¹, B = U_k √Σ_k."""
        k = int(min(rank, self.s.numel()))
        root = self.s[:k].sqrt()  # [k]
        a = self.right(root[:, None] * self.vh[:k])  # [k, n]
        b = self.u[:, :k] * root[None, :]  # [m, k]
        energy = self.s.square()
        kept = float(energy[:k].sum() / energy.sum().clamp_min(1e-300))
        return a, b, {"regularised": self.regularised, "energy_kept": kept}


def decompose(
    weight: Tensor,
    method: str = "svd",
    *,
    mean_abs: Tensor | None = None,
    gram: Tensor | None = None,
    alpha: float = 0.5,
) -> Decomposition:
    """The SVD of W [m, n] in the method's input space (float64), ready to truncate at any rank.

    Example:
        >>> d = decompose(W, "svd-llm", gram=(X.T @ X) / len(X))
        >>> A, B, info = d.factors(64)
    """
    w = weight.detach().to(torch.float64)
    regularised = False
    if method == "svd":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        right = lambda v: v  # noqa: E731
    elif method == "asvd":
        if mean_abs is None:
            raise InvalidArgumentError("asvd needs the inputs' mean |x| (mean_abs=)")
        scale = mean_abs.detach().to(torch.float64).abs()
        # dead inputs: a tiny positive scale keeps S invertible (their columns matter least anyway)
        scale = scale.clamp_min(float(scale.max().clamp_min(1e-12)) * 1e-6) ** alpha  # [n]
        u, s, vh = torch.linalg.svd(w * scale[None, :], full_matrices=False)
        right = lambda v: v / scale[None, :]  # noqa: E731  V_kᵀ S⁻¹
    elif method == "svd-llm":
        if gram is None:
            raise InvalidArgumentError("svd-llm needs the inputs' E[xxᵀ] (gram=)")
        chol, regularised = _cholesky(gram.detach().to(torch.float64))  # S, S Sᵀ = E[xxᵀ]
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        # V_kᵀ S⁻¹: solve Y S = V_kᵀ (S is lower triangular)
        right = lambda v: torch.linalg.solve_triangular(chol, v, upper=False, left=False)  # noqa: E731
    else:
        raise InvalidArgumentError(f"unknown low-rank method {method!r}; use one of {', '.join(METHODS)}")
    return Decomposition(u, s, vh, right, regularised)


def factorize(
    weight: Tensor,
    rank: int,
    method: str = "svd",
    *,
    mean_abs: Tensor | None = None,
    gram: Tensor | None = None,
    alpha: float = 0.5,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Factorise W [m, n] ≈ B [m, k] · A [k, n] (float64) with ``method``; returns (A, B, info).

    ``mean_abs`` [n] (E|x_j|) is needed by asvd, ``gram`` [n, n] (E[xxᵀ]) by svd-llm.

    Example:
        >>> A, B, info = factorize(W, 64, "svd-llm", gram=(X.T @ X) / len(X))
        >>> (B @ A).shape == W.shape
        True
    """
    return decompose(weight, method, mean_abs=mean_abs, gram=gram, alpha=alpha).factors(rank)


def global_ranks(spectra: list[Tensor], shapes: list[tuple[int, int]], ratio: float) -> list[int]:
    """Ranks that keep the share 1−ratio of the parameters of all matrices together, chosen greedily by
    relative energy per parameter: singular value i of matrix j is worth σ_i²/Σσ² (its share of that
    matrix's output energy) and costs m_j + n_j parameters. Each matrix keeps at least rank 1 and at most
    the rank where its factors stop being smaller than it.

    Example:
        >>> global_ranks([d.s for d in decs], [(1536, 576)] * len(decs), 0.3)
    """
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes)
    ranks = [1] * len(spectra)
    used = sum(m + n for m, n in shapes)
    cand_gain, cand_mat = [], []
    for j, (s, (m, n)) in enumerate(zip(spectra, shapes, strict=True)):
        e = s.double().square()
        rel = e / e.sum().clamp_min(1e-300)
        cap = max(1, min(s.numel(), (m * n) // (m + n)))
        cand_gain.append(rel[1:cap] / (m + n))
        cand_mat.append(torch.full((max(0, cap - 1),), j, dtype=torch.long))
    gains, mats = torch.cat(cand_gain), torch.cat(cand_mat)
    # within a matrix gains fall with i, so taking the best first keeps each matrix's ranks a prefix
    for j in mats[torch.argsort(gains, descending=True, stable=True)].tolist():
        m, n = shapes[j]
        if used + m + n > budget:
            continue
        ranks[j] += 1
        used += m + n
    return ranks


@contextmanager
def _linalg_threads(n: int):
    """Run mid-size LAPACK calls (SVD, Cholesky) on ``n`` threads: on a busy machine, OpenMP threads
    waiting for a core can make a 1536×576 SVD 80× slower, while one thread loses little."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----- calibration statistics ---------------------------------------------------------------------
class _InputStats:
    """Streaming E|x| [n] and (optionally) E[xxᵀ] [n, n] in float64 of what one module reads."""

    def __init__(self, gram: bool) -> None:
        self.count = 0
        self.abs_sum: Tensor | None = None
        self.gram_sum: Tensor | None = None
        self.want_gram = gram

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [N, n]
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            if self.want_gram:
                self.gram_sum = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        if self.gram_sum is not None:
            self.gram_sum += (x.T @ x).double()  # per-batch product in float32, accumulated in float64
        self.count += x.shape[0]

    def result(self) -> dict[str, Tensor]:
        n = max(self.count, 1)
        out = {"mean_abs": self.abs_sum / n}
        if self.gram_sum is not None:
            out["gram"] = self.gram_sum / n
        return out


def _forward(model: nn.Module, ids: Tensor) -> None:
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    model(**kwargs)


@torch.no_grad()
def collect_lowrank_stats(
    model: nn.Module,
    calibration: Tensor,
    ffns: list[FFN] | None = None,
    *,
    sites: tuple[str, ...] = ("in", "post"),
    gram: bool = True,
    batch_size: int = 4,
    memory_budget: int = 1 << 30,
    progress: bool = False,
) -> dict[tuple[int, str], dict[str, Tensor]]:
    """E|x| and E[xxᵀ] (float64) of each FFN's matrix inputs: ``{(ffn.index, site): {"mean_abs", "gram"}}``.

    Sites: ``in`` (read by W_in/W_gate) and ``post`` (read by W_out). Layers are grouped so that the
    float64 accumulators of one pass stay under ``memory_budget`` bytes (one calibration pass per group).

    Example:
        >>> stats = collect_lowrank_stats(model, calibration_batches(load_corpus(), tok, 32, 256))
        >>> stats[(0, "post")]["gram"].shape
        torch.Size([1536, 1536])
    """
    from tqdm.auto import tqdm

    from ffnkit.core.capture import site_hooks

    ffns = [f for f in (ffns if ffns is not None else find_ffns(model)) if f.kind != "moe"]
    width = {"in": lambda f: f.d_model, "post": lambda f: f.d_ff}
    jobs = [(f, s) for f in ffns for s in sites]
    groups: list[list[tuple[FFN, str]]] = [[]]
    used = 0
    for f, s in jobs:
        cost = 8 * width[s](f) ** 2 if gram else 8 * width[s](f)
        if groups[-1] and used + cost > memory_budget:
            groups.append([])
            used = 0
        groups[-1].append((f, s))
        used += cost
    device = next(model.parameters()).device
    out: dict[tuple[int, str], dict[str, Tensor]] = {}
    for g, group in enumerate(groups):
        accs = {(f.index, s): _InputStats(gram) for f, s in group}
        handles = []
        try:
            for f, s in group:
                module, kind, extract = site_hooks(f, s)
                acc = accs[(f.index, s)]
                if kind == "pre":
                    hook = lambda mod, args, acc=acc, ex=extract: acc.update(ex(args, None))  # noqa: E731
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    hook = lambda mod, args, o, acc=acc, ex=extract: acc.update(ex(args, o))  # noqa: E731
                    handles.append(module.register_forward_hook(hook))
            steps = range(0, calibration.shape[0], batch_size)
            desc = "low-rank statistics" + (f" {g + 1}/{len(groups)}" if len(groups) > 1 else "")
            for i in tqdm(steps, desc=desc, disable=not progress):
                _forward(model, calibration[i : i + batch_size].to(device))
        finally:
            for h in handles:
                h.remove()
        out.update({key: acc.result() for key, acc in accs.items()})
    return out


# ----- planning the swaps -------------------------------------------------------------------------
def _dense(mod: nn.Module) -> Tensor:
    """A Linear / Conv1D / LowRankLinear weight in [out, in] orientation."""
    return mod.weight.T if isinstance(mod, Conv1D) else mod.weight


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
                f"{ffn.name} keeps W_gate and W_in in one fused matrix (gate_up_proj): factorise "
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
        if isinstance(mod, LowRankLinear):
            raise InvalidArgumentError(f"{ffn.name}: matrix {label!r} is already factorised")
        if not isinstance(mod, nn.Linear | Conv1D):
            raise InvalidArgumentError(
                f"{ffn.name}: matrix {label!r} is a {type(mod).__name__}, not a Linear; cannot factorise it"
            )
    return out


def _module_params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


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


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, child = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _calibration(config: LowRankConfig, calibration: Tensor | None, tokenizer: Any) -> Tensor:
    from ffnkit.data import calibration_ids

    return calibration_ids(config, calibration, tokenizer, what=f"method {config.method!r}")


def _build(mod: nn.Module, a: Tensor, b: Tensor) -> LowRankLinear:
    """A LowRankLinear with factors a [k, n], b [m, k] and ``mod``'s bias, dtype, device, requires_grad."""
    w = mod.weight
    bias = getattr(mod, "bias", None)
    new = LowRankLinear(a.shape[1], b.shape[0], a.shape[0], bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.A.weight.copy_(a)
        new.B.weight.copy_(b)
        if bias is not None:
            new.B.bias.copy_(bias)
    new.requires_grad_(w.requires_grad)
    new.train(mod.training)
    return new


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
    if config.needs_data and stats is None:
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
        if config.needs_data and not (stats or {}).get((ffn.index, site)):
            raise InvalidArgumentError(
                f"no calibration statistics for {ffn.name} site {site!r}; pass stats= from "
                "collect_lowrank_stats on this model, or calibration="
            )
    by_index: dict[int, dict[str, Any]] = {}
    with torch.no_grad(), _linalg_threads(1):

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
        if config.allocation == "global":  # every spectrum first, then one shared budget
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
            d = decs[i] if decs[i] is not None else dec(ffn, mod, site)
            decs[i] = None  # free the float64 factors as we go
            k = min(ranks[i], m, n)
            a, b, info = d.factors(k)
            regularised += int(info["regularised"])
            new = _build(mod, a, b)
            path = paths[id(mod)]
            swaps.append((path, new))
            bias = getattr(mod, "bias", None) is not None
            records.append({"path": path, "in_features": n, "out_features": m, "rank": k, "bias": bias})
            row = by_index.setdefault(ffn.index, {"index": ffn.index, "name": ffn.name, "matrices": {}})
            row["matrices"][label] = {
                "shape": [m, n],
                "rank": k,
                "params_before": _module_params(mod),
                "params_after": _module_params(new),
                "energy_kept": info["energy_kept"],
            }
    rows = list(by_index.values())
    _commit(model, swaps, records)
    after = _counts(model)
    ratio = 1.0 - after["ffn"] / before["ffn"] if before["ffn"] else 0.0
    notes = []
    if config.rank is not None and ratio < 0:
        notes.append("the explicit rank is above m·n/(m+n) for some matrices: they grew")
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
    from ffnkit.core.edit import record_change

    old_meta = copy.deepcopy(getattr(model.config, "ffnkit", None))
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, new in swaps:
            parent, child = _parent(model, path)
            done.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
        if records:
            record_change(model, {"kind": CHANGE_KIND, "modules": records})
    except BaseException:
        for parent, child, old in reversed(done):
            setattr(parent, child, old)
        if old_meta is None:
            if hasattr(model.config, "ffnkit"):
                delattr(model.config, "ffnkit")
        else:
            model.config.ffnkit = old_meta
        raise


def replay_lowrank(model: nn.Module, change: dict) -> None:
    """Rebuild the factor shapes of an ``ffn_lowrank`` change on a freshly built model (values are placeholders).

    Example:
        >>> replay_lowrank(fresh_model, model.config.ffnkit["changes"][-1])
    """
    for rec in change.get("modules", []):
        parent, child = _parent(model, rec["path"])
        old = getattr(parent, child)
        like = old.weight if not isinstance(old, LowRankLinear) else old.A.weight
        new = LowRankLinear(
            int(rec["in_features"]),
            int(rec["out_features"]),
            int(rec["rank"]),
            bool(rec["bias"]),
            dtype=like.dtype,
            device=like.device,
        )
        setattr(parent, child, new)


def _register() -> None:
    from ffnkit.io import REPLAYS, register_replay

    if CHANGE_KIND not in REPLAYS:
        register_replay(CHANGE_KIND, "ffnkit.compress.lowrank:replay_lowrank")


_register()


def cli_run(model: nn.Module, tokenizer: Any, opts: Any) -> LowRankReport:
    """``ffnkit compress --method svd|asvd|svd-llm``: the CLI's method function (``opts``: CompressOptions).

    ``opts.extra`` may hold ``rank``, ``matrices`` or ``layers``; the rank otherwise follows ``opts.ratio``.

    Example:
        >>> register_method("svd-llm", cli_run, "whitened SVD (SVD-LLM) of FFN matrices")
    """
    extra = dict(getattr(opts, "extra", None) or {})
    rank = extra.pop("rank", None)
    config = LowRankConfig(
        method=opts.method,
        ratio=None if rank is not None else opts.ratio,
        rank=rank,
        samples=opts.samples,
        seq_len=opts.seq_len,
        seed=opts.seed,
        corpus=opts.corpus,
        **{k: v for k, v in extra.items() if k in ("matrices", "layers", "alpha")},
    )
    return lowrank_(model, config, tokenizer=tokenizer, progress=getattr(opts, "progress", False))


CLI_METHODS = {
    "svd": "low rank: truncated SVD of each FFN matrix (data-free)",
    "asvd": "low rank: activation-aware SVD, S = diag(mean|x|)^0.5 (ASVD)",
    "svd-llm": "low rank: SVD whitened by chol(E[xxᵀ]) of calibration inputs (SVD-LLM)",
}
