"""Architecture adapters: one declarative entry per model family, keyed by ``config.model_type``.

An entry says where the blocks are (``layers``: ModuleList paths, matched as a suffix of the module
name), where the FFN sits inside a block (``ffn``), and the names of its parts inside the FFN. Adding a
family = one entry here + one line in the test matrix (tests/unit/test_families.py).

Unknown families fall back to a structural search (a warning says so), or take a user override::

    find_ffns(model, spec=ArchSpec(family="mine", layers=("blocks",), ffn=("ff",), w_in="fc_in", w_out="fc_out"))

The MoE-block contract (transformers v5; what Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE blocks and
ffnkit's :class:`~ffnkit.modules.moe.MoEBlock` share). A block at an FFN path is a mixture of experts
when it has

- ``experts``: 3-D ``gate_up_proj`` [E, 2f, d] (rows [gate | up]) and ``down_proj`` [E, d, f] (or both
  transposed), called as ``experts(x [N, d], top_k_index [N, k], top_k_weights [N, k])``; optionally
  ``gate_up_proj_bias`` [E, 2f] (ffnkit's blocks of non-gated FFNs) and an ``act_fn``;
- ``gate``: the router, ``gate(x [N, d]) -> (logits [N, E], weights [N, k], indices [N, k])``, with
  ``top_k`` and either a ``weight`` [E, d] (softmax top-k routing, ``norm_topk_prob``) or its own
  ``router_logits(x)`` and ``select(logits)`` (:class:`~ffnkit.core.ffn.Router` uses them), and
  ``hidden_dim`` = d where ``weight`` is absent;
- optionally ``shared_expert`` (``gate_proj``/``up_proj``/``down_proj``, always on), a sigmoid
  ``shared_expert_gate`` Linear(d, 1), and a block-level output ``bias`` [d].

Any family's block that keeps this contract is read by :func:`find_ffns` as ``kind="moe"`` (so dense
models converted by ``moefy_`` / ``upcycle_`` keep their ``model_type`` and their adapter), and pruning,
quantisation, capture and steering work on it unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

from torch import Tensor, nn
from transformers.activations import ACT2FN

from ffnkit.core.errors import LayerIndexError, UnsupportedArchitectureError
from ffnkit.core.ffn import FFN, ExpertWeight, LinearBias, LinearWeight, Router
from ffnkit.core.hf import text_config
from ffnkit.core.layouts import EXPERTS, FusedGateUp, find_layout, layout_of


@dataclass(frozen=True)
class ArchSpec:
    """Where one family keeps its FFNs. Paths are dotted module names relative to the parent."""

    family: str
    layers: tuple[str, ...]  # ModuleList(s) of blocks, first pattern that matches wins per stack
    ffn: tuple[str, ...]  # candidate paths of the FFN container inside a block ("" = the block itself)
    w_in: str  # up / fc1 / c_fc ... (for fused gate_up: the fused module)
    w_out: str
    w_gate: str | None = None
    fused_gate_up: bool = False  # Phi-3: one Linear gives [gate | up]
    act: tuple[str, ...] = ("act_fn", "act", "activation_fn", "intermediate_act_fn")
    # MoE blocks (detected per block: dense layers of MoE models keep the dense parts above)
    router: str = "gate"
    experts: str = "experts"
    shared_expert: str | None = "shared_expert"
    shared_expert_gate: str | None = "shared_expert_gate"
    # what later analyses need (vocabulary projection, sublayer removal)
    final_norm: tuple[str, ...] = ("norm",)
    attn: str | None = "self_attn"
    stacks: tuple[str, ...] = ("",)  # names of the stacks matched by the `layers` patterns, in order


_LLAMA = ArchSpec(
    family="llama", layers=("layers",), ffn=("mlp",), w_in="up_proj", w_gate="gate_proj", w_out="down_proj"
)
_MOE = replace(_LLAMA, family="moe")

# model_type -> ArchSpec. Kept a plain typed dict rather than a core.registry.Registry: every entry is
# eager data (no import to defer), lookups fall back to a structural search instead of an unknown-name
# error, and `ArchSpec` already carries what a Registry entry's help/metadata would hold.
ARCHS: dict[str, ArchSpec] = {
    # Llama family: SwiGLU / GeGLU with gate_proj, up_proj, down_proj
    **{
        t: replace(_LLAMA, family=t)
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3")
    },
    "gemma3": replace(_LLAMA, family="gemma3", layers=("language_model.layers", "layers")),
    "phi3": replace(_LLAMA, family="phi3", w_in="gate_up_proj", w_gate="gate_up_proj", fused_gate_up=True),
    "phi": ArchSpec(
        family="phi",
        layers=("layers",),
        ffn=("mlp",),
        w_in="fc1",
        w_out="fc2",
        final_norm=("final_layernorm",),
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        layers=("h",),
        ffn=("mlp",),
        w_in="c_fc",
        w_out="c_proj",
        final_norm=("ln_f",),
        attn="attn",
    ),
    "gpt_neox": ArchSpec(
        family="gpt_neox",
        layers=("layers",),
        ffn=("mlp",),
        w_in="dense_h_to_4h",
        w_out="dense_4h_to_h",
        final_norm=("final_layer_norm",),
        attn="attention",
    ),
    "opt": ArchSpec(
        family="opt",
        layers=("decoder.layers",),
        ffn=("",),
        w_in="fc1",
        w_out="fc2",
        final_norm=("decoder.final_layer_norm",),
    ),
    **{
        t: ArchSpec(
            family=t,
            layers=("encoder.layer",),
            ffn=("",),
            w_in="intermediate.dense",
            w_out="output.dense",
            act=("intermediate.intermediate_act_fn",),
            final_norm=(),
            attn="attention",
        )
        for t in ("bert", "roberta", "xlm-roberta")
    },
    "t5": ArchSpec(
        family="t5",
        layers=("encoder.block", "decoder.block"),
        stacks=("encoder", "decoder"),
        # encoder blocks: [self-attn, FF]; decoder blocks: [self-attn, cross-attn, FF]
        ffn=("layer.2.DenseReluDense", "layer.1.DenseReluDense"),
        w_in="wi",
        w_out="wo",
        final_norm=("decoder.final_layer_norm",),
        attn="layer.0.SelfAttention",
    ),
    # MoE families, transformers v5 layout: router `gate`, 3-D `experts`
    "mixtral": replace(_MOE, family="mixtral"),
    "olmoe": replace(_MOE, family="olmoe"),
    "qwen2_moe": replace(
        _MOE, family="qwen2_moe", shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"
    ),
    "qwen3_moe": replace(_MOE, family="qwen3_moe"),
}
# T5's gated variants (flan-t5, t5-v1.1) use wi_0 (gate) and wi_1 (up); detected per block below.

SUPPORTED_FAMILIES = tuple(sorted(ARCHS))


def register_arch(model_type: str, spec: ArchSpec) -> None:
    """Add or replace the adapter for a ``config.model_type`` (one line per new family)."""
    ARCHS[model_type] = spec


def _get(root: nn.Module, path: str) -> nn.Module | None:
    if path == "":
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_layer_lists(model: nn.Module, spec: ArchSpec) -> list[tuple[str, str, nn.ModuleList]]:
    """(stack, path, ModuleList) for each stack of blocks; within a stack the first pattern that matches wins.

    Example:
        >>> find_layer_lists(model, resolve_spec(model))   # [('', 'model.layers', ModuleList(...))]
    """
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    found = []
    patterns = spec.layers
    stacks = spec.stacks if len(spec.stacks) == len(patterns) else ("",) * len(patterns)
    seen_stacks: set[str] = set()
    for stack, pattern in zip(stacks, patterns, strict=True):
        if stack in seen_stacks and stack == "":
            break  # single-stack model: a later pattern is only a fallback
        for name, mod in lists:
            if name == pattern or name.endswith("." + pattern):
                found.append((stack, name, mod))
                seen_stacks.add(stack)
                break
    return found


def _linear_ref(mod: nn.Module, rows: slice | None = None) -> tuple[LinearWeight, LinearBias | None]:
    bias = LinearBias(mod, rows) if getattr(mod, "bias", None) is not None else None
    return LinearWeight(mod, rows), bias


def _out_features(mod: nn.Module) -> int:
    return layout_of(mod).dims(mod)[0]


def _activation(container: nn.Module, spec: ArchSpec, config) -> tuple[str, object]:
    """The activation callable (from the module, so custom ones work) and a readable name."""
    fn = None
    for path in spec.act:
        fn = _get(container, path)
        if fn is not None:
            break
    name = None
    for key in (
        "hidden_activation",
        "hidden_act",
        "activation_function",
        "dense_act_fn",
        "feed_forward_proj",
    ):
        value = getattr(config, key, None)
        if isinstance(value, str):
            name = value
            break
    if fn is None:
        fn = ACT2FN[name] if name in ACT2FN else nn.GELU()
    return name or type(fn).__name__, fn


def _dense_ffn(container: nn.Module, spec: ArchSpec, config, **common) -> FFN | None:
    w_in_name, w_gate_name = spec.w_in, spec.w_gate
    if spec.family == "t5" and _get(container, "wi_0") is not None:
        w_in_name, w_gate_name = "wi_1", "wi_0"
    w_in_mod, w_out_mod = _get(container, w_in_name), _get(container, spec.w_out)
    if w_in_mod is None or w_out_mod is None:
        return None
    activation, act_fn = _activation(container, spec, config)
    w_gate_mod = _get(container, w_gate_name) if w_gate_name else None
    if spec.fused_gate_up:
        d_ff = _out_features(w_in_mod) // 2
        w_gate, b_gate = _linear_ref(w_in_mod, FusedGateUp.gate(d_ff))
        w_in, b_in = _linear_ref(w_in_mod, FusedGateUp.up(d_ff))
    else:
        d_ff = _out_features(w_in_mod)
        w_in, b_in = _linear_ref(w_in_mod)
        w_gate, b_gate = _linear_ref(w_gate_mod) if w_gate_mod is not None else (None, None)
    w_out, b_out = _linear_ref(w_out_mod)
    return FFN(
        kind="gated" if w_gate is not None else "mlp",
        d_model=w_out.get().shape[0],
        d_ff=d_ff,
        activation=activation,
        act_fn=act_fn,
        module=container,
        in_proj=w_in_mod,
        gate_proj=w_gate_mod if w_gate_mod is not None else (w_in_mod if spec.fused_gate_up else None),
        out_proj=w_out_mod,
        fused_gate_up=spec.fused_gate_up,
        w_in=w_in,
        w_gate=w_gate,
        w_out=w_out,
        bias_in=b_in,
        bias_gate=b_gate,
        bias_out=b_out,
        **common,
    )


def _moe_ffn(container: nn.Module, spec: ArchSpec, config, **common) -> FFN:
    router_mod, experts_mod = _get(container, spec.router), _get(container, spec.experts)
    d_model = int(getattr(router_mod, "hidden_dim", 0) or router_mod.weight.shape[1])
    n_experts = EXPERTS.num_experts(experts_mod)
    # v5 stores gate_up as [E, 2f, d] and down as [E, d, f]; some models keep the transpose.
    gu_t, down_t = EXPERTS.orientation(experts_mod, d_model)
    d_ff = EXPERTS.d_ff(experts_mod, gu_t)
    gate_up, down = EXPERTS.gate_up, EXPERTS.down  # tensor names
    activation, act_fn = _activation(experts_mod, spec, config)
    common_expert = dict(
        layer=common["layer"], stack=common["stack"], family=spec.family, d_model=d_model, d_ff=d_ff
    )
    # ffnkit's MoE block of a non-gated dense FFN keeps the input biases beside the 3-D tensors
    has_bias = isinstance(getattr(experts_mod, EXPERTS.gate_up_bias, None), Tensor)
    bias = EXPERTS.gate_up_bias
    experts = [
        FFN(
            index=e,
            name=f"{common['name']}.{spec.experts}[{e}]",
            kind="gated",
            activation=activation,
            act_fn=act_fn,
            module=experts_mod,
            w_gate=ExpertWeight(experts_mod, gate_up, e, FusedGateUp.gate(d_ff), gu_t),
            w_in=ExpertWeight(experts_mod, gate_up, e, FusedGateUp.up(d_ff), gu_t),
            w_out=ExpertWeight(experts_mod, down, e, None, down_t),
            bias_gate=ExpertWeight(experts_mod, bias, e, FusedGateUp.gate(d_ff)) if has_bias else None,
            bias_in=ExpertWeight(experts_mod, bias, e, FusedGateUp.up(d_ff)) if has_bias else None,
            **common_expert,
        )
        for e in range(n_experts)
    ]
    shared = None
    if spec.shared_expert and isinstance(_get(container, spec.shared_expert), nn.Module):
        shared = _dense_ffn(
            _get(container, spec.shared_expert),
            replace(spec, w_in="up_proj", w_gate="gate_proj", w_out="down_proj", fused_gate_up=False),
            config,
            **{**common, "index": -1, "name": f"{common['name']}.{spec.shared_expert}"},
        )
    top_k = getattr(router_mod, "top_k", None) or getattr(config, "num_experts_per_tok", 1)
    norm_topk = getattr(router_mod, "norm_topk_prob", getattr(config, "norm_topk_prob", True))
    return FFN(
        kind="moe",
        d_model=d_model,
        d_ff=d_ff,
        activation=activation,
        act_fn=act_fn,
        module=container,
        router=Router(router_mod, int(top_k), bool(norm_topk)),
        router_module=router_mod,
        experts=experts,
        shared=shared,
        shared_gate=_get(container, spec.shared_expert_gate) if spec.shared_expert_gate else None,
        bias_out=LinearBias(container) if isinstance(getattr(container, "bias", None), Tensor) else None,
        **common,
    )


def _is_moe_container(container: nn.Module, spec: ArchSpec) -> bool:
    experts = _get(container, spec.experts)
    return experts is not None and EXPERTS.matches(experts)


def _structural_spec(model: nn.Module) -> ArchSpec | None:
    """Guess a spec for an unknown family: the ModuleList of blocks, then Linear names in its first block."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return None
    name, blocks = max(lists, key=lambda nm: len(nm[1]))
    linears = {}
    for n, m in blocks[0].named_modules():
        layout = find_layout(m)
        if layout is not None and layout.dense:
            linears[n] = layout.dims(m)  # (out, in)
    ups, downs = {}, {}
    for n, shape in linears.items():
        if shape[0] > shape[1]:
            ups[n] = shape
        elif shape[0] < shape[1]:
            downs[n] = shape
    for d_name, (d_out, d_ff) in downs.items():
        parent = d_name.rpartition(".")[0]
        siblings = [
            u for u, (o, i) in ups.items() if o == d_ff and i == d_out and u.rpartition(".")[0] == parent
        ]
        if not siblings:
            continue
        gate = next((u for u in siblings if "gate" in u), None)
        up = next((u for u in siblings if u != gate), None)

        def strip(path: str, parent: str = parent) -> str:
            return path[len(parent) + 1 :] if parent else path

        return ArchSpec(
            family="structural",
            layers=(name,),
            ffn=(parent,),
            w_in=strip(up or gate),
            w_gate=strip(gate) if gate and up else None,
            w_out=strip(d_name),
        )
    return None


def resolve_spec(model: nn.Module, spec: ArchSpec | None = None) -> ArchSpec:
    """The adapter for this model: the user's, the table's, or a structural guess (with a warning)."""
    if spec is not None:
        return spec
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHS:
        return ARCHS[model_type]
    guess = _structural_spec(model)
    if guess is None:
        raise UnsupportedArchitectureError(
            f"no FFN adapter for model type {model_type!r} and no FFN found structurally; supported: "
            f"{', '.join(SUPPORTED_FAMILIES)} — or pass spec=ArchSpec(...) with your module names"
        )
    warnings.warn(
        f"model type {model_type!r} has no ffnkit adapter; found FFNs structurally "
        f"({guess.layers[0]}.*.{guess.ffn[0]}: {guess.w_in}/{guess.w_gate}/{guess.w_out}). "
        "Check them with `ffnkit models`, or pass spec=ArchSpec(...).",
        stacklevel=3,
    )
    return guess


def find_ffns(model: nn.Module, *, spec: ArchSpec | None = None) -> list[FFN]:
    """Every FFN block of a model, in execution order (T5: encoder blocks, then decoder blocks).

    Example:
        >>> model, tok = load_model("smollm2-135m")
        >>> ffns = find_ffns(model)
        >>> len(ffns), ffns[0].kind, ffns[0].d_ff     # (30, 'gated', 1536)
    """
    spec = resolve_spec(model, spec)
    config = getattr(model, "config", None)
    config = text_config(config) if spec.family == "gemma3" else config
    ffns: list[FFN] = []
    for stack, list_name, blocks in find_layer_lists(model, spec):
        for layer, block in enumerate(blocks):
            for ffn_path in spec.ffn:
                container = _get(block, ffn_path)
                if container is None:
                    continue
                name = ".".join(p for p in (list_name, str(layer), ffn_path) if p)
                common = dict(index=len(ffns), layer=layer, name=name, stack=stack, family=spec.family)
                if _is_moe_container(container, spec):
                    ffn = _moe_ffn(container, spec, config, **common)
                else:
                    ffn = _dense_ffn(container, spec, config, **common)
                if ffn is not None:
                    ffns.append(ffn)
                    break
    if not ffns:
        raise UnsupportedArchitectureError(
            f"found no FFN in this {spec.family!r} model with the adapter's module names "
            f"(layers={spec.layers}, ffn={spec.ffn}, w_in={spec.w_in!r}, w_out={spec.w_out!r}); "
            "pass spec=ArchSpec(...) naming your modules"
        )
    return ffns


def select_ffns(ffns: list[FFN], layers: int | list[int] | None) -> list[FFN]:
    """Pick FFNs by index (negative counts from the end); a bad index is a clear error."""
    if layers is None:
        return list(ffns)
    wanted = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for i in wanted:
        if not -len(ffns) <= i < len(ffns):
            raise LayerIndexError(
                f"layer {i} is out of range: this model has {len(ffns)} FFNs (0–{len(ffns) - 1})"
            )
        out.append(ffns[i])
    return out
