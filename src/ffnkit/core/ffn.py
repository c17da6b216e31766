"""The FFN handle: one object per feed-forward block, with its weights in one orientation.

Whatever the model stores (``nn.Linear`` [out, in], GPT-2's ``Conv1D`` [in, out], Phi-3's fused
gate-and-up projection, transformers v5's 3-D expert tensors, low-rank or quantised matrices: one
adapter each in :mod:`ffnkit.core.layouts`), a handle reads them as

- ``W_in``, ``W_gate``: [d_ff, d_model] — row i is neuron i's key,
- ``W_out``: [d_model, d_ff] — column i is neuron i's value vector,
- ``b_in``, ``b_gate``: [d_ff] or None, ``b_out``: [d_model] or None.

The tensors are *views* of the model's parameters, so an in-place edit of ``ffn.W_out[:, i]`` edits the
model. Where a matrix is not stored as such (a low-rank product, a dequantised matrix: see
:mod:`ffnkit.core.layouts`), the handle returns a read-only tensor and a write raises
``ReadOnlyWeightError`` instead of silently changing a copy. A handle taken before a structural change
that it did not take part in (``lowrank_``, ``quantize_``, a removed sublayer, an edit through another
handle) raises ``StaleHandleError`` when used: call ``find_ffns`` again. ``FFN.forward`` recomputes the
block from these canonical weights; the test matrix checks it against what the model itself computes,
for every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError, StaleHandleError
from ffnkit.core.layouts import EXPERTS, layout_of
from ffnkit.core.views import generation
from ffnkit.modules.base import packed_numel

KINDS = ("mlp", "gated", "moe")


class WeightRef:
    """Reads (and writes back) one canonical weight from wherever the model keeps it, through its layout
    adapter (:mod:`ffnkit.core.layouts`). Where the layout stores the matrix as such, :meth:`get` is a
    view (an in-place edit reaches the model); otherwise a read-only tensor that refuses writes."""

    def get(self) -> Tensor:
        raise NotImplementedError

    @property
    def writable(self) -> bool:
        """Whether :meth:`get` is a view of stored parameters (edits reach the model)."""
        raise NotImplementedError

    def set(self, value: Tensor) -> None:
        """Overwrite in place (same shape); the value is given in canonical orientation. A matrix that is
        not stored as such (low-rank, quantised) raises ``ReadOnlyWeightError``."""
        with torch.no_grad():
            self.get().copy_(value)

    def parameter(self) -> Tensor:
        """The stored parameter this weight is read from (e.g. to read its gradient)."""
        raise NotImplementedError

    def view_of(self, full: Tensor) -> Tensor:
        """The same slice and orientation of ``full`` (a tensor shaped like :meth:`parameter`) that
        :meth:`get` reads from the parameter."""
        raise NotImplementedError


@dataclass
class LinearWeight(WeightRef):
    """The weight of a matrix module (``nn.Linear``, GPT-2's Conv1D, low-rank, quantised) as [out, in].

    ``rows`` selects a slice of the output rows (a fused gate-and-up projection: gate = first half, up =
    second).

    Example:
        >>> LinearWeight(model.model.layers[0].mlp.up_proj).get().shape   # [d_ff, d_model]
    """

    module: nn.Module
    rows: slice | None = None

    def get(self) -> Tensor:
        w = layout_of(self.module).weight(self.module)  # [out, in]
        return w if self.rows is None else w[self.rows]

    @property
    def writable(self) -> bool:
        return layout_of(self.module).writable

    def parameter(self) -> Tensor:
        return layout_of(self.module).parameter(self.module)

    def view_of(self, full: Tensor) -> Tensor:
        w = layout_of(self.module).view_of(self.module, full)
        return w if self.rows is None else w[self.rows]


@dataclass
class LinearBias(WeightRef):
    """The bias of a matrix module (a parameter in every layout), optionally a slice of its rows."""

    module: nn.Module
    rows: slice | None = None

    def get(self) -> Tensor:
        b = self.module.bias
        return b if self.rows is None else b[self.rows]

    @property
    def writable(self) -> bool:
        return True

    def parameter(self) -> Tensor:
        return self.module.bias

    def view_of(self, full: Tensor) -> Tensor:
        return full if self.rows is None else full[self.rows]


@dataclass
class ExpertWeight(WeightRef):
    """One expert's slice of a v5 3-D expert tensor ``module.<tensor>`` ([E, 2*d_ff, d_model] or
    [E, d_model, d_ff]; ``transpose`` where the model keeps [E, in, out]).

    Example:
        >>> ExpertWeight(experts, "down_proj", expert=3).get().shape   # [d_model, d_ff]
    """

    module: nn.Module
    tensor: str
    expert: int
    rows: slice | None = None
    transpose: bool = False

    def get(self) -> Tensor:
        w = EXPERTS.expert_weight(self.module, self.tensor, self.expert, self.transpose)  # [out, in]
        return w if self.rows is None else w[self.rows]

    @property
    def writable(self) -> bool:
        return EXPERTS.tensor_writable(self.module, self.tensor)

    def parameter(self) -> Tensor:
        return EXPERTS.expert_parameter(self.module, self.tensor)

    def view_of(self, full: Tensor) -> Tensor:
        w = full[self.expert]
        w = w.T if self.transpose else w
        return w if self.rows is None else w[self.rows]


@dataclass
class Router:
    """A top-k router. transformers' routers: logits = W x, probabilities = softmax(logits), keep the top
    k, optionally renormalise. A router module that defines ``router_logits(x)`` and ``select(logits)``
    (ffnkit's :class:`~ffnkit.modules.moe.MoERouter`: MLP routers, weight-1 routing, MoE++ experts) is
    asked instead, so the handle routes exactly as the module does.
    """

    module: nn.Module
    top_k: int
    norm_topk: bool

    @property
    def weight(self) -> Tensor:  # [E, d_model] (linear routers)
        return self.module.weight

    @property
    def num_experts(self) -> int:
        n = getattr(self.module, "num_experts", None)
        return int(n) if isinstance(n, int) else self.weight.shape[0]

    def logits(self, x: Tensor) -> Tensor:
        """x [N, d] -> router logits [N, E]."""
        if hasattr(self.module, "router_logits"):
            return self.module.router_logits(x)
        return x @ self.weight.T

    def select(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """logits [N, E] -> (top-k weights [N, k], expert indices [N, k]) by the module's rule."""
        if hasattr(self.module, "select"):
            return self.module.select(logits)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w, top_i

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, d] -> (logits [N, E], top-k weights [N, k], top-k expert indices [N, k])."""
        logits = self.logits(x)  # [N, E]
        top_w, top_i = self.select(logits)
        return logits, top_w.to(x.dtype), top_i

    def parameters(self) -> list[Tensor]:
        """The router's weight tensors."""
        return list(self.module.parameters())

    def flops_per_token(self) -> int:
        """2 × the multiply-adds of its matrices per token."""
        return sum(2 * p.numel() for p in self.module.parameters() if p.dim() == 2)


@dataclass(eq=False)
class FFN:
    """Handle on one feed-forward block. Build them with :func:`ffnkit.find_ffns`.

    Example:
        >>> ffn = find_ffns(model)[3]
        >>> ffn.kind, ffn.d_model, ffn.d_ff          # ('gated', 576, 1536)
        >>> value_vector = ffn.W_out[:, 42]          # what neuron 42 writes to the residual stream
    """

    index: int  # position in find_ffns' list (what ``layers=`` selects)
    layer: int  # block number within its stack
    name: str  # module path of the block's container (e.g. "model.layers.3.mlp")
    kind: str  # "mlp" | "gated" | "moe"
    family: str
    d_model: int
    d_ff: int
    activation: str
    act_fn: Callable[[Tensor], Tensor] | None
    module: nn.Module  # the container whose parts are below (the mlp, or the whole block)
    stack: str = ""  # "" for single-stack models, "encoder" / "decoder" for T5
    # dense parts: modules to hook, and where the canonical weights live
    in_proj: nn.Module | None = None
    gate_proj: nn.Module | None = None  # same module as in_proj when gate and up are fused
    out_proj: nn.Module | None = None
    fused_gate_up: bool = False
    w_in: WeightRef | None = None
    w_gate: WeightRef | None = None
    w_out: WeightRef | None = None
    bias_in: WeightRef | None = None
    bias_gate: WeightRef | None = None
    bias_out: WeightRef | None = None
    # MoE parts
    router: Router | None = None
    router_module: nn.Module | None = None
    experts: list[FFN] = field(default_factory=list)
    shared: FFN | None = None
    shared_gate: nn.Module | None = None  # sigmoid gate on the shared expert (Qwen2-MoE)
    # generation of each module the handle reads (ffnkit.core.views), to detect structural changes
    _seen: list[tuple[nn.Module, int]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.refresh_generation()

    # ----- staleness ------------------------------------------------------------------------------
    def _modules_read(self) -> list[nn.Module]:
        mods = (self.module, self.in_proj, self.gate_proj, self.out_proj, self.router_module)
        return list({id(m): m for m in mods if m is not None}.values())

    def refresh_generation(self) -> None:
        """Mark the handle current. The transaction calls it for the handles an edit updated in place.

        Example:
            >>> ffn.refresh_generation()   # rarely needed by hand: prefer find_ffns(model) again
        """
        self._seen = [(m, generation(m)) for m in self._modules_read()]

    def check_current(self) -> None:
        """Raise ``StaleHandleError`` if the model changed structurally under this handle.

        Example:
            >>> ffn.check_current()   # fine until e.g. lowrank_(model, ...) replaces its matrices
        """
        if any(generation(m) != g for m, g in self._seen):
            raise StaleHandleError(
                f"this handle on {self.name} was taken before a structural change of the model (a "
                "transform or an edit through another handle); call find_ffns(model) again"
            )

    # ----- canonical weights ---------------------------------------------------------------------
    @property
    def W_in(self) -> Tensor:  # [d_ff, d_model]
        return self._dense_only(self.w_in)

    @property
    def W_gate(self) -> Tensor | None:  # [d_ff, d_model]
        return self._read(self.w_gate) if self.kind != "moe" else self._dense_only(None)

    @property
    def W_out(self) -> Tensor:  # [d_model, d_ff]
        return self._dense_only(self.w_out)

    @property
    def b_in(self) -> Tensor | None:  # [d_ff]
        return self._read(self.bias_in)

    @property
    def b_gate(self) -> Tensor | None:  # [d_ff]
        return self._read(self.bias_gate)

    @property
    def b_out(self) -> Tensor | None:  # [d_model]
        return self._read(self.bias_out)

    def _read(self, ref: WeightRef | None) -> Tensor | None:
        self.check_current()
        return None if ref is None else ref.get()

    def _dense_only(self, ref: WeightRef | None) -> Tensor:
        if self.kind == "moe":
            raise InvalidArgumentError(
                f"{self.name} is a mixture of experts: read ffn.experts[e].W_in/W_gate/W_out "
                "(or ffn.shared) instead of the layer's own weights"
            )
        assert ref is not None
        return self._read(ref)

    @property
    def is_gated(self) -> bool:
        return self.kind == "gated"

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    # ----- computation from canonical weights ----------------------------------------------------
    def activations(self, x: Tensor) -> dict[str, Tensor]:
        """All dense sites for input x [..., d_model]: pre, gate (gated only), post, out."""
        if self.kind == "moe":
            return {"out": self.forward(x)}
        pre = x @ self.W_in.T  # [..., d_ff]
        if self.b_in is not None:
            pre = pre + self.b_in
        sites: dict[str, Tensor] = {"pre": pre}
        if self.kind == "gated":
            gate = x @ self.W_gate.T  # [..., d_ff]
            if self.b_gate is not None:
                gate = gate + self.b_gate
            sites["gate"] = gate
            post = self.act_fn(gate) * pre
        else:
            post = self.act_fn(pre)
        out = post @ self.W_out.T  # [..., d_model]
        if self.b_out is not None:
            out = out + self.b_out
        sites.update(post=post, out=out)
        return sites

    def forward(self, x: Tensor) -> Tensor:
        """Recompute the block's output from its canonical weights. x: [..., d_model]."""
        if self.kind != "moe":
            return self.activations(x)["out"]
        self.check_current()
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, d]
        _, top_w, top_i = self.router.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_i == e)
            if token.numel():
                out.index_add_(0, token, expert.forward(flat[token]) * top_w[token, slot, None])
        if self.shared is not None:
            shared = self.shared.forward(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        if self.bias_out is not None:  # ffnkit's MoE block of a dense FFN with an output bias
            out = out + self.b_out
        return out.reshape(shape)

    __call__ = forward

    # ----- size ----------------------------------------------------------------------------------
    def parameters(self) -> list[Tensor]:
        """The block's weight tensors (each expert's slices for MoE, plus router and shared expert).

        Values packed into buffers (quantised matrices) appear as one meta tensor per module, of as many
        elements as the weights they stand for.
        """
        self.check_current()
        if self.kind == "moe":
            tensors = self.router.parameters() if self.router else []
            for expert in self.experts:
                tensors += expert.parameters()
            if self.shared is not None:
                tensors += self.shared.parameters()
            if self.shared_gate is not None:
                tensors += list(self.shared_gate.parameters())
            return tensors
        modules = [m for m in (self.in_proj, self.gate_proj, self.out_proj) if m is not None]
        if modules:
            # the modules' own parameters: right for fused gate_up (counted once) and for factorised
            # low-rank projections, whose canonical W is a product of two smaller matrices
            unique = {id(p): p for m in modules for p in m.parameters()}
            for m in modules:  # a quantised matrix keeps packed buffers: count the weights it stands for
                n = packed_numel(m)
                if n:
                    unique[id(m)] = torch.empty(n, device="meta")
            return list(unique.values())
        refs = (self.w_in, self.w_gate, self.w_out, self.bias_in, self.bias_gate, self.bias_out)
        return [r.get() for r in refs if r is not None]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def flops_per_token(self) -> int:
        """Multiply-adds ×2 of the matrix products one token pays (MoE: router + top-k experts + shared)."""
        if self.kind != "moe":
            n_mats = 3 if self.kind == "gated" else 2
            return 2 * n_mats * self.d_model * self.d_ff
        flops = self.router.flops_per_token()
        if self.experts:
            flops += self.router.top_k * self.experts[0].flops_per_token()
        if self.shared is not None:
            flops += self.shared.flops_per_token()
        return flops

    def describe(self) -> dict:
        """A JSON-ready summary row (what ``ffnkit models`` prints)."""
        row = {
            "index": self.index,
            "layer": self.layer,
            "stack": self.stack,
            "name": self.name,
            "kind": self.kind,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "activation": self.activation,
            "bias": self.kind != "moe" and (self.bias_in is not None or self.bias_out is not None),
            "params": self.num_parameters(),
            "flops_per_token": self.flops_per_token(),
        }
        if self.kind == "moe":
            row.update(
                experts=self.num_experts,
                top_k=self.router.top_k,
                shared_expert_d_ff=self.shared.d_ff if self.shared else 0,
            )
        return row

    def __repr__(self) -> str:
        extra = f", experts={self.num_experts}, top_k={self.router.top_k}" if self.kind == "moe" else ""
        return (
            f"FFN({self.name!r}, layer={self.layer}, kind={self.kind!r}, d_model={self.d_model}, "
            f"d_ff={self.d_ff}, activation={self.activation!r}{extra})"
        )
