"""W_out refit of a sparsified FFN: the kept neurons absorb, by least squares, what the zeroed ones added.

The masks of a sparsity rule drop small activations, and their sum is not zero: every layer's output moves
a little, and the errors compound over depth. With the masks fixed (the calibrated thresholds), the down
projection is refitted on calibration tokens so that the masked intermediate activations reproduce the
dense FFN's output, shrunk towards the dense W_out (:class:`ffnkit.core.lstsq.RidgeTowards`: the same
solver as the MoE conversion's routing-aware refit, with the sparsity masks in place of the router). The
bias is fitted too where the FFN has one.

The thresholds stay as calibrated: ``best``'s per-neuron scales ``c_mid`` were read off the dense W_out,
and the saved model keeps both, so the selection is exactly the one the refit saw. Measured on SmolLM2 at
50% of the weight bytes skipped (``benchmarks/sparsity_levers.py refit``): ×1.333 / ×1.225 dense
perplexity → ×1.185 / ×1.190 (Shakespeare / Austen) with ridge 3.0 on 16,384 tokens.

Example:
    >>> rows = refit_out_(module, ffn, x_calibration, ridge=3.0)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from ffnkit.core.ffn import FFN
from ffnkit.core.lstsq import RidgeTowards
from ffnkit.modules.sparse_ffn import SparseFFN

__all__ = ["refit_out_"]


@torch.no_grad()
def refit_out_(module: SparseFFN, ffn: FFN, x: Tensor, ridge: float, chunk: int = 2048) -> dict[str, float]:
    """Refit ``ffn``'s W_out (and b_out where it has one) in place for the masks of ``module`` (a
    :class:`SparseFFN` around ``ffn``'s container, thresholds set) on calibration FFN inputs ``x`` [n, d].

    Returns the relative squared output error on those tokens before and after:
    ``{"error_before", "error_after", "tokens"}``.

    Example:
        >>> refit_out_(module, ffn, cal.inputs[ffn.index], ridge=3.0)["error_after"]  # doctest: +SKIP
    """
    w_out = ffn.W_out  # [d, f], a view of the model's parameter
    d, f = w_out.shape
    free = 0 if ffn.b_out is None else 1
    fit = RidgeTowards(f + free, d, free=free, device=w_out.device)
    chunks = [part.to(device=w_out.device, dtype=w_out.dtype) for part in x.split(chunk)]
    dense_norm, before = 0.0, 0.0
    for part in chunks:
        y, _ = _run(module, part, masks=False)  # [c, d] the dense FFN's output
        y_masked, post = _run(module, part, masks=True)  # post [c, f]: the masked activations W_out reads
        fit.update(post if not free else torch.cat([post, post.new_ones(post.shape[0], 1)], dim=1), y)
        dense_norm += float(y.double().pow(2).sum())
        before += float((y_masked.double() - y.double()).pow(2).sum())
    prior = w_out.detach().T.double()  # [f, d]
    if free:
        prior = torch.cat([prior, ffn.b_out.detach().double()[None]], dim=0)  # [f + 1, d]
    sol = fit.solve(prior, ridge)  # [f (+1), d]
    w_out.copy_(sol[:f].T.to(w_out.dtype))
    if free:
        ffn.b_out.copy_(sol[f].to(ffn.b_out.dtype))
    # the error after, in a second pass (cheaper than keeping a copy of the [f, f] sums: 1.6 GB at d_ff
    # 14,336): the dense output from the dense activations and the old weights (the prior)
    after = 0.0
    for part in chunks:
        _, dense_post = _run(module, part, masks=False)
        y = dense_post.double() @ prior[:f] + (prior[f] if free else 0.0)  # [c, d]
        after += float((_run(module, part, masks=True)[0].double() - y).pow(2).sum())
    scale = max(dense_norm, 1e-30)
    return {"error_before": before / scale, "error_after": after / scale, "tokens": fit.tokens}


def _run(module: SparseFFN, x: Tensor, *, masks: bool) -> tuple[Tensor, Tensor]:
    """(output [c, d], the intermediate activations [c, f] its W_out read) of ``module`` on ``x``."""
    got: list[Tensor] = []
    hook = module.hook_post.register_forward_hook(lambda _m, _i, out: got.append(out))
    try:
        y = module.masked_forward(x, masks=masks)
    finally:
        hook.remove()
    return y, got[-1]
