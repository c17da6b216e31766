"""The protocol of ffnkit's runtime modules: what every module that a transform puts into a model offers.

A runtime module (:class:`RuntimeModule`) is an ``nn.Module`` that replaces part of a model (a
low-rank or quantised matrix, a removed sublayer; later sparse FFNs and MoE blocks) and says:

- **stored size**: :meth:`~RuntimeModule.stored_numel` counts the weights it stands for (its parameters
  plus :meth:`~RuntimeModule.packed_numel`, the values packed into buffers, counted as the values they
  stand for), :meth:`~RuntimeModule.stored_bytes` the bytes really stored. :func:`packed_numel` sums the
  packed values over a model (``count_parameters`` adds it to the parameters).
- **replay**: ``change_kind`` names the change-log kind (``model.config.ffnkit["changes"]``) whose
  records rebuild it; :meth:`~RuntimeModule.from_record` builds it from one record (placeholder values
  that the saved state dict then fills) and :meth:`~RuntimeModule.replay` puts it in a fresh model.
- **capture sites**: ``sites`` names the sites (``ffnkit.core.capture.SITES``) it offers through
  :class:`HookPoint` submodules, TransformerLens style. A module whose fused kernel hides the
  projections passes each site's tensor through ``self.hook_<site>`` (an identity); ``capture`` and
  ``steer`` look for ``hook_<site>`` in the FFN's container first (:func:`hook_point`) and hook its
  output, so they keep firing (and a steering hook's return value replaces the tensor).
- **writable views**: ``weights_writable`` says whether the canonical weights that a handle reads
  (``ffn.W_in`` ...) are views of its stored parameters. When not, handles return read-only tensors
  (:mod:`ffnkit.core.views`) and edits raise a one-line error.

Example:
    >>> q = find_ffns(model)[0].out_proj             # a QuantizedLinear after quantize_
    >>> q.stored_numel() == q.in_features * q.out_features, q.weights_writable
    (True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from ffnkit.core.errors import SavedModelError

__all__ = ["HookPoint", "RuntimeModule", "dtype_source", "hook_point", "packed_numel", "tensor_bytes"]


class HookPoint(nn.Module):
    """An identity submodule: a named place where ``capture`` and ``steer`` hook a site's tensor.

    Example:
        >>> self.hook_post = HookPoint("post")      # in __init__
        >>> m = self.hook_post(act(gate) * up)      # in forward: [..., d_ff], unchanged
    """

    def __init__(self, site: str) -> None:
        super().__init__()
        self.site = site

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"site={self.site!r}"


def hook_point(module: nn.Module | None, site: str) -> HookPoint | None:
    """The :class:`HookPoint` that ``module`` offers for ``site`` (its child ``hook_<site>``), or None.

    Example:
        >>> hook_point(ffn.module, "post")   # None for plain transformers modules
    """
    point = getattr(module, f"hook_{site}", None) if module is not None else None
    return point if isinstance(point, HookPoint) else None


def tensor_bytes(t: Tensor | nn.Module) -> int:
    """Bytes a tensor (or a module's parameters and buffers) really stores.

    Example:
        >>> tensor_bytes(torch.zeros(10, 10))
        400
    """
    if isinstance(t, nn.Module):
        return sum(tensor_bytes(x) for x in [*t.parameters(), *t.buffers()])
    return t.numel() * t.element_size()


class RuntimeModule(nn.Module):
    """Base class of ffnkit's runtime modules (see the module doc for the protocol).

    Example:
        >>> class Half(RuntimeModule):
        ...     change_kind, weights_writable = "halved", True
        ...     def forward(self, x): return x / 2
    """

    change_kind: ClassVar[str] = ""  # the change-log kind whose records rebuild this module
    weights_writable: ClassVar[bool] = True  # are the handle's canonical weights views of parameters?
    sites: ClassVar[tuple[str, ...]] = ()  # capture sites offered through HookPoint children
    # why neuron edits (pruning, resizing) are refused on this module; None: they are allowed
    resize_refusal: ClassVar[str | None] = None

    def packed_numel(self) -> int:
        """Weights held in buffers rather than parameters (packed integers), counted as what they stand for."""
        return 0

    def stored_numel(self) -> int:
        """The weights this module stands for: its parameters plus the packed values."""
        return sum(p.numel() for p in self.parameters()) + self.packed_numel()

    def stored_bytes(self) -> int:
        """Bytes really stored (parameters and buffers)."""
        return tensor_bytes(self)

    def hook_points(self) -> dict[str, HookPoint]:
        """The capture sites it offers: site -> HookPoint."""
        return {s: p for s in self.sites if (p := hook_point(self, s)) is not None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], like: nn.Module) -> RuntimeModule:
        """Build the module that ``record`` (one entry of a ``change_kind`` change) describes, with
        placeholder values, the dtype and device of ``like`` (the module it replaces)."""
        raise NotImplementedError

    @classmethod
    def replay(cls, model: nn.Module, record: Mapping[str, Any]) -> RuntimeModule:
        """Rebuild the module of ``record`` in a freshly built ``model``, at ``record["path"]``.

        Example:
            >>> LowRankLinear.replay(fresh_model, change["modules"][0])
        """
        owner_path, _, attr = str(record["path"]).rpartition(".")
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
            old = getattr(owner, attr)
        except AttributeError:
            raise SavedModelError(
                f"the saved {cls.change_kind!r} change names {record['path']!r}, which this model does not "
                "have; save the model again"
            ) from None
        new = cls.from_record(record, old)
        setattr(owner, attr, new)
        return new


def packed_numel(model: nn.Module) -> int:
    """How many weights the model keeps packed in buffers (quantised matrices), counted as the values they
    stand for. ``model.parameters()`` does not list buffers, so parameter counts add this.

    Example:
        >>> packed_numel(model)  # 0 before quantize_
    """
    return sum(m.packed_numel() for m in model.modules() if isinstance(m, RuntimeModule))


def dtype_source(like: nn.Module | Tensor) -> Tensor:
    """A tensor whose dtype and device a rebuilt module takes: ``like`` or its first parameter.

    Example:
        >>> dtype_source(nn.Linear(2, 3)).dtype
        torch.float32
    """
    if isinstance(like, Tensor):
        return like
    first = next(iter(like.parameters()), None)
    if first is None:
        first = next(iter(like.buffers()), None)
    if first is None:
        raise SavedModelError(
            f"a {type(like).__name__} holds no tensor to rebuild from; save the model again"
        )
    return first
