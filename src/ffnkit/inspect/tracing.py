"""Prediction trace: what each FFN does to the prediction at one position of a prompt (LM-Debugger style).

Per FFN layer, at the traced position:

- ``before`` / ``after``: logit-lens top tokens of the residual stream before and after the FFN;
- ``sub_updates``: the dominant sub-updates m_i v_i, ranked by |m_i| · ‖v_i‖ (Geva et al. 2022), each with
  the tokens it pushes up (top of r_i if m_i > 0, bottom of r_i if m_i < 0);
- ``target``: each neuron's direct effect on the logit of a chosen target token.

Residual stream (read from hooks on the block itself, documented per family):
``after`` = the block's output; ``before`` = after − (what the FFN added). For sequential pre-norm blocks
(Llama, Mistral, Qwen, Gemma, SmolLM3, Phi-3, GPT-2, GPT-NeoX without parallel residual, OPT with
``do_layer_norm_before``, MoE families) what the FFN added is its output, so ``before`` = block input +
attention output, exactly. Gemma-2/3 add ``post_feedforward_layernorm(out)``: that module's output is
hooked and subtracted, so ``before`` is exact there too. Parallel blocks (Phi-1/2, GPT-NeoX with
``use_parallel_residual``) compute attention and FFN from the same input: ``before`` = block output − FFN
output (= block input + attention), flagged ``parallel``. Post-norm blocks (OPT-350m, BERT) and
encoder-decoder models (T5) are refused with a clear error.

Direct effect on the target logit (``DIRECT_EFFECT_RULE``): the final norm's scale s (RMS or std of the
final residual at this position) is frozen, so the final logit is linear in every vector written to the
residual, and neuron i contributes

    effect_i = m_i · (E (g ⊙ c(v_i)))[target] / s      (c = mean-centring under LayerNorm, else identity)

For Gemma-2/3 the post-FFN norm is frozen the same way (v_i → g₂ ⊙ v_i / s₂). The effects of all neurons
plus b_out add up exactly to the FFN's total direct effect; softcapping is left out (it is monotone).

Example:
    >>> t = trace(model, tok, "The capital of France is", target=" Paris")
    >>> t.to_dict()["layers"][-1]["sub_updates"][0]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns, select_ffns
from ffnkit.core.blocks import block_of
from ffnkit.core.capture import capture
from ffnkit.core.config import Result
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.runner import logits as run_logits
from ffnkit.inspect.lens import Lens, decode_tokens, norm_gain

DIRECT_EFFECT_RULE = (
    "effect_i = m_i * (E (g ⊙ c(v_i)))[target] / s: the linearised direct effect on the final logit with "
    "the final norm's scale s (RMS/std of the final residual at this position) frozen; c = mean-centring "
    "for LayerNorm models; Gemma-2/3 post-FFN norm frozen likewise; logit softcapping ignored"
)
SCORE_RULE = "|m_i| * ||v_i|| (Geva et al. 2022)"


def _first(x):
    return x[0] if isinstance(x, tuple) else x


# ----- where the residual stream is ----------------------------------------------------------------
def _residual_rule(model: nn.Module, block: nn.Module) -> str:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidArgumentError(
            "trace reads one residual stream; encoder-decoder models (T5) have two — use a decoder-only model"
        )
    if getattr(config, "do_layer_norm_before", True) is False:
        raise InvalidArgumentError(
            "this OPT model normalises after each block (post-norm): the residual before the FFN cannot be "
            "recovered from the block output; trace a pre-norm model"
        )
    if hasattr(block, "post_feedforward_layernorm"):
        return "post_ffn_norm"
    if getattr(block, "use_parallel_residual", False) or config.model_type in ("phi", "gptj"):
        return "parallel"
    return "sequential"


# ----- results ---------------------------------------------------------------------------------------
@dataclass
class LayerTrace(Result):
    """One FFN at the traced position. Tensors are float32, on CPU; ``to_dict`` drops them."""

    layer: int
    name: str
    kind: str
    residual: str  # sequential | parallel | post_ffn_norm
    before: list[dict]
    after: list[dict]
    sub_updates: list[dict]
    target: dict | None
    out: Tensor  # [d] the FFN's output at the position
    b_out: Tensor | None  # [d]
    units: list[tuple[object, Tensor, FFN]] = field(default_factory=list)  # (expert, m [n], handle)
    resid_before: Tensor | None = None  # [d] residual stream before the FFN
    resid_after: Tensor | None = None  # [d] after it (the block's output)

    def contributions(self) -> Tensor:
        """Every sub-update m_i v_i at the position, [n_total, d] (MoE: routing weight folded into m)."""
        with torch.no_grad():
            return torch.cat([m[:, None] * h.W_out.detach().float().cpu().T for _, m, h in self.units])

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "name": self.name,
            "kind": self.kind,
            "residual": self.residual,
            "before": self.before,
            "after": self.after,
            "sub_updates": self.sub_updates,
            "target": self.target,
        }


@dataclass
class Trace(Result):
    prompt: str
    tokens: list[str]
    position: int
    target: dict | None
    prediction: list[dict]
    basis: str
    layers: list[LayerTrace]
    final_scale: float = 1.0  # s, the final norm's divisor at the position (frozen in direct effects)
    logits: Tensor | None = None  # [V] the model's own logits at the position

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "position": self.position,
            "target": self.target,
            "prediction": self.prediction,
            "basis": self.basis,
            "score_rule": SCORE_RULE,
            "direct_effect_rule": DIRECT_EFFECT_RULE if self.target else None,
            "layers": [lt.to_dict() for lt in self.layers],
        }


def _top(tokenizer, logits: Tensor, k: int) -> list[dict]:
    probs = torch.softmax(logits.float(), -1)
    vals, ids = probs.topk(k)
    ids_l = ids.tolist()
    return [
        {"token": t, "id": i, "prob": round(float(p), 5)}
        for t, i, p in zip(decode_tokens(tokenizer, ids_l), ids_l, vals.tolist(), strict=True)
    ]


def target_id(tokenizer, target: str | int, prompt: str = "") -> int:
    """The token id of a target: an int as is; a word → first token of it, with a leading space added
    when the prompt does not end in whitespace (the next word of running text starts with one)."""
    if isinstance(target, int):
        return target
    text = target
    if not text.startswith(" ") and prompt and not prompt[-1].isspace():
        text = " " + text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidArgumentError(f"the target {target!r} has no tokens")
    return ids[0]


# ----- the trace -------------------------------------------------------------------------------------
def _units(ffn: FFN, x: Tensor, post: Tensor | None) -> list[tuple[object, Tensor, FFN]]:
    """(expert, m [n] with routing weight folded in, handle) for one position."""
    if ffn.kind != "moe":
        return [(None, post.float(), ffn)]
    units = []
    _, top_w, top_i = ffn.router.route(x[None])  # [1, k]
    for w, e in zip(top_w[0].tolist(), top_i[0].tolist(), strict=True):
        expert = ffn.experts[e]
        units.append((e, expert.activations(x)["post"].float() * w, expert))
    if ffn.shared is not None:
        m = ffn.shared.activations(x)["post"].float()
        if ffn.shared_gate is not None:
            m = m * torch.sigmoid(ffn.shared_gate(x)).float()
        units.append(("shared", m, ffn.shared))
    return units


def trace(
    model: nn.Module,
    tokenizer,
    prompt: str | Tensor | list[int],
    *,
    target: str | int | None = None,
    layers: int | list[int] | None = None,
    position: int = -1,
    top_k: int = 10,
    top_neurons: int = 10,
    use_gain: bool = True,
) -> Trace:
    """Trace the prediction at ``position`` (default: the last token) of ``prompt`` through every FFN.

    ``prompt`` is text, or token ids (then ``target`` must be a token id too).

    Example:
        >>> t = trace(model, tok, "Monday, Tuesday,", target="Wednesday", top_neurons=5)
        >>> [(lt["layer"], lt["after"][0]["token"]) for lt in t.to_dict()["layers"]]
    """
    lens = Lens.of(model)
    ffns = find_ffns(model)
    chosen = select_ffns(ffns, layers)
    blocks = {f.index: block_of(model, f)[1] for f in chosen}
    rules = {i: _residual_rule(model, b) for i, b in blocks.items()}
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:  # token ids given directly
        ids, prompt = torch.as_tensor(prompt).reshape(1, -1), ""
    ids = ids.to(lens.E.device)  # [1, T]
    T = ids.shape[1]
    if not -T <= position < T:
        raise InvalidArgumentError(f"position {position} is outside the prompt's {T} tokens")
    p = position % T
    tid = target_id(tokenizer, target, prompt) if target is not None else None
    if tid is not None and not 0 <= tid < lens.vocab_size:
        raise InvalidArgumentError(f"target id {tid} is outside the vocabulary (0–{lens.vocab_size - 1})")

    seen: dict[tuple[str, int], Tensor] = {}
    handles = []

    def keep(key):
        def hook(mod, args, out):
            seen[key] = _first(out).detach()[0, p].float()  # [d]

        return hook

    try:
        for i, block in blocks.items():
            handles.append(block.register_forward_hook(keep(("block", i))))
            if rules[i] == "post_ffn_norm":
                handles.append(block.post_feedforward_layernorm.register_forward_hook(keep(("post_norm", i))))
        if lens.norm is not None:
            handles.append(
                lens.norm.register_forward_pre_hook(
                    lambda m, a: seen.__setitem__(("final", 0), a[0].detach()[0, p].float())
                )
            )
        sites = ["in", "out"] + (["post"] if any(f.kind != "moe" for f in chosen) else [])
        with torch.no_grad(), capture(model, sites=sites, layers=[f.index for f in chosen], ffns=ffns) as cap:
            logits = run_logits(model, ids)[0, p]  # [V]
    finally:
        for h in handles:
            h.remove()

    s = lens.norm_scale(seen[("final", 0)]).item() if ("final", 0) in seen else 1.0
    E = lens.E.float()
    layers_out = []
    with torch.no_grad():
        for ffn in chosen:
            i = ffn.index
            # [1, T, n] or flattened [T, n] (OPT): row p either way, batch is 1
            x = cap.calls("in", i)[-1].reshape(T, -1)[p]  # [d]
            out = cap.calls("out", i)[-1].reshape(T, -1)[p].float()  # [d]
            post = cap.calls("post", i)[-1].reshape(T, -1)[p] if ffn.kind != "moe" else None  # [n]
            after = seen[("block", i)]
            added = seen[("post_norm", i)] if rules[i] == "post_ffn_norm" else out
            before = after - added
            units = _units(ffn, x, post)
            # the post-FFN norm (Gemma-2/3), frozen: what each sub-update becomes in the residual
            post_scale = None
            if rules[i] == "post_ffn_norm":
                pn = blocks[i].post_feedforward_layernorm
                eps = getattr(pn, "eps", 1e-6)
                post_scale = norm_gain(pn, ffn.d_model, out) / torch.sqrt(out.pow(2).mean() + eps)  # [d]
            subs, scores, effects = [], [], []
            for expert, m, handle in units:
                W = handle.W_out.float()  # [d, n]
                scores.append((expert, m, W, m.abs() * W.norm(dim=0)))
                if tid is not None:
                    Wr = W * post_scale[:, None] if post_scale is not None else W
                    e_t = (E[tid] @ lens.direction(Wr, use_gain=True)) / s  # [n]
                    effects.append((expert, m * e_t))
            flat = [
                (expert, j, float(sc[j]), float(m[j]), W)
                for expert, m, W, sc in scores
                for j in range(m.numel())
            ]
            flat.sort(key=lambda r: -r[2])
            for expert, j, score, mj, W in flat[:top_neurons]:
                r = E @ lens.direction(W[:, [j]], use_gain=use_gain)[:, 0]  # [V]
                vals, tok = (r if mj >= 0 else -r).topk(top_k)
                subs.append(
                    {
                        "expert": expert,
                        "neuron": j,
                        "m": round(mj, 5),
                        "norm_v": round(float(W[:, j].norm()), 5),
                        "score": round(score, 5),
                        "pushes": decode_tokens(tokenizer, tok.tolist()),
                    }
                )
            tgt = None
            if tid is not None:
                b = ffn.b_out
                b_eff = 0.0
                if b is not None:
                    br = b.float() * post_scale if post_scale is not None else b.float()
                    b_eff = float(E[tid] @ lens.direction(br[:, None])[:, 0] / s)
                all_eff = [(expert, j, float(v)) for expert, ev in effects for j, v in enumerate(ev.tolist())]
                total = sum(v for _, _, v in all_eff) + b_eff
                all_eff.sort(key=lambda r: -abs(r[2]))
                tgt = {
                    "ffn_total": round(total, 5),
                    "b_out": round(b_eff, 5),
                    "top_neurons": [
                        {"expert": e, "neuron": j, "effect": round(v, 5)} for e, j, v in all_eff[:top_neurons]
                    ],
                }
            layers_out.append(
                LayerTrace(
                    layer=i,
                    name=ffn.name,
                    kind=ffn.kind,
                    residual=rules[i],
                    before=_top(tokenizer, lens.logits(before), top_k),
                    after=_top(tokenizer, lens.logits(after), top_k),
                    sub_updates=subs,
                    target=tgt,
                    out=out.cpu(),
                    b_out=None
                    if ffn.kind == "moe" or ffn.b_out is None
                    else ffn.b_out.detach().float().cpu(),
                    units=[(e, m.cpu(), h) for e, m, h in units],
                    resid_before=before.cpu(),
                    resid_after=after.cpu(),
                )
            )
    target_doc = None
    if tid is not None:
        target_doc = {
            "token": decode_tokens(tokenizer, [tid])[0],
            "id": tid,
            "logit": round(float(logits[tid]), 5),
            "prob": round(float(torch.softmax(logits.float(), -1)[tid]), 5),
        }
    return Trace(
        prompt=prompt,
        tokens=decode_tokens(tokenizer, ids[0].tolist()),
        position=p,
        target=target_doc,
        prediction=_top(tokenizer, logits, top_k),
        basis=lens.basis(use_gain),
        layers=layers_out,
        final_scale=s,
        logits=logits.float().cpu(),
    )
