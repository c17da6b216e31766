"""Calibration for the sparsity rules: FFN inputs captured on calibration text, thresholds from quantiles,
per-layer output errors, and the greedy error paths of TEAL-style input sparsity.

:class:`Calibration` holds, per chosen FFN, a :class:`~ffnkit.modules.sparse_ffn.SparseFFN` built around
the model's own container (not yet in the model, weights shared) and the FFN inputs x [N, d] of ``tokens``
calibration tokens (float32). Rules set the modules' thresholds; :func:`ffnkit.sparsity.sparsify_` then
puts the modules in. Reuse one Calibration for several targets (``sparsify_(..., stats=cal)``): the inputs
and error paths are computed once.

Example:
    >>> cal = Calibration.collect(model, find_ffns(model), ids, SparsityConfig("teal", 0.4))
    >>> cal.inputs[0].shape
    torch.Size([4096, 576])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.capture import capture
from ffnkit.core.errors import InvalidArgumentError, UnsupportedArchitectureError
from ffnkit.core.ffn import FFN
from ffnkit.modules.sparse_ffn import SparseFFN, SparseSpec

__all__ = [
    "Calibration",
    "LayerPlan",
    "bytes_skipped",
    "build_sparse",
    "max_skippable",
    "quantile",
    "site_weights",
]


@dataclass
class LayerPlan:
    """The thresholds of one FFN and the sparsity they give on calibration text.

    ``site_sparsity``: share of zeroed activations per site (``in``: x entries, ``post``: neurons);
    ``bytes_skipped``: share of the FFN's weight bytes a batch-1 decode step does not read.

    Example:
        >>> LayerPlan(index=0, t_in=0.1, t_mid=0.02, site_sparsity={"in": 0.5, "post": 0.3}).t_in
        0.1
    """

    index: int
    t_in: float = 0.0
    t_mid: float = 0.0
    c_in: Tensor | None = None  # [d]
    c_mid: Tensor | None = None  # [f]
    predictor: tuple[Tensor, Tensor, Tensor] | None = None  # A [r, d], B [f, r], bias [f]
    site_sparsity: dict[str, float] = field(default_factory=dict)
    bytes_skipped: float = 0.0

    def apply(self, module: SparseFFN) -> None:
        """Write the thresholds into ``module``'s buffers."""
        with torch.no_grad():
            module.t_in.fill_(self.t_in)
            module.t_mid.fill_(self.t_mid)
            module.c_in.copy_(self.c_in if self.c_in is not None else torch.ones_like(module.c_in))
            module.c_mid.copy_(self.c_mid if self.c_mid is not None else torch.ones_like(module.c_mid))
            if self.predictor is not None:
                module.pred_a.copy_(self.predictor[0])
                module.pred_b.copy_(self.predictor[1])
                module.pred_bias.copy_(self.predictor[2])

    def row(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "index": self.index,
            "t_in": self.t_in,
            "t_mid": self.t_mid if math.isfinite(self.t_mid) else None,
            "channel_scaled": self.c_in is not None or self.c_mid is not None,
            "site_sparsity": dict(self.site_sparsity),
            "bytes_skipped": self.bytes_skipped,
        }


def site_weights(gated: bool) -> tuple[float, float]:
    """Shares of an FFN's weight bytes read per input column (gate+up) and per neuron of down, as
    (w_in, w_mid): (2/3, 1/3) for gated FFNs, (1/2, 1/2) for plain ones.

    Example:
        >>> site_weights(True)
        (0.6666666666666666, 0.3333333333333333)
    """
    return (2.0 / 3.0, 1.0 / 3.0) if gated else (0.5, 0.5)


def bytes_skipped(mode: str, gated: bool, s_in: float, s_mid: float, overhead: float = 0.0) -> float:
    """Share of FFN weight bytes a batch-1 step skips, from the shares of zeroed inputs ``s_in`` and
    neurons ``s_mid``. ``input`` (TEAL) skips input columns of gate/up and of down; ``gate`` and ``stat``
    read the whole gate (or W_in), skipping the rest of each zeroed neuron; ``predictor`` skips whole
    neurons and reads its own factors (``overhead``, in FFN-byte units).

    Example:
        >>> round(bytes_skipped("gate", True, 0.0, 0.6), 3)
        0.4
    """
    w_in, w_mid = site_weights(gated)
    if mode == "input":
        return w_in * s_in + w_mid * s_mid
    if mode in ("gate", "stat"):
        return (1.0 - (1.0 / 3.0 if gated else 0.5)) * s_mid
    if mode == "predictor":
        return s_mid - overhead
    raise InvalidArgumentError(f"unknown sparsity mode {mode!r}")


def max_skippable(mode: str, gated: bool) -> float:
    """The largest share of weight bytes a mode can skip (all activations zeroed).

    Example:
        >>> round(max_skippable("gate", True), 3)
        0.667
    """
    return bytes_skipped(mode, gated, 1.0, 1.0)


def quantile(values: Tensor, q: float, *, limit: int = 4_000_000) -> float:
    """The q-quantile of ``values`` (any shape; a fixed random subsample above ``limit`` elements).

    Example:
        >>> quantile(torch.arange(100.0), 0.25)
        24.0
    """
    flat = values.reshape(-1).float()
    if flat.numel() > limit:
        gen = torch.Generator().manual_seed(0)
        flat = flat[torch.randint(0, flat.numel(), (limit,), generator=gen).to(flat.device)]
    if q <= 0.0:
        return float(flat.min()) if flat.numel() else 0.0
    k = min(max(int(math.ceil(q * flat.numel())), 1), flat.numel())
    return float(flat.kthvalue(k).values)


def _child_name(container: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, child in container.named_children():
        if child is module:
            return name
    return None


def build_sparse(ffn: FFN, mode: str, *, rank: int = 0) -> SparseFFN:
    """A :class:`SparseFFN` around ``ffn``'s container (weights shared, thresholds off).

    One-line errors for what it cannot wrap: MoE layers, and FFNs whose projections are not direct
    children of their own container (OPT, BERT: the FFN lives in the whole block).

    Example:
        >>> build_sparse(find_ffns(model)[0], "input").mode
        'input'
    """
    from ffnkit.kernels.sparse_ffn import HF_ACTIVATIONS

    if ffn.kind == "moe":
        raise UnsupportedArchitectureError(
            f"{ffn.name} is a mixture of experts: activation sparsity applies to dense FFNs; select dense "
            "layers with layers=[...]"
        )
    container = ffn.module
    names = {
        "in": _child_name(container, ffn.in_proj),
        "gate": _child_name(container, ffn.gate_proj) if ffn.gate_proj is not None else None,
        "out": _child_name(container, ffn.out_proj),
    }
    parts = {id(m) for m in (ffn.in_proj, ffn.gate_proj, ffn.out_proj) if m is not None}
    extra = [
        n for n, c in container.named_children() if id(c) not in parts and any(True for _ in c.parameters())
    ]
    if names["in"] is None or names["out"] is None or extra:
        raise UnsupportedArchitectureError(
            f"{ffn.name} ({ffn.family}) keeps its FFN inside a larger block: activation sparsity needs an FFN "
            "module of its own (Llama, Qwen, Gemma, Mistral, Phi, GPT-2, GPT-NeoX families)"
        )
    act_name = _child_name(container, ffn.act_fn)
    fused = ffn.fused_gate_up
    spec = SparseSpec(
        in_name=names["in"],
        gate_name=None if fused or ffn.kind != "gated" else names["gate"],
        out_name=names["out"],
        act_name=act_name,
        fused=fused,
        act_kernel=HF_ACTIVATIONS.get(ffn.activation),
        act_hf=ffn.activation if act_name is None else None,
    )
    if fused:  # a fused [gate | up] matrix is gated: the spec marks it through gate_name
        spec = SparseSpec(**{**spec.__dict__, "gate_name": spec.in_name})
    module = SparseFFN(
        container, spec, mode=mode, d_model=ffn.d_model, d_ff=ffn.d_ff, rank=rank, act_fn=ffn.act_fn
    )
    return module.to(device=next(container.parameters()).device)


@contextlib.contextmanager
def installed(model: nn.Module, pairs: list[tuple[FFN, SparseFFN]]) -> Iterator[None]:
    """Put the modules in the model for a while (calibration probes), then the original containers back."""
    done = []
    try:
        for ffn, module in pairs:
            owner_path, _, attr = ffn.name.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            done.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, module)
        yield
    finally:
        for owner, attr, old in reversed(done):
            setattr(owner, attr, old)


@dataclass
class Calibration:
    """Calibration data of one model for the sparsity rules (see the module doc).

    Example:
        >>> cal = Calibration.collect(model, ffns, ids, config)
        >>> cal.sites(0, ["post"])["post"].shape
        torch.Size([4096, 1536])
    """

    model: nn.Module
    ffns: list[FFN]
    ids: Tensor  # [n, T] calibration windows
    inputs: dict[int, Tensor]  # FFN index -> x [N, d] float32
    modules: dict[int, SparseFFN] = field(default_factory=dict)
    paths: dict[tuple, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # rule-specific results shared across targets

    @classmethod
    def collect(
        cls,
        model: nn.Module,
        ffns: list[FFN],
        ids: Tensor,
        tokens: int,
        *,
        batch_size: int = 4,
        seed: int = 0,
    ) -> Calibration:
        """Capture the inputs of ``ffns`` on ``ids`` [n, T], keeping ``tokens`` random tokens per FFN.

        Example:
            >>> cal = Calibration.collect(model, find_ffns(model), ids, tokens=4096)
        """
        n_total = ids.numel()
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(n_total, generator=gen)[: min(tokens, n_total)].sort().values  # [N]
        chunks: dict[int, list[Tensor]] = {f.index: [] for f in ffns}
        device = next(model.parameters()).device
        start = 0
        with torch.no_grad():
            for b in range(0, ids.shape[0], batch_size):
                batch = ids[b : b + batch_size].to(device)
                n = batch.numel()
                sel = keep[(keep >= start) & (keep < start + n)] - start
                with capture(model, sites=["in"], layers=[f.index for f in ffns], raw=True) as cap:
                    model(input_ids=batch)
                for f in ffns:
                    x = cap.calls("in", f.index)[-1].reshape(n, -1)  # [n, d]
                    chunks[f.index].append(x[sel.to(x.device)].float())
                start += n
        inputs = {i: torch.cat(c) for i, c in chunks.items()}
        return cls(model, ffns, ids, inputs)

    # ----- per-layer helpers -----------------------------------------------------------------------
    def module(self, index: int, mode: str, rank: int = 0) -> SparseFFN:
        """The SparseFFN of FFN ``index`` in ``mode`` (built once per index and mode)."""
        key = (index, mode, rank)
        if key not in self.cache:
            ffn = next(f for f in self.ffns if f.index == index)
            self.cache[key] = build_sparse(ffn, mode, rank=rank)
        return self.cache[key]

    def x(self, index: int, tokens: int | None = None) -> Tensor:
        """Calibration inputs [N, d] of FFN ``index`` in the model's dtype (the first ``tokens``)."""
        x = self.inputs[index] if tokens is None else self.inputs[index][:tokens]
        w = next(p for p in self.modules_of(index).parameters())
        return x.to(dtype=w.dtype, device=w.device)

    def modules_of(self, index: int) -> nn.Module:
        return next(f for f in self.ffns if f.index == index).module

    def sites(
        self, module: SparseFFN, x: Tensor, names: list[str], *, masks: bool = True
    ) -> dict[str, Tensor]:
        """Site tensors of ``module`` on inputs x (float32), with its current thresholds (or none)."""
        got: dict[str, Tensor] = {}
        handles = [
            module.hook_points()[s].register_forward_hook(
                lambda m, a, out, _s=s: got.__setitem__(_s, out.detach().float())
            )
            for s in names
            if s != "out"
        ]
        try:
            with torch.no_grad():
                got["out"] = module.masked_forward(x, masks=masks).float()
        finally:
            for h in handles:
                h.remove()
        return got

    def dense_out(self, index: int, tokens: int | None = None) -> Tensor:
        """The dense FFN output [N, d] on the calibration inputs (cached)."""
        key = ("dense", index, tokens)
        if key not in self.cache:
            module = self.module(index, "input")
            self.cache[key] = self.sites(module, self.x(index, tokens), ["out"], masks=False)["out"]
        return self.cache[key]

    def error(self, module: SparseFFN, index: int, tokens: int | None = None) -> float:
        """Relative output error ‖y − ŷ‖² / ‖y‖² of ``module``'s thresholds on the calibration inputs."""
        y = self.dense_out(index, tokens)
        y_hat = self.sites(module, self.x(index, tokens), ["out"])["out"]
        return float((y - y_hat).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
