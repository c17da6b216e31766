"""Healing: a short distillation of a compressed model towards the original, ``heal_(model, reference)``.

The loss is KL(reference ‖ model) of the next-token distributions (temperature 1) on calibration text,
averaged over tokens, optionally plus a matching of every layer's hidden state (``hidden_weight``: mean
squared error over the reference's mean square, averaged over layers — a denser signal per token, which
matters when a CPU budget allows only a hundred steps). By default only the FFN parameters train (the
factors of low-rank matrices, the remaining neurons of pruned FFNs, expert tensors); ``params="blocks"``
trains every layer's weights (attention and norms too; the embedding tables and the output head stay
frozen).
With ``lora=True`` the FFN Linears get peft LoRA adapters instead, merged back into the weights at the
end (needs ``pip install peft``). The learning rate warms up, then follows a cosine to ``final_lr``×lr
over whichever runs out first, the steps or the time budget (``max_minutes``), so a short budget still
ends with a decayed learning rate; the report says why it stopped and keeps the loss curve.

Example:
    >>> reference = copy.deepcopy(model)
    >>> prune_(model, PruneConfig("flap", 0.3), tokenizer=tok)
    >>> report = heal_(model, reference, HealConfig(steps=100, max_minutes=10), tokenizer=tok)
    >>> report.loss_curve[0], report.loss_curve[-1]
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffnkit.core.archs import find_ffns
from ffnkit.core.config import JsonConfig
from ffnkit.core.errors import FFNKitError, InvalidArgumentError
from ffnkit.core.runner import forward, layer_states
from ffnkit.modules.moe import MoEBlock

HEAL_PARAMS = ("ffn", "blocks")
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's settings

__all__ = ["HEAL_PARAMS", "HealConfig", "HealReport", "ffn_trainable_parameters", "heal_", "kl_to_reference"]


@dataclass
class HealConfig(JsonConfig):
    """How to heal. JSON round trip: ``HealConfig.from_dict(json.loads(c.to_json()))``.

    Example:
        >>> HealConfig(steps=50, lr=5e-5).to_dict()["max_minutes"]
        10.0
    """

    steps: int = 200  # optimiser steps (fewer if max_minutes runs out first)
    lr: float = 3e-4  # best of 1e-4 / 3e-4 / 1e-3 in benchmarks/results/heal_sweep_h200.json
    samples: int = 512  # calibration windows drawn (cycled through; 512 × 256 tokens ≈ 10 CPU minutes)
    seq_len: int = 256
    batch_size: int = 4
    warmup: int = 5  # linear warm-up steps, then a cosine decay to final_lr × lr
    final_lr: float = 0.1  # share of lr left at the end of the cosine
    weight_decay: float = 0.0
    params: str = "ffn"  # what trains: "ffn" (FFN weights) or "blocks" (all but embeddings and head)
    hidden_weight: float = 0.0  # weight of the per-layer hidden-state matching added to the KL
    lora: bool = False  # peft LoRA adapters on the FFN Linears instead of training them
    lora_r: int = 8
    lora_alpha: int = 16
    max_minutes: float = 10.0
    # float32 matmuls while training: "highest" (exact float32), "high" (TF32 tensor cores on NVIDIA GPUs,
    # several times the float32 rate; no effect on the CPU). Evaluation afterwards is unaffected.
    matmul_precision: str = "highest"
    corpus: str = "shakespeare"
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.samples < 1 or self.seq_len < 2:
            raise InvalidArgumentError("steps, batch_size and samples must be >= 1 and seq_len >= 2")
        if not self.lr > 0 or not self.max_minutes > 0:
            raise InvalidArgumentError(f"lr and max_minutes must be > 0, got {self.lr}, {self.max_minutes}")
        if self.lora_r < 1:
            raise InvalidArgumentError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise InvalidArgumentError(
                f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {self.matmul_precision!r}"
            )
        if self.params not in HEAL_PARAMS:
            raise InvalidArgumentError(f"params must be one of {', '.join(HEAL_PARAMS)}, got {self.params!r}")
        if not 0.0 <= self.final_lr <= 1.0 or self.hidden_weight < 0:
            raise InvalidArgumentError(
                f"final_lr must be in [0, 1] and hidden_weight >= 0, got {self.final_lr}, {self.hidden_weight}"
            )


@dataclass
class HealReport:
    """What ``heal_`` did (JSON-ready through ``to_dict``)."""

    transform: str
    config: dict[str, Any]
    steps: int
    seconds: float
    stopped_by: str  # "steps" | "time"
    trainable_parameters: int
    tokens_seen: int
    loss_curve: list[float] = field(default_factory=list)  # KL per step (nats per token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hidden_state_loss(states: tuple[Tensor, ...], ref_states: tuple[Tensor, ...]) -> Tensor:
    """Mean over layers of ‖h − h_ref‖² / ‖h_ref‖² (each averaged over tokens): scale-free per layer, so
    late layers with large residual norms do not drown the early ones.

    Example:
        >>> hidden_state_loss(out.hidden_states[1:], ref_out.hidden_states[1:])
    """
    terms = [
        (h.float() - r.float()).pow(2).mean() / r.float().pow(2).mean().clamp_min(1e-12)
        for h, r in zip(states, ref_states, strict=True)
    ]
    return torch.stack(terms).mean()


def kl_to_reference(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Mean over tokens of KL(p_ref ‖ p_model), temperature 1, in float32. logits: [..., V].

    Example:
        >>> kl_to_reference(model_logits, reference_logits)
        tensor(0.1234)
    """
    logp = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    logq = F.log_softmax(ref_logits.float(), dim=-1).reshape(-1, ref_logits.shape[-1])
    return F.kl_div(logp, logq, log_target=True, reduction="batchmean")


def _ffn_modules(model: nn.Module) -> list[nn.Module]:
    mods: dict[int, nn.Module] = {}
    for f in find_ffns(model):
        parts = [f.in_proj, f.gate_proj, f.out_proj]
        if f.kind == "moe":
            parts = [e.module for e in f.experts[:1]]  # the fused experts module holds all experts
            if isinstance(f.module, MoEBlock):
                # ffnkit's converted blocks: the router trains too (weight-1 routing passes it a gradient)
                parts.append(f.router_module)
            if f.shared is not None:
                parts += [f.shared.in_proj, f.shared.gate_proj, f.shared.out_proj]
        for m in parts:
            if m is not None:
                mods[id(m)] = m
    return list(mods.values())


def ffn_trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The FFN weights healing trains by default (unique parameters of the FFN projection modules).

    Example:
        >>> sum(p.numel() for p in ffn_trainable_parameters(model))
    """
    params: dict[int, nn.Parameter] = {}
    for m in _ffn_modules(model):
        for p in m.parameters():
            params[id(p)] = p
    for block in model.modules():
        if isinstance(block, MoEBlock) and block.bias is not None:
            params[id(block.bias)] = block.bias  # the output bias (compensation of the experts left out)
    return list(params.values())


def _linear_paths(model: nn.Module) -> list[str]:
    """Full module paths of the dense matrix leaves inside FFN modules (peft LoRA targets; v5 3-D expert
    tensors and quantised matrices are not dense layouts and get no adapter)."""
    from ffnkit.core.layouts import find_layout

    wanted = {id(m) for m in _ffn_modules(model)}
    paths = []
    for name, mod in model.named_modules():
        if id(mod) in wanted:
            paths += [
                f"{name}.{sub}" if sub else name
                for sub, leaf in mod.named_modules()
                if (layout := find_layout(leaf)) is not None and layout.dense
            ]
    return paths


def _calibration(config: HealConfig, calibration: Tensor | None, tokenizer: Any) -> Tensor:
    from ffnkit.data import calibration_ids

    return calibration_ids(config, calibration, tokenizer, what="healing")


def _lr_factor(step: int, config: HealConfig, time_progress: float = 0.0) -> float:
    """Warm-up, then a cosine to ``final_lr`` driven by the steps or the time used, whichever is further."""
    if step < config.warmup:
        return (step + 1) / (config.warmup + 1)
    progress = max((step - config.warmup) / max(1, config.steps - config.warmup), time_progress)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.final_lr + (1 - config.final_lr) * cosine


def block_trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the embeddings (token and position tables) and the output head (shared or
    not): what ``params="blocks"`` trains.

    Example:
        >>> sum(p.numel() for p in block_trainable_parameters(model))
    """
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    frozen = {
        id(p) for mod in (*tables, model.get_output_embeddings()) if mod is not None for p in mod.parameters()
    }
    return [p for p in model.parameters() if id(p) not in frozen]


def _add_lora(model: nn.Module, config: HealConfig):
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise FFNKitError(
            "LoRA healing needs peft: pip install peft (or heal without lora: HealConfig(lora=False))"
        ) from None
    from ffnkit.core.layouts import layout_of

    targets = _linear_paths(model)
    if not targets:
        raise InvalidArgumentError(
            "LoRA healing found no FFN Linear to adapt (expert tensors and quantised matrices take no "
            "adapter): heal with lora=False, or heal before quantize_"
        )
    # GPT-2 stores W as [in, out]
    fan_in_fan_out = any(layout_of(model.get_submodule(t)).transposed for t in targets)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
    )
    return inject_adapter_in_model(lora, model)


def _remove_lora(model: nn.Module, merge: bool) -> None:
    """Put the base layers back in place of peft's LoRA wrappers, merging the adapters into the
    weights first when ``merge`` (the end of healing) and dropping them otherwise (a failed run)."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            if merge:
                mod.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.get_base_layer())


def heal_(
    model: nn.Module,
    reference: nn.Module,
    config: HealConfig | None = None,
    *,
    calibration: Tensor | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> HealReport:
    """Distil ``model`` towards ``reference`` (KL on logits), training only FFN parameters; in place.

    Stops after ``config.steps`` or ``config.max_minutes``, whichever comes first. Atomic: if training
    fails, the trained parameters get their old values back. Uses the threads torch is set to (the
    machine's cores by default); nothing else.

    Example:
        >>> report = heal_(model, reference, HealConfig(steps=100), tokenizer=tok)
        >>> report.stopped_by, len(report.loss_curve)
        ('steps', 100)
    """
    from tqdm.auto import tqdm

    config = config or HealConfig()
    start = time.perf_counter()
    ids = _calibration(config, calibration, tokenizer)
    device = next(model.parameters()).device
    reference.eval()
    requires = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    snapshot: list[tuple[nn.Parameter, Tensor]] = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(config.matmul_precision)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if config.lora:
            # the merge at the end writes into these: kept so that a failure anywhere undoes it
            snapshot = [(p, p.detach().clone()) for p in ffn_trainable_parameters(model)]
            _add_lora(model, config)
            params = [p for n, p in model.named_parameters() if "lora_" in n]
        else:
            params = (
                ffn_trainable_parameters(model)
                if config.params == "ffn"
                else block_trainable_parameters(model)
            )
            snapshot = [(p, p.detach().clone()) for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95)
        )
        model.eval()  # no dropout: the reference runs without it too
        gen = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(ids.shape[0], generator=gen)
        curve: list[float] = []
        stopped_by, tokens, cursor = "steps", 0, 0
        bar = tqdm(range(config.steps), desc="healing", disable=not progress)
        budget, step_s = 60 * config.max_minutes, 0.0
        hidden = config.hidden_weight > 0
        for step in bar:
            # stop before a step that would end past the budget (the slowest step so far as its estimate)
            if time.perf_counter() - start + step_s > budget:
                stopped_by = "time"
                break
            t_step = time.perf_counter()
            # the time progress counts the step about to run, so the last step runs at the final lr
            factor = _lr_factor(step, config, (t_step - start + step_s) / budget)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor
            pick = order[(cursor + torch.arange(config.batch_size)) % ids.shape[0]]
            cursor += config.batch_size
            batch = ids[pick].to(device)  # [B, T]
            with torch.no_grad():
                ref_out = forward(reference, batch, hidden_states=hidden)
            out = forward(model, batch, hidden_states=hidden)
            ref_logits, ref_states = ref_out.logits, layer_states(reference, ref_out)
            logits, states = out.logits, layer_states(model, out)
            kl = kl_to_reference(logits, ref_logits)
            loss = kl + config.hidden_weight * hidden_state_loss(states, ref_states) if hidden else kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            curve.append(float(kl.detach()))
            step_s = max(step_s, time.perf_counter() - t_step)
            tokens += batch.numel()
            bar.set_postfix(kl=f"{curve[-1]:.4f}")
        bar.close()
        if config.lora:
            _remove_lora(model, merge=True)
    except BaseException:
        with torch.no_grad():
            for p, old in snapshot:
                p.copy_(old)
        if config.lora and "peft" in sys.modules:
            _remove_lora(model, merge=False)  # drop the adapters; the weights are restored above
        raise
    finally:
        torch.set_float32_matmul_precision(precision)
        for p in model.parameters():
            p.grad = None  # free the gradients
            p.requires_grad_(requires.get(id(p), True))
        model.train(was_training)
    return HealReport(
        transform="heal",
        config=config.to_dict(),
        steps=len(curve),
        seconds=time.perf_counter() - start,
        stopped_by=stopped_by,
        trainable_parameters=sum(p.numel() for p in params),
        tokens_seen=tokens,
        loss_curve=curve,
    )
