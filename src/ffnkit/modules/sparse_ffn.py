"""``SparseFFN``: an FFN that skips the neurons (or input columns) that do not fire, per token.

:func:`ffnkit.sparsity.sparsify_` puts one in the place of each chosen FFN container (``model.layers.3.mlp``).
It keeps the container's own children under their own names (``gate_proj``, ``up_proj``, ``down_proj``,
``act_fn``...), so the state dict keys, ``find_ffns`` handles and edits through them are unchanged, and adds
the selector's thresholds as buffers (saved with the weights). Modes (what the selector zeroes):

- ``input`` (TEAL): x_j with |x_j·c_in_j| < t_in before gate/up, h_i with |h_i·c_mid_i| < t_mid before down.
- ``gate`` (CATS, CHESS): neurons with |act(gate_i)|·c_mid_i <= t_mid (the gate is always computed).
- ``stat`` (Spark-style statistical top-k): neurons whose activation magnitude v_i = |act(gate_i)| is below
  mean(v) + z·std(v) of the same token (no sort). Spark thresholds the pre-activation itself, which suits
  the ReLU-like activations it trains with; on SwiGLU that drops the neurons at SiLU's negative lobe
  (act ≈ -0.28 near g = -1.3, where SmolLM2's gates mostly sit) and gave ×256 dense perplexity at 25%.
- ``predictor`` (Deja Vu): neurons whose low-rank score B(A x) + b <= t_mid.

Paths: one token with no hook attached and no gradient runs the kernels of :mod:`ffnkit.kernels.sparse_ffn`
(``teal_ffn``, ``threshold_ffn``, ``predicted_ffn``, ``gather_ffn`` over a neuron-major packed copy built on
first use and rebuilt when a weight changes). In the modes ``input``, ``predictor`` and ``gate`` (without
per-neuron scales) that path never syncs the GPU (thresholds are read once per change of the buffers), so a
decode step through it can be captured in a CUDA graph. Anything else (prefill, batches, training, hooks attached) runs the exact
masked dense computation through the container's own projections, passing every site through a
:class:`~ffnkit.modules.base.HookPoint` (``hook_in`` ... ``hook_out``) so ``capture`` and ``steer`` see the
masked tensors (``post`` is what W_out reads). With every threshold off it equals the original FFN bit for bit.

Example:
    >>> sparse = SparseFFN(model.model.layers[0].mlp, SparseSpec("up_proj", "gate_proj", "down_proj", "act_fn"),
    ...                    mode="gate", d_model=576, d_ff=1536)
    >>> sparse.t_mid.fill_(0.05); y = sparse(torch.randn(1, 1, 576))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.modules.base import HookPoint, RuntimeModule

__all__ = ["MODES", "SparseFFN", "SparseSpec"]

MODES = ("input", "gate", "stat", "predictor")
CHANGE_KIND = "ffn_sparsity"


@dataclass(frozen=True)
class SparseSpec:
    """Where the parts of the FFN container are: child names of W_in (up), W_gate, W_out and the activation.

    ``gate`` is None for plain (non-gated) FFNs; ``fused`` means ``in_name`` holds [gate | up] rows (Phi-3).

    Example:
        >>> SparseSpec("up_proj", "gate_proj", "down_proj", "act_fn").gated
        True
    """

    in_name: str
    gate_name: str | None
    out_name: str
    act_name: str | None
    fused: bool = False
    act_kernel: str | None = None  # the kernels' activation name, or None (masked path only)
    act_hf: str | None = None  # Hugging Face activation name, where the container holds no activation module

    @property
    def gated(self) -> bool:
        return self.gate_name is not None


class SparseFFN(RuntimeModule):
    """A gated or plain FFN whose selector zeroes small activations; see the module doc.

    Example:
        >>> sparse = SparseFFN(mlp, SparseSpec("up_proj", "gate_proj", "down_proj", "act_fn"), mode="input",
        ...                    d_model=576, d_ff=1536)
        >>> sparse(torch.randn(2, 5, 576)).shape
        torch.Size([2, 5, 576])
    """

    change_kind = CHANGE_KIND
    weights_writable = True
    sites = ("in", "pre", "gate", "post", "out")
    resize_refusal = (
        "this FFN is sparsified: its thresholds and per-neuron scales were calibrated for its current "
        "neurons; compress (prune) first, then sparsify"
    )

    def __init__(
        self,
        container: nn.Module,
        spec: SparseSpec,
        *,
        mode: str,
        d_model: int,
        d_ff: int,
        rank: int = 0,
        act_fn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise InvalidArgumentError(f"unknown sparsity mode {mode!r}: use one of {', '.join(MODES)}")
        if mode in ("stat", "predictor") and rank < 0:
            raise InvalidArgumentError("rank must be >= 0")
        for name, child in container.named_children():  # same names -> same state dict keys
            self.add_module(name, child)
        self.spec, self.mode, self.d_model, self.d_ff, self.rank = (
            spec,
            mode,
            int(d_model),
            int(d_ff),
            int(rank),
        )
        if act_fn is None and spec.act_name:
            act_fn = getattr(container, spec.act_name, None)
        if act_fn is None and spec.act_hf:
            from transformers.activations import ACT2FN

            act_fn = ACT2FN[spec.act_hf]
        if act_fn is None:
            raise InvalidArgumentError(f"the FFN has no activation module {spec.act_name!r}")
        self._act = act_fn
        for site in self.sites:
            setattr(self, f"hook_{site}", HookPoint(site))
        f32 = dict(dtype=torch.float32)
        off = 0.0 if mode in ("input", "gate") else -math.inf  # "no threshold" of each mode
        self.register_buffer("t_in", torch.zeros((), **f32))
        self.register_buffer("t_mid", torch.full((), off, **f32))
        self.register_buffer("c_in", torch.ones(self.d_model, **f32))
        self.register_buffer("c_mid", torch.ones(self.d_ff, **f32))
        if mode == "predictor":
            self.register_buffer("pred_a", torch.zeros(self.rank, self.d_model, **f32))
            self.register_buffer("pred_b", torch.zeros(self.d_ff, self.rank, **f32))
            self.register_buffer("pred_bias", torch.zeros(self.d_ff, **f32))
        self.enabled = True  # False: the dense FFN (sensitivity probes during calibration)
        self.use_kernels = True  # False: always the masked dense path
        self.counter: dict[str, float] | None = None  # set by ffnkit.sparsity.measure_sparsity
        self._cache: tuple[tuple, Any] | None = None
        self._t_cache: tuple[tuple, tuple[float, float]] | None = None

    # ----- parts ---------------------------------------------------------------------------------
    # (not named in_proj / gate_proj: those are often the container's own child names)
    @property
    def w_in_module(self) -> nn.Module:
        return self._modules[self.spec.in_name]

    @property
    def w_gate_module(self) -> nn.Module | None:
        return self._modules[self.spec.gate_name] if self.spec.gate_name else None

    @property
    def w_out_module(self) -> nn.Module:
        return self._modules[self.spec.out_name]

    def activation(self, g: Tensor) -> Tensor:
        return self._act(g)

    # ----- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x = hidden_states  # [..., d]
        if not self.enabled:
            return self.masked_forward(x, masks=False)
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            rows == 1
            and self.use_kernels
            and self.counter is None
            and not torch.is_grad_enabled()
            and not self._hooked()
        ):
            y = self._kernel_forward(x)
            if y is not None:
                return y
        return self.masked_forward(x)

    def _hooked(self) -> bool:
        return any(p._forward_hooks or p._forward_pre_hooks for p in self.hook_points().values())

    def masked_forward(self, x: Tensor, *, masks: bool = True) -> Tensor:
        """The exact masked dense FFN through the container's projections (every site hooked).

        ``masks=False``: the original dense FFN. x [..., d] -> [..., d].
        """
        x = self.hook_in(x)
        on = masks and self.enabled
        xs = x
        if on and self.mode == "input" and float(self.t_in) > 0:
            keep_x = (x * self.c_in.to(x.dtype)).abs() >= self.t_in.to(x.dtype)  # [..., d]
            xs = torch.where(keep_x, x, torch.zeros_like(x))
            self._count("in", keep_x)
        if self.spec.fused:
            gu = self.w_in_module(xs)  # [..., 2f]: [gate | up]
            g, u = gu[..., : self.d_ff], gu[..., self.d_ff :]
        else:
            u = self.w_in_module(xs)  # [..., f]
            g = self.w_gate_module(xs) if self.spec.gated else None
        u = self.hook_pre(u)
        if g is not None:
            g = self.hook_gate(g)
            a = self.activation(g)
            post = a * u  # [..., f]
        else:
            a, post = None, self.activation(u)
        keep = self._mid_mask(x, g if g is not None else u, a, post) if on else None
        if keep is not None:
            post = torch.where(keep, post, torch.zeros_like(post))
            self._count("post", keep)
        post = self.hook_post(post)
        return self.hook_out(self.w_out_module(post))  # [..., d]

    def _mid_mask(self, x: Tensor, g: Tensor, a: Tensor | None, post: Tensor) -> Tensor | None:
        """Which neurons stay [..., f] (None: all)."""
        t = float(self.t_mid)
        if self.mode == "input":
            return (post * self.c_mid.to(post.dtype)).abs() >= self.t_mid.to(post.dtype) if t > 0 else None
        if self.mode == "gate":
            act = a if a is not None else post
            return act.abs() * self.c_mid.to(act.dtype) > self.t_mid.to(act.dtype) if t > 0 else None
        if not math.isfinite(t):
            return None
        if self.mode == "stat":
            v = self.activation(g.float()).abs()  # [..., f]: g is the gate (or plain FFN) pre-activation
            mu, sd = v.mean(-1, keepdim=True), v.std(-1, keepdim=True)
            return v >= mu + self.t_mid * sd
        return self.predict(x) > self.t_mid  # predictor

    def predict(self, x: Tensor) -> Tensor:
        """The predictor's scores [..., f] for inputs x [..., d] (float32)."""
        return (x.float() @ self.pred_a.T) @ self.pred_b.T + self.pred_bias

    def _count(self, site: str, keep: Tensor) -> None:
        if self.counter is not None:
            self.counter[f"{site}_zeroed"] = self.counter.get(f"{site}_zeroed", 0.0) + float((~keep).sum())
            self.counter[f"{site}_total"] = self.counter.get(f"{site}_total", 0.0) + float(keep.numel())

    # ----- the decode kernels --------------------------------------------------------------------
    def _kernel_weights(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(W_gate [f, d], W_up [f, d], W_down [d, f]) where the kernels apply, else None."""
        if not self.spec.gated or self.spec.act_kernel is None:
            return None
        mods = [self.w_in_module, self.w_out_module] + ([] if self.spec.fused else [self.w_gate_module])
        if any(type(m) is not nn.Linear for m in mods) or any(
            m.bias is not None for m in mods[:1] + mods[2:]
        ):
            return None
        if self.spec.fused:
            w = self.w_in_module.weight
            return w[: self.d_ff], w[self.d_ff :], self.w_out_module.weight
        return self.w_gate_module.weight, self.w_in_module.weight, self.w_out_module.weight

    def _packed(self) -> Any:
        """The kernels' layout of the current weights (rebuilt when a weight or a scale changes)."""
        packed = self._pack_entry()
        return None if packed is None else packed[0]

    def _pack_entry(self) -> tuple[Any, bool, bool] | None:
        """(packed weights, c_in all ones, c_mid all ones), cached: the two flags are read on the host once
        per pack, not per token (a read per token would sync the GPU and break CUDA-graph capture)."""
        from ffnkit.kernels.sparse_ffn import pack_ffn, pack_teal

        weights = self._kernel_weights()
        if weights is None:
            return None
        tensors = [*weights, self.c_in, self.c_mid]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        wg, wu, wd = (w.detach() for w in weights)
        if self.mode == "input":
            c_in, c_mid = self.c_in.to(wg.dtype), self.c_mid.to(wg.dtype)
            # per-channel thresholds folded into the weights: x' = x*c_in, h' = h*c_mid (scalar thresholds)
            packed = pack_teal(wg / c_in, wu * c_mid[:, None] / c_in, wd / c_mid)
        else:
            packed = pack_ffn(wg, wu, wd)
        entry = (packed, bool((self.c_in == 1).all()), bool((self.c_mid == 1).all()))
        self._cache = (key, entry)
        return entry

    def _thresholds(self) -> tuple[float, float]:
        """(t_in, t_mid) as numbers, cached on the buffers' version counters (no GPU sync per token)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.t_in, self.t_mid))
        cached = self._t_cache
        if cached is None or cached[0] != key:
            cached = (key, (float(self.t_in), float(self.t_mid)))
            self._t_cache = cached
        return cached[1]

    def _kernel_forward(self, x: Tensor) -> Tensor | None:
        from ffnkit.kernels.sparse_ffn import gather_ffn, predicted_ffn, teal_ffn, threshold_ffn

        entry = self._pack_entry()
        if entry is None:
            return None
        packed, c_in_ones, c_mid_ones = entry
        act, bias = self.spec.act_kernel, self.w_out_module.bias
        w_dtype = packed.down_t.dtype if self.mode == "input" else packed.dtype
        if x.dtype != w_dtype:
            return None
        flat = x.reshape(1, self.d_model)  # [1, d]
        t_in, t = self._thresholds()
        if self.mode == "input":
            xin = flat if c_in_ones else flat * self.c_in.to(x.dtype)
            y = teal_ffn(xin, packed, t_in, t, act=act)
        elif self.mode == "gate" and c_mid_ones:
            y = threshold_ffn(flat, packed, t, act=act)
        elif self.mode == "predictor":
            # the low-rank projection here, the scores inside the kernel: same mask as _mid_mask's predict
            # up to float32 summation order (see predicted_ffn)
            z = flat.float() @ self.pred_a.float().T  # [1, rank]
            y = predicted_ffn(flat, packed, z, self.pred_b, self.pred_bias, t, act=act)
        else:
            g = flat @ self._kernel_weights()[0].T  # [1, f]: the whole gate, contiguous rows
            if self.mode == "gate":
                a = self.activation(g)
                keep = a.abs() * self.c_mid.to(a.dtype) > self.t_mid.to(a.dtype) if t > 0 else None
            else:
                keep = self._mid_mask(flat, g, None, g)
            idx = keep[0].nonzero()[:, 0] if keep is not None else torch.arange(self.d_ff, device=x.device)
            y = gather_ffn(flat, packed, idx, act=act)
        if bias is not None:
            y = y + bias
        return y.reshape(x.shape)

    # ----- replay --------------------------------------------------------------------------------
    def to_record(self, path: str) -> dict[str, Any]:
        """The row of an ``ffn_sparsity`` change that rebuilds this module at ``path``.

        Example:
            >>> sparse.to_record("model.layers.0.mlp")["mode"]
            'input'
        """
        return {
            "path": path,
            "mode": self.mode,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "rank": self.rank,
            "spec": asdict(self.spec),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: nn.Module) -> SparseFFN:
        """A SparseFFN around the freshly built container ``like``, with placeholder thresholds.

        Example:
            >>> SparseFFN.from_record(sparse.to_record("model.layers.0.mlp"), fresh.model.layers[0].mlp)
        """
        return cls(
            like,
            SparseSpec(**record["spec"]),
            mode=str(record["mode"]),
            d_model=int(record["d_model"]),
            d_ff=int(record["d_ff"]),
            rank=int(record.get("rank", 0)),
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, d_model={self.d_model}, d_ff={self.d_ff}, rank={self.rank}"
