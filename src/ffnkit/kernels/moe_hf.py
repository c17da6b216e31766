"""Run the experts of Hugging Face MoE models (mixtral, qwen2_moe, qwen3_moe, olmoe...) on ffnkit's executor.

transformers v5 stores experts as 3-D tensors in classes decorated with ``use_experts_implementation``;
their forward looks up ``config._experts_implementation`` in ``transformers.integrations.moe``'s
``ALL_EXPERTS_FUNCTIONS``. :func:`use_fast_experts` registers an ``"ffnkit"`` entry there (once) that calls
:func:`ffnkit.kernels.moe.experts_forward`, switches the model's experts to it, and returns a handle whose
:meth:`FastExperts.restore` (or the end of a ``with`` block) puts back what was there. Nothing is copied:
the kernels read the model's own ``gate_up_proj`` / ``down_proj``.

The kernels have no backward: while autograd records (``torch.is_grad_enabled()`` and a weight or the
input requires grad) the module's own eager forward runs instead, so training is unchanged.

Example:
    >>> import torch, transformers  # doctest: +SKIP
    >>> cfg = transformers.OlmoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=128)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    >>> with use_fast_experts(model, backend="auto"), torch.no_grad():
    ...     logits = model(torch.tensor([[1, 2, 3]])).logits
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ffnkit.core.errors import InvalidArgumentError, UnsupportedArchitectureError
from ffnkit.kernels.backend import check_backend_name
from ffnkit.kernels.moe import experts_forward
from ffnkit.kernels.sparse_ffn import kernel_activation

IMPLEMENTATION = "ffnkit"
BACKEND_ATTR = "ffnkit_backend"  # set on each switched experts module; read by hf_experts_forward


def hf_experts_forward(
    module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The ``"ffnkit"`` entry of transformers' experts interface: ``module``'s experts on ffnkit's executor.

    Example:
        >>> hf_experts_forward(experts, h, idx, w)  # doctest: +SKIP
    """
    needs_grad = torch.is_grad_enabled() and (
        hidden_states.requires_grad or module.gate_up_proj.requires_grad or module.down_proj.requires_grad
    )
    if needs_grad:
        eager = getattr(type(module).forward, "__wrapped__", None)
        if eager is None:
            raise InvalidArgumentError(
                "ffnkit's fast experts have no backward: run under torch.no_grad() or call restore() first"
            )
        return eager(module, hidden_states, top_k_index, top_k_weights)
    act = kernel_activation(getattr(module.config, "hidden_act", "silu"))
    backend = getattr(module, BACKEND_ATTR, None)
    x = hidden_states.to(module.gate_up_proj.dtype)
    y = experts_forward(
        x, module.gate_up_proj, module.down_proj, top_k_index, top_k_weights, act, backend=backend
    )
    return y.to(hidden_states.dtype)


def _register() -> None:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as err:  # transformers < 5 has no experts interface
        raise UnsupportedArchitectureError(
            "use_fast_experts needs transformers >= 5 (its experts interface): pip install -U transformers"
        ) from err
    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, hf_experts_forward)


def _is_hf_experts(module: nn.Module) -> bool:
    gu = getattr(module, "gate_up_proj", None)
    return (
        isinstance(gu, Tensor)
        and gu.dim() == 3
        and isinstance(getattr(module, "down_proj", None), Tensor)
        and hasattr(module, "is_transposed")  # set by transformers' use_experts_implementation
        and hasattr(module, "config")
    )


def _check_layout(name: str, module: nn.Module) -> None:
    bad = [
        what
        for what, ok in (
            ("transposed weights", not module.is_transposed),
            ("biases", not getattr(module, "has_bias", False)),
            ("no gate", getattr(module, "has_gate", True)),
            ("interleaved gate/up", getattr(module, "is_concatenated", True)),
            ("a post-expert norm", not getattr(module, "has_post_expert_norm", False)),
            (
                "a custom gate",
                getattr(getattr(type(module), "_apply_gate", None), "__name__", "")
                in ("", "_default_apply_gate"),
            ),
        )
        if not ok
    ]
    if bad:
        raise UnsupportedArchitectureError(
            f"experts {name!r} ({type(module).__name__}) have {', '.join(bad)}: ffnkit's kernels take the "
            "[E, 2F, D] gate-then-up layout without bias; keep transformers' implementation for this model"
        )


@dataclass
class FastExperts:
    """What :func:`use_fast_experts` switched: call :meth:`restore` (or leave the ``with`` block) to undo.

    Example:
        >>> handle = use_fast_experts(model)  # doctest: +SKIP
        >>> handle.restore()  # doctest: +SKIP
    """

    modules: list[str]
    backend: str
    _configs: list[tuple[object, object]] = field(default_factory=list, repr=False)
    _switched: list[nn.Module] = field(default_factory=list, repr=False)

    def restore(self) -> None:
        """Put back every config's previous experts implementation and drop the backend attribute.

        Example:
            >>> handle.restore()  # doctest: +SKIP
        """
        for cfg, previous in reversed(self._configs):
            cfg._experts_implementation = previous
        for m in self._switched:
            if hasattr(m, BACKEND_ATTR):
                delattr(m, BACKEND_ATTR)
        self._configs.clear()
        self._switched.clear()

    def __enter__(self) -> FastExperts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def use_fast_experts(model: nn.Module, backend: str = "auto") -> FastExperts:
    """Run every experts module of a transformers v5 MoE model on :func:`ffnkit.kernels.moe.experts_forward`.

    ``backend``: ``auto`` (Triton on CUDA, the CPU path on CPU), ``triton``, ``cpu`` or ``reference``.
    Reversible: the returned handle's ``restore()`` (or a ``with`` block) puts back the previous
    implementation. A model without such experts, or with a layout the kernels don't take (biases,
    transposed or interleaved weights), is a one-line error and nothing is changed.

    Example:
        >>> with use_fast_experts(model, backend="auto"), torch.no_grad():  # doctest: +SKIP
        ...     out = model.generate(ids, max_new_tokens=8)
    """
    backend = check_backend_name(backend)
    found = [(name, m) for name, m in model.named_modules() if _is_hf_experts(m)]
    if not found:
        raise UnsupportedArchitectureError(
            f"no transformers v5 experts module in {type(model).__name__}: use_fast_experts needs an MoE model "
            "whose experts use transformers' experts interface (mixtral, qwen2_moe, qwen3_moe, olmoe, ...)"
        )
    for name, m in found:
        _check_layout(name, m)
        kernel_activation(getattr(m.config, "hidden_act", "silu"))  # an unknown activation fails here
    _register()
    handle = FastExperts(modules=[n for n, _ in found], backend=backend)
    seen: set[int] = set()
    for _, m in found:
        if id(m.config) not in seen:
            seen.add(id(m.config))
            handle._configs.append((m.config, m.config._experts_implementation))
            m.config._experts_implementation = IMPLEMENTATION
        setattr(m, BACKEND_ATTR, backend)
        handle._switched.append(m)
    return handle


__all__ = ["FastExperts", "IMPLEMENTATION", "hf_experts_forward", "use_fast_experts"]
