"""The threshold rules: each calibrates per-layer thresholds to a model-wide share of FFN weight bytes skipped.

- :func:`calibrate_teal` (TEAL): |x| at the inputs of gate/up (site ``in``) and of down (site ``post``);
  thresholds are quantiles of the calibration activations; ``greedy`` splits each layer's target between
  the two sites by the least FFN output error per byte (TEAL's block-wise greedy), every layer the same.
- :func:`calibrate_best`: TEAL on weight-scaled magnitudes |x_j|·‖W[:, j]‖ (a small input that meets a
  large weight column is kept; per-channel thresholds folded into the kernels' weights), with the share of
  each layer set by its measured sensitivity: each layer is sparsified alone and the KL divergence of the
  logits from the dense model, per unit of that layer's output error, weights a greedy allocation of the
  model-wide byte budget over layers and sites.
- :func:`calibrate_cats` (CATS): |act(W_gate x)| > t, t a per-layer quantile.
- :func:`calibrate_chess` (CHESS): |act(gate_i)|·E|up_i| > τ, channel-wise thresholds t_i = τ / E|up_i|.
- :func:`calibrate_stat_topk` (Spark-style): keep v_i = |act(g_i)| ≥ mean(v) + z·std(v) per token;
  z calibrated so the share kept matches the target (no sort at run time).

Example:
    >>> plans = calibrate_teal(cal, SparsityConfig("teal", 0.4))
    >>> round(sum(p.bytes_skipped for p in plans) / len(plans), 2)
    0.4
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.sparsity.calibrate import (
    Calibration,
    LayerPlan,
    bytes_skipped,
    installed,
    max_skippable,
    quantile,
    site_weights,
)
from ffnkit.sparsity.config import SparsityConfig

__all__ = [
    "calibrate_best",
    "calibrate_cats",
    "calibrate_chess",
    "calibrate_stat_topk",
    "calibrate_teal",
    "input_path",
    "weight_scales",
]

PROBE_LEVEL = 0.5  # bytes skipped by one layer alone when its sensitivity is measured
Point = tuple[float, float, float, float]  # (bytes skipped, relative output error, s_in, s_mid)


def _size(cal: Calibration, index: int) -> float:
    """Weight bytes of an FFN in units of d·f (3 for gated, 2 for plain)."""
    m = cal.module(index, "input")
    return 3.0 if m.spec.gated else 2.0


def check_reachable(cal: Calibration, config: SparsityConfig) -> None:
    """One-line error when the rule cannot skip ``config.sparsity`` of the chosen FFNs' bytes."""
    for f in cal.ffns:
        gated = f.kind == "gated"
        top = max_skippable(config.mode, gated)
        if config.mode == "predictor":
            top = 0.95
        if config.sparsity > top - 1e-9:
            raise InvalidArgumentError(
                f"rule {config.rule!r} can skip at most {top:.0%} of the weight bytes of {f.name} (the gate "
                f"is always read): choose --sparsity below {top:.2f}, or rule teal or best"
            )


# ----- TEAL-style input sparsity ------------------------------------------------------------------
def weight_scales(cal: Calibration, index: int) -> tuple[Tensor, Tensor]:
    """Per-channel scales (c_in [d], c_mid [f]): the norms of the weight columns each activation multiplies
    (gate and up together for x; down for h), normalised to mean 1.

    Example:
        >>> c_in, c_mid = weight_scales(cal, 0)
    """
    key = ("scales", index)
    if key not in cal.cache:
        ffn = next(f for f in cal.ffns if f.index == index)
        with torch.no_grad():
            w_in = ffn.W_in.detach().float()  # [f, d]
            sq = w_in.pow(2).sum(0)  # [d]
            if ffn.W_gate is not None:
                sq = sq + ffn.W_gate.detach().float().pow(2).sum(0)
            c_in = sq.sqrt()
            c_mid = ffn.W_out.detach().float().norm(dim=0)  # [f]
        cal.cache[key] = (c_in / c_in.mean(), c_mid / c_mid.mean())
    return cal.cache[key]


class _InputLayer:
    """One FFN's TEAL-style masked computation on calibration inputs, from its canonical weights (float32):
    thresholds from quantiles and the relative output error, with the intermediate h cached per s_in."""

    def __init__(self, cal: Calibration, index: int, scaled: bool, tokens: int | None) -> None:
        ffn = next(f for f in cal.ffns if f.index == index)
        with torch.no_grad():
            self.x = cal.inputs[index][:tokens].float()  # [N, d]
            self.wu, self.wd = ffn.W_in.detach().float(), ffn.W_out.detach().float()  # [f, d], [d, f]
            self.wg = ffn.W_gate.detach().float() if ffn.W_gate is not None else None
            self.b_in, self.b_gate, self.b_out = (
                b.detach().float() if b is not None else None for b in (ffn.b_in, ffn.b_gate, ffn.b_out)
            )
            self.act = ffn.act_fn
            d, f = self.wu.shape[1], self.wu.shape[0]
            ones = dict(device=self.x.device)  # the inputs' device (cuda in a GPU calibration)
            self.c_in, self.c_mid = (
                weight_scales(cal, index) if scaled else (torch.ones(d, **ones), torch.ones(f, **ones))
            )
            self.x_score = (self.x * self.c_in).abs()  # [N, d]
        self._y: Tensor | None = None  # the dense output, computed when an error is first asked for
        self._posts: dict[float, tuple[float, Tensor]] = {}

    @property
    def y(self) -> Tensor:
        if self._y is None:
            with torch.no_grad():
                self._y = self._out(self.post(0.0)[1])  # [N, d] dense
                self.y_sq = float(self._y.pow(2).sum().clamp_min(1e-30))
        return self._y

    def post(self, s_in: float) -> tuple[float, Tensor]:
        """(t_in, h [N, f]) with the share s_in of inputs zeroed."""
        t_in = quantile(self.x_score, s_in) if s_in > 0 else 0.0
        x = torch.where(self.x_score >= t_in, self.x, torch.zeros_like(self.x)) if t_in > 0 else self.x
        u = x @ self.wu.T + (self.b_in if self.b_in is not None else 0)  # [N, f]
        if self.wg is None:
            return t_in, self.act(u)
        g = x @ self.wg.T + (self.b_gate if self.b_gate is not None else 0)
        return t_in, self.act(g) * u

    def _out(self, h: Tensor) -> Tensor:
        return h @ self.wd.T + (self.b_out if self.b_out is not None else 0)

    def thresholds(self, s_in: float, s_mid: float) -> tuple[float, float]:
        """(t_in, t_mid) at the shares (s_in, s_mid), without the output error."""
        with torch.no_grad():
            t_in, h = self.post(s_in)
            return t_in, quantile((h * self.c_mid).abs(), s_mid) if s_mid > 0 else 0.0

    def evaluate(self, s_in: float, s_mid: float) -> tuple[float, float, float]:
        """(relative output error, t_in, t_mid) at the shares (s_in, s_mid)."""
        y = self.y
        with torch.no_grad():
            key = round(s_in, 9)
            if key not in self._posts:
                if len(self._posts) > 2:
                    self._posts.pop(next(iter(self._posts)))
                self._posts[key] = self.post(s_in)
            t_in, h = self._posts[key]
            h_score = (h * self.c_mid).abs()
            t_mid = quantile(h_score, s_mid) if s_mid > 0 else 0.0
            if t_mid > 0:
                h = torch.where(h_score >= t_mid, h, torch.zeros_like(h))
            err = float((self._out(h) - y).pow(2).sum()) / self.y_sq
        return err, t_in, t_mid


def _layer(cal: Calibration, index: int, scaled: bool, tokens: int | None) -> _InputLayer:
    key = ("input_layer", index, scaled, tokens)
    if key not in cal.cache:
        if tokens is None:  # the full set is used once per plan: do not keep it
            return _InputLayer(cal, index, scaled, tokens)
        cal.cache[key] = _InputLayer(cal, index, scaled, tokens)
    return cal.cache[key]


def _plan_input(
    cal: Calibration, index: int, s_in: float, s_mid: float, scaled: bool, tokens: int | None = None
) -> LayerPlan:
    layer = _layer(cal, index, scaled, tokens)
    t_in, t_mid = layer.thresholds(s_in, s_mid)
    gated = layer.wg is not None
    return LayerPlan(
        index,
        t_in,
        t_mid,
        layer.c_in if scaled else None,
        layer.c_mid if scaled else None,
        site_sparsity={"in": s_in, "post": s_mid},
        bytes_skipped=bytes_skipped("input", gated, s_in, s_mid),
    )


def input_path(
    cal: Calibration, index: int, config: SparsityConfig, scaled: bool, upto: float
) -> list[Point]:
    """The greedy path of one FFN: from dense, repeatedly raise the site (input or intermediate) whose next
    ``config.step`` costs the least output error per byte skipped, until ``upto`` bytes are skipped.
    Extended (and cached in ``cal``) as later calls ask for more.

    Example:
        >>> input_path(cal, 0, config, scaled=False, upto=0.5)[-1][0] >= 0.5
        True
    """
    key = (index, scaled, config.step, config.path_tokens)
    pts: list[Point] = cal.paths.setdefault(key, [(0.0, 0.0, 0.0, 0.0)])
    layer = _layer(cal, index, scaled, config.path_tokens)
    gated = layer.wg is not None
    while pts[-1][0] < upto - 1e-9:
        b, err, s_in, s_mid = pts[-1]
        best: tuple[float, Point] | None = None
        for site in (0, 1):
            s = [s_in, s_mid]
            s[site] = min(s[site] + config.step, 0.99)
            if s[site] <= [s_in, s_mid][site] + 1e-12:
                continue
            e, _, _ = layer.evaluate(s[0], s[1])
            nb = bytes_skipped("input", gated, s[0], s[1])
            slope = (e - err) / max(nb - b, 1e-12)
            if best is None or slope < best[0]:
                best = (slope, (nb, e, s[0], s[1]))
        if best is None:
            break
        pts.append(best[1])
    return pts


def _interpolate(pts: list[Point], target: float) -> tuple[float, float]:
    """(s_in, s_mid) on the path where it skips ``target`` bytes (linear between two path points)."""
    if target <= 0:
        return 0.0, 0.0
    for k in range(1, len(pts)):
        if pts[k][0] >= target - 1e-12:
            b0, _, i0, m0 = pts[k - 1]
            b1, _, i1, m1 = pts[k]
            frac = (target - b0) / max(b1 - b0, 1e-12)
            return i0 + frac * (i1 - i0), m0 + frac * (m1 - m0)
    raise InvalidArgumentError(
        f"the greedy path stops at {pts[-1][0]:.0%} of bytes skipped, below {target:.0%}"
    )


def _input_rule(cal: Calibration, config: SparsityConfig, scaled: bool) -> list[LayerPlan]:
    s = config.sparsity
    plans = []
    for f in cal.ffns:
        if config.allocation == "uniform" or s == 0:
            s_in = s_mid = s / sum(site_weights(f.kind == "gated"))
        else:
            s_in, s_mid = _interpolate(input_path(cal, f.index, config, scaled, s), s)
        plans.append(_plan_input(cal, f.index, s_in, s_mid, scaled))
    return plans


def calibrate_teal(cal: Calibration, config: SparsityConfig) -> list[LayerPlan]:
    """TEAL: magnitude thresholds at the inputs of gate/up and down (see the module doc).

    Example:
        >>> plans = calibrate_teal(cal, SparsityConfig("teal", 0.5))
    """
    check_reachable(cal, config)
    if config.allocation == "sensitivity":
        return _sensitivity_rule(cal, config, scaled=False)
    return _input_rule(cal, config, scaled=False)


def calibrate_best(cal: Calibration, config: SparsityConfig) -> list[LayerPlan]:
    """``best``: weight-scaled TEAL thresholds, layers and sites allocated by measured sensitivity.

    Example:
        >>> plans = calibrate_best(cal, SparsityConfig("best", 0.5))
    """
    check_reachable(cal, config)
    if config.allocation == "sensitivity" and config.sparsity > 0:
        return _sensitivity_rule(cal, config, scaled=True)
    return _input_rule(cal, config, scaled=True)


# ----- sensitivity allocation ---------------------------------------------------------------------
def _probe_kl(cal: Calibration, config: SparsityConfig, plans: dict[int, LayerPlan]) -> dict[int, float]:
    """Mean KL(dense ‖ sparse) of the next-token distributions when each FFN alone takes its plan."""
    ids = cal.ids[: config.probe_windows, : config.probe_tokens]
    model = cal.model
    device = next(model.parameters()).device
    key = ("dense_logprobs", ids.shape[0])
    with torch.no_grad():
        if key not in cal.cache:
            cal.cache[key] = torch.log_softmax(model(input_ids=ids.to(device)).logits.float(), -1).half()
        dense = cal.cache[key].float()  # [n, T, V]
        mods = {f.index: cal.module(f.index, "input") for f in cal.ffns}
        out = {}
        with installed(model, [(f, mods[f.index]) for f in cal.ffns]):
            for m in mods.values():
                m.enabled = False
            try:
                for f in cal.ffns:
                    mods[f.index].enabled = True
                    plans[f.index].apply(mods[f.index])
                    lp = torch.log_softmax(model(input_ids=ids.to(device)).logits.float(), -1)
                    out[f.index] = float((dense.exp() * (dense - lp)).sum(-1).mean())
                    mods[f.index].enabled = False
            finally:
                for m in mods.values():
                    m.enabled = True
    return out


def _sensitivity_rule(cal: Calibration, config: SparsityConfig, scaled: bool) -> list[LayerPlan]:
    s = config.sparsity
    cap = min(0.95, s + 0.3)
    paths = {f.index: input_path(cal, f.index, config, scaled, cap) for f in cal.ffns}
    # one probe level for every target (the KL per unit of output error varies little with the level)
    level = PROBE_LEVEL
    key = (
        "sensitivity",
        scaled,
        level,
        config.step,
        config.path_tokens,
        config.probe_windows,
        config.probe_tokens,
    )
    if key not in cal.cache:
        probe_paths = {f.index: input_path(cal, f.index, config, scaled, level) for f in cal.ffns}
        probe, errors = {}, {}
        for f in cal.ffns:
            s_in, s_mid = _interpolate(probe_paths[f.index], level)
            probe[f.index] = _plan_input(cal, f.index, s_in, s_mid, scaled, config.path_tokens)
            errors[f.index] = _layer(cal, f.index, scaled, config.path_tokens).evaluate(s_in, s_mid)[0]
        kl = _probe_kl(cal, config, probe)
        weights = {i: max(kl[i], 1e-9) / max(errors[i], 1e-9) for i in kl}
        cal.cache[key] = (weights, kl)
    weights, _ = cal.cache[key]
    targets = _allocate(paths, weights, {f.index: _size(cal, f.index) for f in cal.ffns}, s)
    return [_plan_input(cal, i, *_interpolate(paths[i], targets[i]), scaled) for i in targets]


def _allocate(
    paths: dict[int, list[Point]], weights: dict[int, float], sizes: dict[int, float], target: float
) -> dict[int, float]:
    """Per-layer bytes skipped: greedy over the layers' paths by least weighted error per byte, until the
    byte-weighted mean reaches ``target`` (the last step taken only in part)."""
    total = sum(sizes.values())
    need = target * total
    ptr = {i: 0 for i in paths}
    at = {i: 0.0 for i in paths}

    def slope(i: int) -> float:
        (b0, e0, *_), (b1, e1, *_) = paths[i][ptr[i]], paths[i][ptr[i] + 1]
        return weights[i] * (e1 - e0) / max(b1 - b0, 1e-12)

    heap = [(slope(i), i) for i in paths if len(paths[i]) > 1]
    heapq.heapify(heap)
    got = 0.0
    while got < need - 1e-12:
        if not heap:
            raise InvalidArgumentError(f"the layers' greedy paths cannot reach {target:.0%} of bytes skipped")
        _, i = heapq.heappop(heap)
        b0, b1 = paths[i][ptr[i]][0], paths[i][ptr[i] + 1][0]
        gain = (b1 - b0) * sizes[i]
        if got + gain >= need:
            at[i] = b0 + (need - got) / sizes[i]
            got = need
            break
        got += gain
        ptr[i] += 1
        at[i] = b1
        if ptr[i] + 1 < len(paths[i]):
            heapq.heappush(heap, (slope(i), i))
    return at


# ----- neuron rules (the gate is read in full) ----------------------------------------------------
def _neuron_share(cal: Calibration, config: SparsityConfig, index: int) -> float:
    gated = cal.module(index, "input").spec.gated
    top = max_skippable(config.mode, gated)
    return config.sparsity / top  # bytes = top * share of zeroed neurons


def _neuron_plan(
    index: int, mode: str, gated: bool, t: float, q: float, c_mid: Tensor | None = None
) -> LayerPlan:
    return LayerPlan(
        index,
        0.0,
        t,
        None,
        c_mid,
        site_sparsity={"post": q},
        bytes_skipped=bytes_skipped(mode, gated, 0.0, q),
    )


def calibrate_cats(cal: Calibration, config: SparsityConfig) -> list[LayerPlan]:
    """CATS: t = the per-layer quantile of |act(W_gate x)| at the share of neurons to zero.

    Example:
        >>> calibrate_cats(cal, SparsityConfig("cats", 0.4))[0].site_sparsity["post"]
        0.6
    """
    check_reachable(cal, config)
    plans = []
    for f in cal.ffns:
        module = cal.module(f.index, "gate")
        q = _neuron_share(cal, config, f.index)
        a = module.activation(cal.sites(module, cal.x(f.index), ["gate"], masks=False)["gate"]).abs()
        t = quantile(a, q) if q > 0 else 0.0
        plans.append(_neuron_plan(f.index, "gate", True, t, q))
    return plans


def calibrate_chess(cal: Calibration, config: SparsityConfig) -> list[LayerPlan]:
    """CHESS: keep |act(gate_i)|·E|up_i| > τ (channel-wise thresholds), τ a per-layer quantile.

    Example:
        >>> calibrate_chess(cal, SparsityConfig("chess", 0.4))[0].c_mid.shape
        torch.Size([1536])
    """
    check_reachable(cal, config)
    plans = []
    for f in cal.ffns:
        module = cal.module(f.index, "gate")
        q = _neuron_share(cal, config, f.index)
        got = cal.sites(module, cal.x(f.index), ["gate", "pre"], masks=False)
        c_mid = got["pre"].abs().mean(0).clamp_min(1e-12)  # [f]: E|up_i|
        score = module.activation(got["gate"]).abs() * c_mid
        t = quantile(score, q) if q > 0 else 0.0
        plans.append(_neuron_plan(f.index, "gate", True, t, q, c_mid.cpu()))
    return plans


def calibrate_stat_topk(cal: Calibration, config: SparsityConfig) -> list[LayerPlan]:
    """Spark-style statistical top-k: z such that v ≥ mean(v) + z·std(v), v = |act(g)|, keeps the wanted
    share per token (the statistic of the activation magnitude: see :mod:`ffnkit.modules.sparse_ffn`).

    Example:
        >>> calibrate_stat_topk(cal, SparsityConfig("stat-topk", 0.4))[0].t_mid
    """
    check_reachable(cal, config)
    plans = []
    for f in cal.ffns:
        module = cal.module(f.index, "stat")
        gated = module.spec.gated
        q = _neuron_share(cal, config, f.index)
        site = "gate" if gated else "pre"
        g = cal.sites(module, cal.x(f.index), [site], masks=False)[site]  # [N, f]
        v = module.activation(g.float()).abs()  # [N, f]
        z = (v - v.mean(-1, keepdim=True)) / v.std(-1, keepdim=True).clamp_min(1e-12)
        t = quantile(z, q) if q > 0 else float("-inf")
        plans.append(_neuron_plan(f.index, "stat", gated, t, q))
    return plans
