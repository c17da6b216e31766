"""Routers for converted FFNs: centroid similarity, or a small MLP trained on calibration activations.

- ``centroid``: expert e's score is x · c_e with c_e the mean key of its neurons (the mean row of W_gate
  for gated FFNs, of W_in otherwise): the mean pre-activation of the expert's neurons (Avg-K, 2305.13999).
  No data needed.
- ``mlp``: MoEfication's router, Linear(d → h) · tanh · Linear(h → E), trained to predict each expert's
  share of a per-token importance (``ROUTER_TARGETS``): ``mass`` = Σ_{i∈e} |m_i| (the activation mass),
  or ``norm`` = ‖W_out[:, e] m_e‖ (the norm of the expert's output: what leaving it out costs), normalised
  over experts; the loss is the cross-entropy between that share and softmax(router(x)) (Adam with a
  cosine schedule, minibatches, float32, on the inputs' device). The inputs are the FFN inputs of the
  dense model on calibration text.

Both route by "ones" weighting (:class:`~ffnkit.modules.moe.MoERouter`): the chosen experts add their
whole output, as in the dense FFN, so with every expert chosen the block equals the dense FFN.

Example:
    >>> mass = expert_mass(ffn, x, split)                      # [N, E]
    >>> state, info = train_mlp_router(x, mass, hidden=128)
    >>> info["loss"][-1] < info["loss"][0]
    True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ffnkit.core.ffn import FFN
from ffnkit.moe.cluster import Split

__all__ = [
    "ROUTERS",
    "ROUTER_TARGETS",
    "centroid_weight",
    "expert_importance",
    "expert_mass",
    "expert_output_norm",
    "mass_recall",
    "train_mlp_router",
]

ROUTERS = ("mlp", "centroid")
ROUTER_TARGETS = ("mass", "norm")


def centroid_weight(ffn: FFN, split: Split) -> Tensor:
    """The centroid router's weight [E, d]: the mean key of each expert's neurons.

    Example:
        >>> centroid_weight(ffn, split).shape     # [16, 576]
    """
    keys = (ffn.W_gate if ffn.W_gate is not None else ffn.W_in).detach().float()  # [n, d]
    return keys[split.groups.to(keys.device)].mean(dim=1)  # [E, f, d] -> [E, d]


@torch.no_grad()
def expert_mass(ffn: FFN, x: Tensor, split: Split, *, chunk: int = 4096) -> Tensor:
    """Σ_{i∈e} |m_i| per token and expert: x [N, d] -> [N, E] (float32).

    Example:
        >>> expert_mass(ffn, x, split).shape
        torch.Size([8192, 16])
    """
    groups = split.groups.to(x.device)
    out = []
    for part in x.split(chunk):
        m = ffn.activations(part.to(ffn.W_in.dtype))["post"].abs().float()  # [n_part, d_ff]
        out.append(m[:, groups].sum(-1))  # [n_part, E, f] -> [n_part, E]
    return torch.cat(out)


@torch.no_grad()
def expert_output_norm(ffn: FFN, x: Tensor, split: Split, *, chunk: int = 1024) -> Tensor:
    """‖W_out[:, e] m_e‖ per token and expert (the norm of what each expert adds): x [N, d] -> [N, E].

    Example:
        >>> expert_output_norm(ffn, x, split).shape
        torch.Size([8192, 16])
    """
    groups = split.groups.to(x.device)
    w_out = ffn.W_out.detach()[:, groups].float()  # [d, E, f]
    out = []
    for part in x.split(chunk):
        m = ffn.activations(part.to(ffn.W_in.dtype))["post"].float()[:, groups]  # [n, E, f]
        out.append(torch.einsum("nef,def->ned", m, w_out).norm(dim=-1))  # [n, E, d] -> [n, E]
    return torch.cat(out)


def expert_importance(ffn: FFN, x: Tensor, split: Split, target: str = "mass") -> Tensor:
    """The per-token importance of each expert the MLP router learns: ``mass`` or ``norm`` -> [N, E].

    Example:
        >>> expert_importance(ffn, x, split, "norm").shape
        torch.Size([8192, 16])
    """
    if target == "mass":
        return expert_mass(ffn, x, split)
    if target == "norm":
        return expert_output_norm(ffn, x, split)
    raise ValueError(f"unknown router target {target!r}; use one of {', '.join(ROUTER_TARGETS)}")


def train_mlp_router(
    x: Tensor,
    mass: Tensor,
    *,
    hidden: int = 128,
    steps: int = 300,
    lr: float = 3e-3,
    batch: int = 1024,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict]:
    """Fit Linear(d → hidden) · tanh · Linear(hidden → E) so that softmax(router(x)) ≈ mass / Σ mass.

    Returns the state dict (``fc1.weight`` ...) in float32 and ``{"loss": [first, last]}`` (the
    cross-entropy minus the target's entropy: the KL divergence, 0 = perfect).

    Example:
        >>> state, info = train_mlp_router(torch.randn(512, 8), torch.rand(512, 4), hidden=16, steps=50)
        >>> state["fc2.weight"].shape
        torch.Size([4, 16])
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = x.device
    x = x.detach().float()
    target = mass.detach().float().to(device)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)  # [N, E]
    entropy = -(target * target.clamp_min(1e-12).log()).sum(-1)  # [N]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, target.shape[1])).to(
        device
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xs = (x - mean) / std  # standardised inputs train faster; folded into fc1 below
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=g).to(device)
            logp = torch.log_softmax(net(xs[idx]), dim=-1)
            loss = -(target[idx] * logp).sum(-1).mean() - entropy[idx].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
    with torch.no_grad():
        w1 = net[0].weight / std  # fc1((x - mean) / std) = (W1 / std) x + (b1 - (W1 / std) mean)
        state = {
            "fc1.weight": w1.cpu(),
            "fc1.bias": (net[0].bias - w1 @ mean).cpu(),
            "fc2.weight": net[2].weight.detach().cpu().clone(),
            "fc2.bias": net[2].bias.detach().cpu().clone(),
        }
    return state, {"loss": [float(losses[0]), float(losses[-1])], "steps": steps}


def mass_recall(scores: Tensor, mass: Tensor, k: int) -> dict[str, float]:
    """Share of the activation mass in the k experts the scores choose (``router``), in the best k
    (``oracle``), and the share of the best k that the scores choose (``overlap``, the top-k recall).

    Example:
        >>> mass_recall(torch.randn(100, 8), torch.rand(100, 8), 4)["oracle"] >= 0.5
        True
    """
    total = mass.sum(-1).clamp_min(1e-12)  # [N]
    chosen = mass.gather(1, scores.topk(k, dim=-1).indices).sum(-1) / total
    top = mass.topk(k, dim=-1)
    best = top.values.sum(-1) / total
    picked = torch.zeros_like(mass, dtype=torch.bool).scatter_(1, scores.topk(k, dim=-1).indices, True)
    overlap = picked.gather(1, top.indices).float().mean(-1)  # [N]
    return {"router": float(chosen.mean()), "oracle": float(best.mean()), "overlap": float(overlap.mean())}
