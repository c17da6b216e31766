"""Which sublayers to remove first: FinerCut's greedy order, with suffix re-use (``sublayers.py`` applies it).

Each step zeroes every remaining candidate in turn (``ffnkit.inspect.importance``'s zeroing hooks),
measures the JS divergence of the next-token distributions from the unmodified model's, and removes
the candidate that changes them least. Trial forwards start at the candidate's block where a
self-check shows that re-running the blocks from captured inputs reproduces the logits.

Example:
    >>> finercut_order(model, batches, kind="ffn", steps=3)["order"][0]["name"]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.blocks import block_modules, sublayers
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.progress import ProgressLike, Stage
from ffnkit.core.runner import check_causal_lm, device_of, log_probs, to_log_probs
from ffnkit.modules.zero import ZeroAttention, ZeroFFN

__all__ = ["finercut_order"]


class _SuffixRunner:
    """Re-run only the blocks from layer l on, from block inputs captured under the current removals.

    A candidate in block l leaves blocks 0..l-1 unchanged, so FinerCut's trial forwards can start at
    block l (about half the work on average). Used only where a self-check shows that running every
    block from its captured input, then the final norm and the LM head, reproduces the model's logits.
    """

    def __init__(self, model: nn.Module) -> None:
        from ffnkit.core.archs import resolve_spec

        self.model = model
        self.blocks = block_modules(model)
        spec = resolve_spec(model)
        self.norm = None
        for name, mod in model.named_modules():
            if any(name == p or name.endswith("." + p) for p in spec.final_norm):
                self.norm = mod
                break
        self.head = model.get_output_embeddings()

    def capture(self, ids: Tensor) -> tuple[Tensor, list[tuple[tuple, dict]]]:
        """Full forward: (log-probs [b, T, V], every block's (args, kwargs))."""
        inputs: list[tuple[tuple, dict]] = [((), {})] * len(self.blocks)

        def pre(i: int):
            def hook(mod, args, kwargs):
                inputs[i] = (args, dict(kwargs))

            return hook

        handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            # no KV cache (runner.forward): a cache object in the captured kwargs would grow on every re-run
            logp = log_probs(self.model, ids)
        finally:
            for h in handles:
                h.remove()
        return logp, inputs

    def run_from(self, layer: int, inputs: list[tuple[tuple, dict]]) -> Tensor:
        """Log-probs [b, T, V] from block ``layer`` on (hooks on the model are active as usual)."""
        args, kwargs = inputs[layer]
        h = args[0] if args else kwargs["hidden_states"]  # [b, T, d]
        for j in range(layer, len(self.blocks)):
            args, kwargs = inputs[j]
            if args:
                out = self.blocks[j](h, *args[1:], **kwargs)
            else:
                out = self.blocks[j](*args, **{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
        if self.norm is not None:
            h = self.norm(h)
        return to_log_probs(self.head(h))

    def works(self, ids: Tensor) -> bool:
        if self.norm is None or self.head is None:
            return False
        try:
            logp, inputs = self.capture(ids)
            return bool(torch.allclose(self.run_from(0, inputs), logp, atol=1e-4, rtol=1e-4))
        except Exception:  # any layout this shortcut does not fit: use full forwards
            return False


def finercut_order(
    model: nn.Module,
    batches: Tensor,
    *,
    kind: str = "all",
    ffn_target: int | None = None,
    steps: int | None = None,
    batch_size: int = 4,
    progress: ProgressLike = False,
    on_step: Any = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """FinerCut's greedy order restricted to ``kind`` candidates, stopping after ``steps`` removals or
    once ``ffn_target`` FFN sublayers are removed. Reuses ``ffnkit.inspect.importance``'s candidates,
    zeroing hooks and JS divergence (its ``finercut`` scores every kind and a fixed number of steps).
    Trial forwards start at the candidate's block (the blocks before it are unchanged), where a
    self-check allows. ``on_step(result_so_far)`` is called after every step (to save partial orders);
    ``resume``: a partial result of the same call (same model and batches) to continue from.

    Example:
        >>> finercut_order(model, batches, kind="ffn", steps=3)["order"][0]["name"]
    """
    from ffnkit.core.runner import iter_batches
    from ffnkit.inspect.importance import js_divergence, remove_sublayers

    check_causal_lm(model, "FinerCut")
    cands = [c for c in sublayers(model) if kind == "all" or c.kind == kind]
    cands = [c for c in cands if not isinstance(c.module, ZeroAttention | ZeroFFN)]
    n_ffn = sum(c.kind == "ffn" for c in cands)
    if ffn_target is not None and not 0 <= ffn_target <= n_ffn:
        raise InvalidArgumentError(f"cannot remove {ffn_target} FFN sublayers: the model has {n_ffn}")
    limit = len(cands) if steps is None else int(steps)
    if not 0 <= limit <= len(cands):
        raise InvalidArgumentError(f"steps must be in 0..{len(cands)} (the candidates), got {steps}")
    device = device_of(model)
    chunks = [ids.to(device) for _, ids in iter_batches(batches, batch_size)]
    order: list[dict[str, Any]] = []
    result = {
        "method": "finercut",
        "metric": "mean over tokens of JS(original, pruned) next-token distributions, nats",
        "kind": kind,
        "n_candidates": len(cands),
        "calibration": {"samples": int(batches.shape[0]), "seq_len": int(batches.shape[1])},
        "order": order,
    }
    with torch.no_grad():
        reference = [log_probs(model, ids) for ids in chunks]  # [b, T, V] each
        runner = _SuffixRunner(model)
        fast = runner.works(chunks[0][:1]) if chunks else False
        result["suffix_reuse"] = fast

        removed: list = []
        if resume is not None:  # the greedy order is deterministic: continue an earlier prefix
            by_name = {c.name: c for c in cands}
            for r in resume["order"]:
                if r["name"] not in by_name:
                    raise InvalidArgumentError(f"cannot resume: {r['name']} is not a candidate of this model")
                removed.append(by_name[r["name"]])
                order.append(dict(r))
        stage = Stage(progress, "finercut", unit="trial")
        while len(removed) < limit:
            if ffn_target is not None and sum(c.kind == "ffn" for c in removed) >= ffn_target:
                break
            left = [c for c in cands if c not in removed]
            with remove_sublayers(model, removed):
                inputs = [runner.capture(ids)[1] for ids in chunks] if fast else None
            trials = []
            for c in left:
                total, count = 0.0, 0
                with remove_sublayers(model, [*removed, c]):
                    for k, (ids, ref) in enumerate(zip(chunks, reference, strict=True)):
                        logq = runner.run_from(c.layer, inputs[k]) if fast else log_probs(model, ids)
                        js = js_divergence(ref, logq)  # [b, T]
                        total += float(js.double().sum())
                        count += js.numel()
                trials.append(total / count)
                stage.advance()
            best = min(range(len(left)), key=lambda i: trials[i])  # first minimum: deterministic
            removed.append(left[best])
            order.append({"step": len(removed), **left[best].to_dict(), "js": trials[best]})
            if on_step is not None:
                on_step(result)
        stage.close()
    return result
