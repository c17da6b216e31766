"""Dense → MoE (MoEfication): ``moefy_(model, MoEfyConfig(active=0.5), tokenizer=tok)``.

Each chosen dense FFN becomes an :class:`~ffnkit.modules.moe.MoEBlock` (transformers v5 layout): its
neurons are split into E equal experts (by default sized from each FFN's d_ff, :func:`auto_sizes`) (:mod:`ffnkit.moe.cluster`: balanced k-means on keys,
co-activation clustering, or random), optionally with an always-on shared expert of the most-firing
neurons; a router (:mod:`ffnkit.moe.router`: centroid similarity, or an MLP trained on calibration
activations) picks the top k experts per token, and each chosen expert adds its whole output (weight 1),
so with every expert chosen the block computes the dense FFN. ``active`` F sets k per layer: the share
of the FFN's neurons active per token, k = round((F·d_ff − shared) / expert size). MoE++ zero experts
(``zero_experts``) take a slot wherever the router predicts an expert's share of the activation mass
below ``zero_threshold``/E, so tokens that need fewer experts run fewer (:mod:`ffnkit.moe.pluspp`).
Where the conversion reads calibration text, the down projections and output bias are then refitted by
least squares with the router's choices in the loop (``refit``, :mod:`ffnkit.moe.refit`): the experts
that run absorb what the ones left out would have added, as pruning's W_out refit does for a fixed set.

The change commits through one :class:`~ffnkit.core.transaction.Transaction` (all layers or none) and is
recorded (kind ``ffn_moe``), so ``ffnkit.save`` / ``load`` rebuild the blocks and reproduce the logits.

Example:
    >>> report = moefy_(model, MoEfyConfig(active=0.5), tokenizer=tok)  # 80 experts of 16 + 256 shared
    >>> report.active_fraction, report.sizes["experts"]
    (0.5, 80)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from ffnkit.core.archs import find_ffns, resolve_spec, select_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.transaction import Transaction
from ffnkit.modules.moe import MoEBlock, link_routing_state
from ffnkit.moe.cluster import SPLITS, Split, split_neurons
from ffnkit.moe.refit import refit_down_
from ffnkit.moe.router import (
    ROUTER_TARGETS,
    ROUTERS,
    centroid_weight,
    expert_importance,
    mass_recall,
    train_mlp_router,
)

__all__ = [
    "LayerPlan",
    "MoEfyConfig",
    "MoEfyReport",
    "MAX_EXPERTS",
    "auto_sizes",
    "global_top_k",
    "dense_targets",
    "moe_blocks",
    "moefy_",
    "plan_moefy",
    "replay_moe",
]

CHANGE_KIND = MoEBlock.change_kind  # "ffn_moe"
_RECALL_TOKENS = 2048  # calibration tokens per layer held out of router training (recall, compensation)
MAX_EXPERTS = 80  # the most experts the automatic sizes give an FFN (the measured best on SmolLM2-135M)


def auto_sizes(d_ff: int, shared: int | None = None) -> tuple[int, int]:
    """(experts, shared) of an FFN of ``d_ff`` neurons when ``MoEfyConfig.experts`` is None (auto).

    ``shared`` None (auto too): the shared expert takes d_ff // 6 neurons and the routed rest R is cut into
    experts of width ⌈R / 80⌉ (the narrowest that keep at most 80 experts), as many as fit; the neurons
    left over (fewer than one expert width) join the shared expert. For d_ff 1536 that is 80 experts of 16
    plus 256 shared, the best conversion measured (``moe_frontier_refit_h200.json``); tiny FFNs get experts
    of 1 neuron. ``shared`` given: the largest number of experts ≤ 80 that divides d_ff − shared.

    Example:
        >>> auto_sizes(1536), auto_sizes(48), auto_sizes(1536, shared=0)
        ((80, 256), (40, 8), (64, 0))
    """
    if shared is None:
        routed = d_ff - d_ff // 6
        width = -(-routed // MAX_EXPERTS)  # ceil: at most MAX_EXPERTS experts
        experts = routed // width
        return experts, d_ff - experts * width
    routed = d_ff - shared
    if routed < 1:
        raise InvalidArgumentError(
            f"the shared expert ({shared} neurons) leaves no neuron of d_ff {d_ff} to route; lower shared"
        )
    experts = max(e for e in range(1, min(MAX_EXPERTS, routed) + 1) if routed % e == 0)
    if experts == 1 and routed > 1:
        raise InvalidArgumentError(
            f"no number of experts in 2..{MAX_EXPERTS} divides the {routed} routed neurons (d_ff {d_ff} − "
            f"shared {shared}); give experts= or another shared"
        )
    return experts, shared


@dataclass
class MoEfyConfig(JsonConfig):
    """How to convert. Give ``active`` (share of FFN neurons active per token, in (0, 1], the shared
    expert's neurons included) or ``top_k``; neither = ``active=0.5``. JSON round trip:
    ``MoEfyConfig.from_dict(json.loads(c.to_json()))``.

    The defaults are the best conversion measured (coact split, MLP router ranking experts by output norm,
    refit on 16,384 tokens with ridge 0.3). ``experts`` / ``shared`` None = sized per FFN from its d_ff
    (:func:`auto_sizes`: both None → experts of width ⌈(5/6·d_ff) / 80⌉, at most 80, and a shared expert
    of about d_ff/6; ``shared`` given → the most experts ≤ 80 dividing d_ff − shared). ``experts`` given
    with ``shared`` None keeps no shared expert (shared 0), as before the automatic sizes. The sizes each
    layer got are in the report (``layers``, ``sizes``) and in the saved record, so a saved model reloads
    with its own sizes whatever this rule becomes. The auto shared expert needs ``active`` above its share
    (~1/6); below it, give ``shared=0``.

    Example:
        >>> MoEfyConfig(experts=16, split="random", router="centroid", active=0.25).needs_data
        False
        >>> MoEfyConfig().sizes_for(1536)
        (80, 256)
    """

    experts: int | None = None  # None: auto from each FFN's d_ff (auto_sizes)
    split: str = "coact"  # kmeans | coact | random
    router: str = "mlp"  # mlp | centroid
    active: float | None = None
    top_k: int | None = None
    # neurons in the always-on shared expert (the most-firing ones); None: auto (about d_ff/6) when experts
    # is None too, else 0
    shared: int | None = None
    zero_experts: int = 0  # MoE++ zero experts (at most top_k)
    zero_threshold: float = 0.5  # a slot goes to a zero expert below this × 1/E predicted mass share
    allocation: str = "uniform"  # uniform: one k per layer; global: k per layer from the router's mass recall
    compensate: bool = True  # add the mean output of the experts left out to the output bias (as FLAP)
    # least-squares refit of the down projections and output bias with the routing in the loop
    # (:mod:`ffnkit.moe.refit`; supersedes compensate), on up to refit_tokens calibration tokens per layer;
    # applies where the conversion reads calibration text (needs_data), as the layer rows say
    refit: bool = True
    refit_ridge: float = 0.3
    refit_tokens: int = 16384
    router_hidden: int = 256
    # 200 steps of 1,024 tokens, a twelfth of the CPU frontier's 600 x 4,096: with 300 x 2,048 the default
    # conversion of SmolLM2-135M took 37.5 min on a busy 2-core CPU (moe_defaults_cpu_router300.json);
    # with these, 5.7 min on it when quiet, Persuasion 57.80 at 50% active (moe_defaults_cpu.json)
    router_steps: int = 200
    router_lr: float = 3e-3
    router_batch: int = 1024  # calibration tokens per router training step
    router_target: str = "norm"  # what the MLP router learns to rank: mass (Σ|m|) or norm (‖expert output‖)
    layers: list[int] | None = None
    samples: int = 64  # x seq_len: 16,384 calibration tokens, as many as the refit uses
    seq_len: int = 256
    batch_size: int = 4
    corpus: str = "shakespeare"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise InvalidArgumentError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}")
        if self.router not in ROUTERS:
            raise InvalidArgumentError(f"unknown router {self.router!r}; use one of {', '.join(ROUTERS)}")
        if self.experts is not None and (not isinstance(self.experts, int) or self.experts < 1):
            raise InvalidArgumentError(
                f"experts must be a positive integer or None (auto), got {self.experts}"
            )
        if self.shared is not None and (not isinstance(self.shared, int) or self.shared < 0):
            raise InvalidArgumentError(f"shared must be an integer >= 0 or None (auto), got {self.shared}")
        if self.active is not None and self.top_k is not None:
            raise InvalidArgumentError("give active= (share of neurons active per token) or top_k=, not both")
        if self.active is None and self.top_k is None:
            self.active = 0.5
        if self.active is not None and not 0.0 < float(self.active) <= 1.0:
            raise InvalidArgumentError(
                f"active must be in (0, 1] (the share of FFN neurons active per token), got {self.active}"
            )
        if self.top_k is not None and not 1 <= self.top_k <= (self.experts or self.top_k):
            raise InvalidArgumentError(f"top_k must be in [1, experts={self.experts}], got {self.top_k}")
        if self.zero_experts < 0 or self.router_hidden < 1 or self.router_steps < 1 or self.router_batch < 1:
            raise InvalidArgumentError(
                "zero_experts must be >= 0, router_hidden, router_steps and router_batch >= 1"
            )
        if self.router_target not in ROUTER_TARGETS:
            raise InvalidArgumentError(
                f"unknown router_target {self.router_target!r}; use one of {', '.join(ROUTER_TARGETS)}"
            )
        if not self.zero_threshold > 0:
            raise InvalidArgumentError(f"zero_threshold must be > 0, got {self.zero_threshold}")
        if self.allocation not in ("uniform", "global"):
            raise InvalidArgumentError(f"allocation must be 'uniform' or 'global', got {self.allocation!r}")
        if self.allocation == "global" and self.top_k is not None:
            raise InvalidArgumentError(
                "allocation='global' shares an active fraction: give active=, not top_k="
            )
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise InvalidArgumentError("samples and batch_size must be >= 1 and seq_len >= 2")
        if not self.refit_ridge > 0 or self.refit_tokens < 1:
            raise InvalidArgumentError(
                f"refit_ridge must be > 0 and refit_tokens >= 1, got {self.refit_ridge} and {self.refit_tokens}"
            )

    @property
    def needs_data(self) -> bool:
        """Whether calibration text is needed (MLP router, co-activation split, shared or zero experts;
        the auto shared expert counts as shared)."""
        return (
            self.router == "mlp"
            or self.split == "coact"
            or (self.shared is None and self.experts is None)
            or bool(self.shared)
            or self.zero_experts > 0
            or self.allocation == "global"
        )

    def check_model(self, model: nn.Module) -> None:
        """One-line error, before any work, when this conversion cannot apply to ``model``'s FFNs.

        Example:
            >>> MoEfyConfig(experts=7).check_model(model)  # doctest: +SKIP
        """
        for f in dense_targets(model, self.layers, "moefy_"):
            self.top_k_for(f.d_ff)

    def sizes_for(self, d_ff: int) -> tuple[int, int]:
        """(experts, shared) for an FFN of ``d_ff`` neurons: the given values, or :func:`auto_sizes`.

        Example:
            >>> MoEfyConfig().sizes_for(48), MoEfyConfig(experts=4).sizes_for(48)
            ((40, 8), (4, 0))
        """
        if self.experts is None:
            return auto_sizes(d_ff, self.shared)
        return self.experts, self.shared or 0

    def top_k_for(self, d_ff: int) -> int:
        """k for an FFN of ``d_ff`` neurons (validated against the experts and the shared expert)."""
        experts, shared = self.sizes_for(d_ff)
        routed = d_ff - shared
        if routed < experts or routed % experts:
            raise InvalidArgumentError(
                f"{experts} experts do not divide the {routed} routed neurons (d_ff {d_ff} − shared "
                f"{shared}); choose experts dividing {routed}"
            )
        size = routed // experts
        if self.top_k is not None:
            if self.top_k > experts:
                raise InvalidArgumentError(f"top_k must be in [1, experts={experts}], got {self.top_k}")
            k = self.top_k
        else:
            want = self.active * d_ff - shared
            if want < 0:
                fix = "give shared=0 (--shared 0)" if self.shared is None else "lower shared"
                raise InvalidArgumentError(
                    f"the shared expert alone ({shared} of {d_ff} neurons) is more than active={self.active}; "
                    f"{fix} or raise active"
                )
            k = min(experts, max(1, round(want / size)))
        if self.zero_experts > k:
            raise InvalidArgumentError(f"zero_experts ({self.zero_experts}) cannot exceed top-k ({k})")
        return k


@dataclass
class LayerPlan:
    """The split and router of one FFN, reusable across ``active`` values (``moefy_(..., plan=...)``)."""

    index: int
    split: Split
    router: dict[str, Tensor]  # "weight" (centroid) or the MLP's fc1./fc2. tensors
    scores: Tensor | None = None  # [n, E] router scores of held-out calibration tokens (mass recall)
    mass: Tensor | None = None  # [n, E] the true expert mass of the same tokens
    info: dict[str, Any] = field(default_factory=dict)
    inputs: Tensor | None = None  # [n, d] calibration FFN inputs (the output-bias compensation)
    fit_inputs: Tensor | None = None  # [n, d] bfloat16 calibration FFN inputs of the least-squares refit


@dataclass
class MoEfyReport:
    """What ``moefy_`` changed (JSON-ready through ``to_dict``). ``active_fraction``: share of FFN
    neurons computed per token, averaged over converted layers (before zero experts take slots);
    ``mass_recall``: share of the router's target (activation mass |m|, or expert output norms with
    ``router_target="norm"``) in the chosen experts on calibration tokens held out of router training
    (``oracle``: in the best k;
    ``overlap``: share of the best k the router chose); ``sizes``: the experts, expert size, shared
    expert and top-k every layer got (per layer in ``layers``)."""

    transform: str
    config: dict[str, Any]
    layers: list[dict[str, Any]]
    active_fraction: float
    mass_recall: dict[str, float | None]
    ffn_flops_per_token_before: int
    ffn_flops_per_token_after: int
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    seconds: float = 0.0
    routing: dict[str, Any] | None = None  # MoE++ experts: share of slots they absorb, compute saved
    # the resolved sizes (auto or given): experts, expert_size, shared, top_k; each an int where every
    # converted layer has the same, else None (then see ``layers``)
    sizes: dict[str, int | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- targets and data ------------------------------------------------------------------------------
def dense_targets(model: nn.Module, layers: list[int] | None, what: str) -> list[FFN]:
    """The dense FFNs a conversion replaces (one-line errors for MoE layers and FFNs without a module).

    Example:
        >>> [f.index for f in dense_targets(model, None, "moefy_")][:3]
        [0, 1, 2]
    """
    ffns = select_ffns(find_ffns(model), layers)
    if "" in resolve_spec(model).ffn:
        raise InvalidArgumentError(
            f"{what} replaces the FFN module, but {ffns[0].family!r} keeps its FFN inside the block "
            "(no mlp module); convert a model with an mlp module (llama, gpt2, phi3, ...)"
        )
    moe = [f.index for f in ffns if f.kind == "moe"]
    if moe:
        raise InvalidArgumentError(
            f"{what} converts dense FFNs, but layers {moe} are already mixtures of experts; choose dense "
            "layers with layers=[...] or start from the dense model"
        )
    for f in ffns:
        if f.activation not in ACT2FN:
            raise InvalidArgumentError(
                f"{f.name}: activation {f.activation!r} is not one of transformers' ACT2FN names"
            )
    return ffns


@torch.no_grad()
def _ffn_inputs(model: nn.Module, ffns: list[FFN], ids: Tensor, batch_size: int) -> dict[int, Tensor]:
    """The FFN inputs x [N, d] of every chosen layer on calibration ids (one pass of the model)."""
    from ffnkit.core.capture import capture
    from ffnkit.core.runner import forward

    with capture(model, sites=["in"], layers=[f.index for f in ffns], ffns=find_ffns(model)) as cap:
        for b in range(0, ids.shape[0], batch_size):
            forward(model, ids[b : b + batch_size])
    return {f.index: cap["in", f.index] for f in ffns}


def _mean_abs_post(ffn: FFN, x: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor | None]:
    """Mean |m| per neuron [d_ff] and |m| itself [N, d_ff] (float32)."""
    m = torch.cat([ffn.activations(p.to(ffn.W_in.dtype))["post"].abs().float() for p in x.split(chunk)])
    return m.mean(0), m


def plan_moefy(
    model: nn.Module,
    config: MoEfyConfig,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    splits: dict[int, LayerPlan] | None = None,
) -> dict[int, LayerPlan]:
    """Split and router of every chosen FFN (the expensive part of ``moefy_``), by FFN index.

    ``active`` / ``top_k`` / MoE++ fields do not enter the plan, so one plan serves several of them;
    ``splits``: another plan whose neuron splits to reuse (the same split with another router).

    Example:
        >>> plan = plan_moefy(model, MoEfyConfig(split="kmeans", router="mlp"), tokenizer=tok)
        >>> moefy_(copy.deepcopy(model), MoEfyConfig(active=0.25), plan=plan)
    """
    from ffnkit.data import calibration_ids

    ffns = dense_targets(model, config.layers, "moefy_")
    for f in ffns:
        config.top_k_for(f.d_ff)  # fail before any work
    inputs: dict[int, Tensor] = {}
    if config.needs_data:
        ids = calibration_ids(config, calibration, tokenizer, what="moefy_")
        inputs = _ffn_inputs(model, ffns, ids, config.batch_size)
    plans = {}
    for f in ffns:
        x = inputs.get(f.index)
        firing, m_abs = _mean_abs_post(f, x) if x is not None else (None, None)
        if splits is not None and f.index in splits:
            split = splits[f.index].split
        else:
            experts, shared = config.sizes_for(f.d_ff)
            split = split_neurons(
                f,
                experts,
                config.split,
                shared=shared,
                firing=firing,
                m_abs=m_abs,
                seed=config.seed,
            )
        del m_abs
        info: dict[str, Any] = {}
        held = train = None
        if x is not None:
            # tokens held out of router training: the recall (and global allocation) measure generalisation
            perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))
            n_held = min(_RECALL_TOKENS, x.shape[0] // 4) or 1
            held, train = perm[:n_held], perm[n_held:] if x.shape[0] > n_held else perm
        if config.router == "centroid":
            router = {"weight": centroid_weight(f, split)}
        else:
            xt = x[train.to(x.device)]  # [n_train, d]
            target = expert_importance(f, xt, split, config.router_target)
            router, info = train_mlp_router(
                xt,
                target,
                hidden=config.router_hidden,
                steps=config.router_steps,
                lr=config.router_lr,
                batch=config.router_batch,
                seed=config.seed,
            )
            del target, xt
        scores = mass = sub = None
        if x is not None:
            sub = x[perm[:_RECALL_TOKENS].to(x.device)].float().cpu()  # [n, d] compensation tokens
            xh = sub[: held.numel()]  # [n_held, d] the held-out ones among them
            mass = expert_importance(f, xh.to(f.W_in.device), split, config.router_target).cpu()
            scores = _router_scores(router, xh)
        fit = None
        # bfloat16: 16,384 tokens of SmolLM2's 576 dims are 18.9 MB a layer
        if x is not None and config.refit:
            fit = x[perm[: config.refit_tokens].to(x.device)].to("cpu", torch.bfloat16)
        plans[f.index] = LayerPlan(f.index, split, router, scores, mass, info, sub, fit)
    return plans


def _router_scores(router: dict[str, Tensor], x: Tensor) -> Tensor:
    """Router scores of x [n, d] -> [n, E] (float32, CPU)."""
    if "weight" in router:
        return x @ router["weight"].float().cpu().T
    h = torch.tanh(x @ router["fc1.weight"].float().cpu().T + router["fc1.bias"].float().cpu())
    return h @ router["fc2.weight"].float().cpu().T + router["fc2.bias"].float().cpu()


def global_top_k(ffns: list[FFN], plan: dict[int, LayerPlan], config: MoEfyConfig) -> dict[int, int]:
    """k per layer for ``config.active`` on average: start from one expert each, then give the next expert
    to the layer where it adds the most mass recall per neuron (the router's choice on calibration tokens).

    Example:
        >>> global_top_k(ffns, plan, MoEfyConfig(active=0.5, allocation="global"))[0]
        13
    """
    ks = {f.index: 1 for f in ffns}
    gains: dict[int, list[float]] = {}
    for f in ffns:
        p = plan[f.index]
        if p.scores is None:
            raise InvalidArgumentError(
                "allocation='global' needs calibration data (the router's mass recall)"
            )
        order = p.scores.argsort(dim=-1, descending=True)  # [n, E]
        share = p.mass.gather(1, order) / p.mass.sum(-1, keepdim=True).clamp_min(1e-12)  # [n, E]
        gains[f.index] = (share.mean(0) / p.split.expert_size).tolist()  # recall per neuron of the j-th pick
    budget = sum(config.active * f.d_ff - plan[f.index].split.shared.numel() for f in ffns)
    used = sum(plan[f.index].split.expert_size for f in ffns)
    while True:
        best = max(
            (f for f in ffns if ks[f.index] < plan[f.index].split.num_experts),
            key=lambda f: gains[f.index][ks[f.index]],
            default=None,
        )
        if best is None or used + plan[best.index].split.expert_size > budget + 1e-9:
            return ks
        ks[best.index] += 1
        used += plan[best.index].split.expert_size


# ----- building the blocks -----------------------------------------------------------------------------
@torch.no_grad()
def _block(ffn: FFN, plan: LayerPlan, config: MoEfyConfig, k: int) -> MoEBlock:
    """The MoE block of ``ffn`` with ``plan``'s split and router, top-k ``k``."""
    w_in = ffn.W_in.detach()  # [n, d]
    w_gate = ffn.W_gate.detach() if ffn.W_gate is not None else None
    w_out = ffn.W_out.detach()  # [d, n]
    b_in, b_gate, b_out = ffn.b_in, ffn.b_gate, ffn.b_out
    gated = w_gate is not None
    in_bias = not gated or b_in is not None or b_gate is not None
    groups, shared = plan.split.groups.to(w_in.device), plan.split.shared.to(w_in.device)
    E, f = groups.shape  # noqa: N806
    router: dict[str, Any] = {"weighting": "ones", "n_zero": config.zero_experts}
    router |= (
        {"kind": "linear"}
        if "weight" in plan.router
        else {"kind": "mlp", "hidden": plan.router["fc1.weight"].shape[0]}
    )
    block = MoEBlock(
        ffn.d_model,
        f,
        E,
        k,
        act=ffn.activation,
        router=router,
        shared=int(shared.numel()),
        gated=gated,
        in_bias=in_bias,
        bias=b_out is not None,
        layer=ffn.index,
        dtype=w_in.dtype,
        device=w_in.device,
    )
    up = w_in[groups]  # [E, f, d]
    down = w_out[:, groups].permute(1, 0, 2)  # [d, E, f] -> [E, d, f]
    if gated:
        bg = b_gate[groups] if b_gate is not None else None
        bi = b_in[groups] if b_in is not None else None
        block.experts.set_weights(w_gate[groups], up, down, bg, bi)
    else:  # act(gate) · 1: the gate half is the dense pre-activation, the up half the constant 1
        bg = b_in[groups] if b_in is not None else None
        ones = torch.ones(E, f, dtype=w_in.dtype, device=w_in.device)
        block.experts.set_weights(up, torch.zeros_like(up), down, bg, ones)
    if block.shared_expert is not None:
        se = block.shared_expert
        if gated:
            se.gate_proj.weight.copy_(w_gate[shared])
            if se.gate_proj.bias is not None:
                se.gate_proj.bias.copy_(b_gate[shared] if b_gate is not None else 0)
        se.up_proj.weight.copy_(w_in[shared])
        if se.up_proj.bias is not None:
            se.up_proj.bias.copy_(b_in[shared] if b_in is not None else 0)
        se.down_proj.weight.copy_(w_out[:, shared])
    if b_out is not None:
        block.bias.copy_(b_out)
    for name, value in plan.router.items():
        block.gate.get_parameter(name).copy_(value)
    if config.zero_experts:
        # logits are log shares: a zero expert wins a slot where an expert's share < threshold / E
        block.gate.extra_bias.fill_(math.log(config.zero_threshold / E))
    block.train(ffn.module.training)
    return block


@torch.no_grad()
def _compensate(ffn: FFN, block: MoEBlock, x: Tensor) -> None:
    """Add E[dense(x) − block(x)] over calibration tokens x [n, d] to the block's output bias: what the
    experts left out contribute on average (FLAP's bias compensation, for routed experts)."""
    x = x.to(device=ffn.W_in.device, dtype=ffn.W_in.dtype)
    gap = (ffn.forward(x) - block(x)).float().mean(0)  # [d]
    block.add_output_bias(gap)


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """ffnkit's MoE blocks of ``model``, in order.

    Example:
        >>> len(moe_blocks(model))     # 30 after moefy_ of every layer of SmolLM2-135M
    """
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def moefy_(
    model: nn.Module,
    config: MoEfyConfig | None = None,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    plan: dict[int, LayerPlan] | None = None,
    progress: bool = False,
) -> MoEfyReport:
    """Turn the chosen dense FFNs into mixtures of experts, in place and atomically (see the module doc).

    ``calibration``: token ids [n, T] (default: ``config.samples`` windows of ``config.corpus`` through
    ``tokenizer``); ``plan``: a :func:`plan_moefy` result to reuse (the split and router).

    Example:
        >>> report = moefy_(model, MoEfyConfig(active=0.5), tokenizer=tok)
        >>> report.active_fraction, report.sizes, report.mass_recall["router"]
    """
    from ffnkit.evaluate import count_parameters

    start = time.perf_counter()
    config = config or MoEfyConfig()
    ffns = dense_targets(model, config.layers, "moefy_")
    ks = {f.index: config.top_k_for(f.d_ff) for f in ffns}
    before = count_parameters(model, find_ffns(model))
    flops_before = sum(f.flops_per_token() for f in ffns)
    if plan is None:
        plan = plan_moefy(model, config, calibration=calibration, tokenizer=tokenizer)
    missing = [f.index for f in ffns if f.index not in plan]
    if missing:
        raise InvalidArgumentError(f"the plan has no split for layers {missing}; plan them with plan_moefy")
    if config.allocation == "global":
        ks = global_top_k(ffns, plan, config)
    rows, blocks = [], []
    for f in ffns:
        p, k = plan[f.index], ks[f.index]
        if (p.split.num_experts, int(p.split.shared.numel())) != config.sizes_for(f.d_ff):
            raise InvalidArgumentError(
                f"the plan of layer {f.index} was made for another number of experts or shared expert size "
                f"({p.split.num_experts}, {p.split.shared.numel()}; this config: {config.sizes_for(f.d_ff)})"
            )
        block = _block(f, p, config, k)
        refit = config.refit and p.fit_inputs is not None
        if refit:
            refit_down_(f, block, p.split, p.fit_inputs, config.refit_ridge)
        elif config.compensate and p.inputs is not None:
            _compensate(f, block, p.inputs)
        blocks.append((f.name, block))
        recall = (
            mass_recall(p.scores, p.mass, k)
            if p.scores is not None
            else {"router": None, "oracle": None, "overlap": None}
        )
        rows.append(
            {
                "index": f.index,
                "name": f.name,
                "d_ff": f.d_ff,
                "experts": p.split.num_experts,
                "expert_size": p.split.expert_size,
                "top_k": k,
                "shared": int(p.split.shared.numel()),
                "active_fraction": (p.split.shared.numel() + k * p.split.expert_size) / f.d_ff,
                "mass_recall": recall,
                "refit": refit,
                "router": p.info,
            }
        )
    with Transaction(model) as tx:
        for path, block in blocks:
            tx.replace(path, block)
        tx.record({"kind": CHANGE_KIND, "blocks": [b.to_record(p) for p, b in blocks]})
    link_routing_state(moe_blocks(model))
    routing = None
    if config.zero_experts and (calibration is not None or tokenizer is not None):
        from ffnkit.data import calibration_ids
        from ffnkit.moe.pluspp import routing_shares

        ids = calibration_ids(config, calibration, tokenizer, what="moefy_")[:4]
        routing = routing_shares(model, ids, batch_size=config.batch_size)
        zero = {r["layer"]: r["zero"] for r in routing["layers"]}
        for r in rows:  # neurons really computed: the slots zero experts took run nothing
            k_run = r["top_k"] * (1.0 - zero.get(r["index"], 0.0))
            r["active_fraction_run"] = (r["shared"] + k_run * r["expert_size"]) / r["d_ff"]
        routing["active_fraction_run"] = sum(r["active_fraction_run"] for r in rows) / len(rows)
    after = find_ffns(model)
    recalls = [r["mass_recall"] for r in rows if r["mass_recall"]["router"] is not None]
    mean = lambda key: sum(r[key] for r in recalls) / len(recalls) if recalls else None  # noqa: E731
    return MoEfyReport(
        transform="moefy",
        config=config.to_dict(),
        layers=rows,
        active_fraction=sum(r["active_fraction"] for r in rows) / len(rows),
        mass_recall={"router": mean("router"), "oracle": mean("oracle"), "overlap": mean("overlap")},
        ffn_flops_per_token_before=flops_before,
        ffn_flops_per_token_after=sum(after[f.index].flops_per_token() for f in ffns),
        parameters_before=before,
        parameters_after=count_parameters(model, after),
        seconds=time.perf_counter() - start,
        routing=routing,
        sizes={key: _same(r[key] for r in rows) for key in ("experts", "expert_size", "shared", "top_k")},
    )


def _same(values: Any) -> int | None:
    """The one value of ``values`` if they are all equal, else None."""
    seen = set(values)
    return seen.pop() if len(seen) == 1 else None


def replay_moe(model: nn.Module, change: dict) -> None:
    """Rebuild the MoE blocks of an ``ffn_moe`` change on a freshly built model (placeholder values).

    Example:
        >>> replay_moe(fresh_model, model.config.ffnkit["changes"][-1])
    """
    for rec in change.get("blocks", []):
        MoEBlock.replay(model, rec)
    link_routing_state(moe_blocks(model))
