"""``MoEBlock``: a mixture-of-experts FFN in the transformers v5 layout, with MoE++ experts beside it.

What ``ffnkit.moe`` (``moefy_``, ``upcycle_``) puts in place of a dense FFN. The layout is the v5 MoE-block
contract of :mod:`ffnkit.core.archs`, so ``find_ffns``, pruning, quantisation, capture and steering read
it like a Mixtral / Qwen2-MoE block:

- ``gate``: a :class:`MoERouter`; ``gate(x [N, d])`` returns ``(logits [N, E'], weights [N, k],
  indices [N, k])`` (E' = E FFN experts + MoE++ experts). ffnkit routers also offer
  ``router_logits(x)`` and ``select(logits)``, which the FFN handle and expert steering use.
- ``experts``: :class:`MoEExperts`, 3-D ``gate_up_proj`` [E, 2f, d] (rows [gate | up]) and
  ``down_proj`` [E, d, f]; ``experts(x, top_k_index, top_k_weights)``. A non-gated FFN (GPT-2 style)
  is stored in the same layout: the up half is zero with ``gate_up_proj_bias`` 1, so act(gate)·1 = act(pre).
- ``shared_expert`` (optional, always on) with ``gate_proj`` / ``up_proj`` / ``down_proj`` and an optional
  sigmoid ``shared_expert_gate``, as in Qwen2-MoE.
- MoE++ experts (arXiv 2410.07348): zero (adds nothing), copy (adds x), constant (adds α1·x + α2·v with
  [α1, α2] = softmax(W_c x)), routed like the FFN experts; and a gating residual (logits of this block
  += W_g · logits of the previous MoE block).
- ``hook_in``, ``hook_router``, ``hook_out``: :class:`~ffnkit.modules.base.HookPoint` s (capture/steer).

The saved state dict holds the tensors; the change record (kind ``ffn_moe``, :meth:`MoEBlock.to_record`)
rebuilds the shapes on load.

Example:
    >>> block = MoEBlock(d_model=32, d_expert=12, num_experts=4, top_k=2)
    >>> block(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 32])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.kernels.moe import ACTIVATIONS as KERNEL_ACTIVATIONS
from ffnkit.kernels.moe import experts_forward
from ffnkit.modules.base import HookPoint, RuntimeModule, dtype_source

__all__ = [
    "ROUTER_KINDS",
    "WEIGHTINGS",
    "MoEBlock",
    "MoEExperts",
    "MoERouter",
    "SharedExpert",
    "experts_reference",
    "link_routing_state",
]

ROUTER_KINDS = ("linear", "mlp")
_MASKED_MAX = 1 << 27  # largest T × E × 2f that training computes as one masked dense FFN (512 MB fp32)
WEIGHTINGS = ("softmax", "ones")


# ----- the expert computation -----------------------------------------------------------------------
def _expert_loop(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    gate_up_bias: Tensor | None = None,
) -> Tensor:
    n_experts, f = gate_up.shape[0], down.shape[2]
    out = torch.zeros_like(x)  # [T, d]
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < n_experts:
            continue  # index E (or an MoE++ slot) contributes nothing
        token, slot = torch.where(top_k_index == e)  # [n], [n]
        h = x[token] @ gate_up[e].T  # [n, 2f]
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        m = act_fn(h[:, :f]) * h[:, f:]  # [n, f]
        y = m @ down[e].T  # [n, d]
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def experts_reference(
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    act: str = "silu",
    *,
    backend: str | None = None,
) -> Tensor:
    """out = Σ_k w_k · down_e(act(gate_e x) · up_e x), one loop over the experts that got tokens.

    The signature of ``ffnkit.kernels.moe.experts_forward`` (the reference it is tested against): x [T, d],
    gate_up [E, 2f, d] (gate = first f rows), down [E, d, f], top_k_index / top_k_weights [T, k]; an index
    outside [0, E) or a weight 0 contributes nothing. ``backend`` is accepted and ignored (one loop).

    Example:
        >>> x = torch.randn(5, 8)
        >>> experts_reference(x, torch.randn(2, 6, 8), torch.randn(2, 8, 3),
        ...                   torch.tensor([[0, 1]] * 5), torch.ones(5, 2)).shape
        torch.Size([5, 8])
    """
    return _expert_loop(x, gate_up, down, top_k_index, top_k_weights, ACT2FN[act])


# ----- the parts ------------------------------------------------------------------------------------
class MoEExperts(nn.Module):
    """E experts as 3-D tensors: ``gate_up_proj`` [E, 2f, d], ``down_proj`` [E, d, f] (v5 layout).

    Example:
        >>> ex = MoEExperts(4, 32, 12)
        >>> ex(torch.randn(3, 32), torch.tensor([[0, 2]] * 3), torch.ones(3, 2)).shape
        torch.Size([3, 32])
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_expert: int,
        act: str = "silu",
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if act not in ACT2FN:
            raise InvalidArgumentError(f"unknown activation {act!r}; use one of transformers' ACT2FN names")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, d_model, d_expert
        self.act = act
        self.act_fn = ACT2FN[act]
        kw = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * d_expert, d_model, **kw))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, d_model, d_expert, **kw))
        # non-gated FFNs: the input bias of the gate half and a constant 1 in the up half
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * d_expert, **kw)) if bias else None

    @torch.no_grad()
    def set_weights(
        self,
        gate: Tensor,
        up: Tensor,
        down: Tensor,
        gate_bias: Tensor | None = None,
        up_bias: Tensor | None = None,
    ) -> None:
        """Copy in every expert's canonical weights: gate, up [E, f, d], down [E, d, f] (biases [E, f]).

        Example:
            >>> ex = MoEExperts(2, 8, 3)
            >>> ex.set_weights(torch.ones(2, 3, 8), torch.ones(2, 3, 8), torch.ones(2, 8, 3))
        """
        self.gate_up_proj.copy_(torch.cat([gate, up], dim=1))  # [E, 2f, d]: rows [gate | up]
        self.down_proj.copy_(down)
        if self.gate_up_proj_bias is not None:
            zeros = torch.zeros(gate.shape[:2], dtype=gate.dtype, device=gate.device)
            gb = gate_bias if gate_bias is not None else zeros
            ub = up_bias if up_bias is not None else zeros
            self.gate_up_proj_bias.copy_(torch.cat([gb, ub], dim=1))

    def masked_dense(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The experts' sum computed as one dense FFN over all experts with each token's expert weights
        (0 for experts not chosen): two large matmuls instead of a loop, differentiable in the weights
        (healing trains router and experts through it). x [T, d] -> [T, d].

        Example:
            >>> ex = MoEExperts(4, 32, 12)
            >>> ex.masked_dense(torch.randn(3, 32), torch.tensor([[0, 2]] * 3), torch.ones(3, 2)).shape
            torch.Size([3, 32])
        """
        n_experts, f = self.num_experts, self.intermediate_dim
        t, d = hidden_states.shape
        gu = hidden_states @ self.gate_up_proj.reshape(-1, d).T  # [T, E·2f]
        gu = gu.view(t, n_experts, 2 * f)  # [T, E, 2f]
        if self.gate_up_proj_bias is not None:
            gu = gu + self.gate_up_proj_bias
        m = self.act_fn(gu[..., :f]) * gu[..., f:]  # [T, E, f]
        # each token's weight per expert (slots with index >= E choose nothing: the extra column is dropped)
        w = torch.zeros(t, n_experts + 1, dtype=m.dtype, device=m.device)
        w = w.scatter_add(1, top_k_index.clamp(max=n_experts), top_k_weights.to(m.dtype))[:, :n_experts]
        down = self.down_proj.permute(1, 0, 2).reshape(d, -1)  # [E, d, f] -> [d, E·f]
        return ((m * w[..., None]).reshape(t, -1) @ down.T).to(hidden_states.dtype)  # [T, d]

    @torch.no_grad()
    def output_norms(self, x: Tensor, *, chunk: int = 1024) -> Tensor:
        """‖down_e(act(gate_e x) · up_e x)‖ of every expert on every token: x [T, d] -> [T, E] (float32);
        costs every expert (what oracle routing compares).

        Example:
            >>> MoEExperts(4, 32, 12).output_norms(torch.randn(3, 32)).shape
            torch.Size([3, 4])
        """
        f = self.intermediate_dim
        out = []
        for part in x.split(chunk):
            h = torch.einsum("nd,eid->nei", part, self.gate_up_proj)  # [n, E, 2f]
            if self.gate_up_proj_bias is not None:
                h = h + self.gate_up_proj_bias
            m = self.act_fn(h[..., :f]) * h[..., f:]  # [n, E, f]
            y = torch.einsum("nef,edf->ned", m, self.down_proj)  # [n, E, d]
            out.append(y.float().norm(dim=-1))  # [n, E]
        return torch.cat(out)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden_states [T, d], top_k_index / top_k_weights [T, k] -> [T, d]."""
        if self.gate_up_proj_bias is None:
            needs_grad = torch.is_grad_enabled() and (
                self.gate_up_proj.requires_grad or self.down_proj.requires_grad or hidden_states.requires_grad
            )
            if self.act in KERNEL_ACTIVATIONS and not needs_grad:
                # the shared executor (kernels/moe.py: gather at decode, grouped GEMM at prefill); MoE++
                # slots (index >= E) mean "no FFN expert" there, so they map onto index E
                index = top_k_index.clamp(max=self.num_experts)
                return experts_forward(
                    hidden_states, self.gate_up_proj, self.down_proj, index, top_k_weights, self.act
                )
            if needs_grad and hidden_states.shape[0] * self.gate_up_proj.shape[:2].numel() <= _MASKED_MAX:
                # training (the kernels have no backward): every expert at once, unchosen ones weighted 0
                return self.masked_dense(hidden_states, top_k_index, top_k_weights)
            # a large training batch or an activation the kernels lack: the reference loop
            return experts_reference(
                hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights, self.act
            )
        return _expert_loop(
            hidden_states,
            self.gate_up_proj,
            self.down_proj,
            top_k_index,
            top_k_weights,
            self.act_fn,
            self.gate_up_proj_bias,
        )

    def extra_repr(self) -> str:
        bias = self.gate_up_proj_bias is not None
        return f"num_experts={self.num_experts}, d_model={self.hidden_dim}, d_expert={self.intermediate_dim}, act={self.act!r}, bias={bias}"


class SharedExpert(nn.Module):
    """An always-on dense FFN: ``gate_proj``/``up_proj``/``down_proj`` (gated) or ``up_proj``/``down_proj``.

    Example:
        >>> SharedExpert(32, 16)(torch.randn(3, 32)).shape
        torch.Size([3, 32])
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        act: str = "silu",
        *,
        gated: bool = True,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias, **kw) if gated else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias, **kw)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False, **kw)  # b_out lives on the block
        self.act_fn = ACT2FN[act]

    def forward(self, x: Tensor) -> Tensor:
        up = self.up_proj(x)  # [N, s]
        m = self.act_fn(self.gate_proj(x)) * up if self.gate_proj is not None else self.act_fn(up)
        return self.down_proj(m)  # [N, d]


class MoERouter(nn.Module):
    """Top-k router over E FFN experts and the MoE++ experts; returns (logits, weights, indices).

    ``kind``: ``linear`` (logits = W x, W [E, d]: a softmax router, or centroids) or ``mlp`` (logits =
    W2 tanh(W1 x), MoEfication's router). ``weighting``: ``softmax`` (weights = top-k of softmax, optionally
    renormalised, as Mixtral) or ``ones`` (every chosen expert adds its whole output, as the dense FFN did;
    logits are then log-softmax normalised, the log of each expert's predicted share, so MoE++ experts'
    constant logits are thresholds on that share).

    Example:
        >>> r = MoERouter(32, 4, top_k=2)
        >>> logits, w, i = r(torch.randn(3, 32))
        >>> logits.shape, w.shape, i.shape
        (torch.Size([3, 4]), torch.Size([3, 2]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        kind: str = "linear",
        hidden: int = 0,
        weighting: str = "softmax",
        norm_topk_prob: bool = True,
        n_zero: int = 0,
        n_copy: int = 0,
        n_constant: int = 0,
        residual: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS or weighting not in WEIGHTINGS:
            raise InvalidArgumentError(
                f"router kind must be one of {ROUTER_KINDS} and weighting one of {WEIGHTINGS}, "
                f"got {kind!r}, {weighting!r}"
            )
        n_routed = num_experts + n_zero + n_copy + n_constant
        if not 1 <= top_k <= n_routed:
            raise InvalidArgumentError(f"top-k must be in [1, {n_routed}] (the routed experts), got {top_k}")
        if kind == "mlp" and hidden < 1:
            raise InvalidArgumentError("an mlp router needs hidden >= 1")
        kw = dict(dtype=dtype, device=device)
        self.hidden_dim, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.kind, self.hidden, self.weighting, self.norm_topk_prob = kind, hidden, weighting, norm_topk_prob
        self.n_zero, self.n_copy, self.n_constant = n_zero, n_copy, n_constant
        if kind == "linear":
            self.weight = nn.Parameter(torch.zeros(num_experts, d_model, **kw))
        else:
            self.fc1 = nn.Linear(d_model, hidden, **kw)
            self.fc2 = nn.Linear(hidden, num_experts, **kw)
        n_extra = n_zero + n_copy + n_constant
        self.extra_weight = nn.Parameter(torch.zeros(n_extra, d_model, **kw)) if n_extra else None
        self.extra_bias = nn.Parameter(torch.zeros(n_extra, **kw)) if n_extra else None
        self.residual_weight = nn.Parameter(torch.zeros(n_routed, n_routed, **kw)) if residual else None

    @property
    def num_routed(self) -> int:
        """FFN experts plus MoE++ experts (the width of the logits)."""
        return self.num_experts + self.n_zero + self.n_copy + self.n_constant

    def router_logits(self, x: Tensor, previous: Tensor | None = None) -> Tensor:
        """x [N, d] (and the previous MoE block's logits [N, E']) -> logits [N, E']."""
        if self.kind == "linear":
            raw = x @ self.weight.T  # [N, E]
        else:
            raw = self.fc2(torch.tanh(self.fc1(x)))  # [N, E]
        if self.weighting == "ones":
            raw = torch.log_softmax(raw.float(), dim=-1).to(x.dtype)  # log of each expert's predicted share
        if self.extra_weight is not None:
            raw = torch.cat([raw, x @ self.extra_weight.T + self.extra_bias], dim=-1)  # [N, E']
        if self.residual_weight is not None and previous is not None and previous.shape == raw.shape:
            raw = raw + previous.to(raw.dtype) @ self.residual_weight.T
        return raw

    def select(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """logits [N, E'] -> (weights [N, k], indices [N, k]) by this router's rule."""
        if self.weighting == "ones":
            top_l, top_i = torch.topk(logits, self.top_k, dim=-1)
            if top_l.requires_grad:
                # training (healing): exp(l − l) is exactly 1 forward, and passes the loss's gradient
                # to the chosen logits, so the router trains through the weights it does not use
                return torch.exp(top_l - top_l.detach()), top_i
            return torch.ones(top_i.shape, dtype=logits.dtype, device=logits.device), top_i
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w.to(logits.dtype), top_i

    def forward(self, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        x = x.reshape(-1, self.hidden_dim)  # [N, d]
        logits = self.router_logits(x, previous)
        weights, indices = self.select(logits)
        return logits, weights, indices

    def extra_repr(self) -> str:
        extra = (
            f", zero={self.n_zero}, copy={self.n_copy}, constant={self.n_constant}"
            if self.num_routed > self.num_experts
            else ""
        )
        return f"kind={self.kind!r}, experts={self.num_experts}, top_k={self.top_k}, weighting={self.weighting!r}{extra}"


# ----- the block ------------------------------------------------------------------------------------
class MoEBlock(RuntimeModule):
    """A mixture-of-experts FFN (v5 layout; see the module doc). Built by ``moefy_`` / ``upcycle_``.

    Example:
        >>> block = MoEBlock(32, 12, 4, 2, shared=8, router={"kind": "mlp", "hidden": 16})
        >>> block(torch.randn(1, 3, 32)).shape
        torch.Size([1, 3, 32])
    """

    change_kind = "ffn_moe"
    sites = ("in", "router", "out")

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        num_experts: int,
        top_k: int,
        *,
        act: str = "silu",
        router: Mapping[str, Any] | None = None,
        shared: int = 0,
        shared_gate: bool = False,
        gated: bool = True,
        in_bias: bool | None = None,
        bias: bool = False,
        layer: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        # a non-gated FFN needs the input biases (the constant 1 of the up half)
        in_bias = (not gated) if in_bias is None else bool(in_bias or not gated)
        self.layer, self.gated, self.in_bias = int(layer), bool(gated), in_bias
        self.gate = MoERouter(d_model, num_experts, top_k, **dict(router or {}), **kw)
        self.experts = MoEExperts(num_experts, d_model, d_expert, act, bias=in_bias, **kw)
        self.shared_expert = (
            SharedExpert(d_model, shared, act, gated=gated, bias=in_bias, **kw) if shared else None
        )
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False, **kw) if shared and shared_gate else None
        n_const = self.gate.n_constant
        self.constant_mix = nn.Parameter(torch.zeros(n_const, 2, d_model, **kw)) if n_const else None  # W_c
        self.constant_value = nn.Parameter(torch.zeros(n_const, d_model, **kw)) if n_const else None  # v
        self.bias = nn.Parameter(torch.zeros(d_model, **kw)) if bias else None  # the dense FFN's b_out
        self.hook_in, self.hook_router, self.hook_out = HookPoint("in"), HookPoint("router"), HookPoint("out")
        # gating residual: logits pass from block to block through one dict shared by the model's blocks
        self.residual_from: int | None = None
        self.keep_logits = False
        self.routing_state: dict[int, Tensor] = {}

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @torch.no_grad()
    def add_output_bias(self, delta: Tensor) -> None:
        """Add ``delta`` [d] to the block's output bias (created, as a parameter, where there is none).

        Example:
            >>> block.add_output_bias(torch.full((32,), 0.1))
        """
        if self.bias is None:
            like = dtype_source(self)
            self.bias = nn.Parameter(torch.zeros(delta.shape[-1], dtype=like.dtype, device=like.device))
        self.bias.add_(delta.to(self.bias.dtype))

    def _extras(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor | None:
        """What the copy and constant experts add: [N, d] (None when there are none)."""
        r = self.gate
        if r.n_copy + r.n_constant == 0:
            return None
        out = torch.zeros_like(x)
        first_copy = r.num_experts + r.n_zero
        for j in range(r.n_copy + r.n_constant):
            w = (weights * (indices == first_copy + j)).sum(-1, keepdim=True)  # [N, 1]
            if j < r.n_copy:
                out = out + w * x
            else:
                c = j - r.n_copy
                alpha = torch.softmax(x @ self.constant_mix[c].T, dim=-1)  # [N, 2]
                out = out + w * (alpha[:, :1] * x + alpha[:, 1:] * self.constant_value[c])
        return out

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = self.hook_in(hidden_states).reshape(-1, shape[-1])  # [N, d]
        previous = self.routing_state.get(self.residual_from) if self.residual_from is not None else None
        logits, weights, indices = self.gate(x, previous)  # [N, E'], [N, k], [N, k]
        self.hook_router(logits)
        if self.keep_logits:
            self.routing_state[self.layer] = logits.detach()
        # MoE++ slots map to index E, which the expert kernels skip
        ffn_index = indices.clamp(max=self.num_experts)
        out = self.experts(x, ffn_index, weights)  # [N, d]
        extra = self._extras(x, weights, indices)
        if extra is not None:
            out = out + extra
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if self.bias is not None:
            out = out + self.bias
        return self.hook_out(out.reshape(shape))

    # ----- replay -----------------------------------------------------------------------------------
    def to_record(self, path: str) -> dict[str, Any]:
        """The row of an ``ffn_moe`` change that rebuilds this block's shapes at ``path``.

        Example:
            >>> MoEBlock(32, 12, 4, 2).to_record("model.layers.0.mlp")["num_experts"]
            4
        """
        r = self.gate
        return {
            "path": path,
            "layer": self.layer,
            "d_model": r.hidden_dim,
            "d_expert": self.experts.intermediate_dim,
            "num_experts": self.num_experts,
            "top_k": r.top_k,
            "act": self.experts.act,
            "router": {
                "kind": r.kind,
                "hidden": r.hidden,
                "weighting": r.weighting,
                "norm_topk_prob": r.norm_topk_prob,
                "n_zero": r.n_zero,
                "n_copy": r.n_copy,
                "n_constant": r.n_constant,
                "residual": r.residual_weight is not None,
            },
            "shared": self.shared_expert.up_proj.out_features if self.shared_expert is not None else 0,
            "shared_gate": self.shared_expert_gate is not None,
            "gated": self.gated,
            "in_bias": self.in_bias,
            "bias": self.bias is not None,
            "residual_from": self.residual_from,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: nn.Module) -> MoEBlock:
        """A block shaped as ``record`` says (placeholder values), in the dtype and device of ``like``.

        Example:
            >>> rec = MoEBlock(32, 12, 4, 2).to_record("mlp")
            >>> MoEBlock.from_record(rec, nn.Linear(2, 2)).num_experts
            4
        """
        src = dtype_source(like)
        block = cls(
            int(record["d_model"]),
            int(record["d_expert"]),
            int(record["num_experts"]),
            int(record["top_k"]),
            act=str(record["act"]),
            router=dict(record["router"]),
            shared=int(record["shared"]),
            shared_gate=bool(record["shared_gate"]),
            gated=bool(record["gated"]),
            in_bias=bool(record["in_bias"]),
            bias=bool(record["bias"]),
            layer=int(record["layer"]),
            dtype=src.dtype,
            device=src.device,
        )
        block.residual_from = record.get("residual_from")
        return block

    def extra_repr(self) -> str:
        return f"layer={self.layer}, gated={self.gated}"


def link_routing_state(blocks: list[MoEBlock]) -> None:
    """Give the blocks of one model one shared routing-state dict, and point each block with a gating
    residual at the previous block (in order). Called by the transforms and on load.

    Example:
        >>> link_routing_state([b for b in model.modules() if isinstance(b, MoEBlock)])
    """
    state: dict[int, Tensor] = {}
    previous = None
    for block in blocks:
        block.routing_state = state
        if block.gate.residual_weight is not None and previous is not None:
            block.residual_from = previous.layer
            previous.keep_logits = True
        previous = block
