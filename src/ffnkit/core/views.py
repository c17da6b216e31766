"""Honest views: a weight read that is not a view of stored parameters refuses writes, and every module
carries a structural generation so that a handle can tell when the model changed under it.

- :class:`ReadOnlyTensor`: what a handle returns for a matrix the model does not store as such (a
  low-rank product B·A, a dequantised matrix). Reading and computing work as on any tensor (results are
  plain tensors); an in-place op or item assignment on it, or on a view of it, raises
  :class:`~ffnkit.core.errors.ReadOnlyWeightError` in one line, instead of silently changing a copy.
- :func:`generation` / :func:`bump_generation`: a counter per module that the transaction
  (:mod:`ffnkit.core.transaction`) bumps for every module a committed change touched or retired. An FFN
  handle remembers the generations of its modules and raises
  :class:`~ffnkit.core.errors.StaleHandleError` once one moved (handles given to the edit are updated).

Example:
    >>> w = read_only(B @ A, "a low-rank product")
    >>> (w * 2).sum()          # reads are fine
    >>> w[0, 0] = 1.0          # ReadOnlyWeightError: ... a low-rank product ...
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ffnkit.core.errors import ReadOnlyWeightError

__all__ = ["ReadOnlyTensor", "bump_generation", "generation", "read_only"]

# in-place dunders (x += y ...) and descriptor writes (x.data = y) that write into the tensor
_INPLACE_DUNDERS = {
    f"__i{op}__"
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift")
} | {"__irshift__", "__imatmul__", "__setitem__"}
_HARMLESS = {"requires_grad_", "retain_grad", "share_memory_"}  # flags, not values


def _is_write(func: Any, args: tuple, kwargs: dict) -> bool:
    """Does ``func(*args, **kwargs)`` write into a read-only tensor?"""
    name = getattr(func, "__name__", "")
    target = args[0] if args else None
    if isinstance(kwargs.get("out"), ReadOnlyTensor):
        return True
    if not isinstance(target, ReadOnlyTensor):
        return False
    if name == "__set__":  # a property setter: only .data writes values
        return getattr(getattr(func, "__self__", None), "__name__", "") == "data"
    if name in _INPLACE_DUNDERS or kwargs.get("inplace") is True:
        return True
    return name.endswith("_") and not name.startswith("__") and name not in _HARMLESS


class ReadOnlyTensor(Tensor):
    """A tensor that refuses writes: a matrix the model does not store as such (see the module doc).

    Results of computations are plain tensors; views of it (slices, ``.T``, ``.detach()``) stay read-only.

    Example:
        >>> w = read_only(torch.ones(2, 2), "a dequantised matrix")
        >>> w.sum().item(), type(w.clone()).__name__
        (4.0, 'Tensor')
    """

    reason: str = "a computed matrix"

    def __deepcopy__(self, memo: dict) -> Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.detach().clone()  # a copy is the caller's to change

    def __reduce_ex__(self, protocol: int) -> Any:
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(Tensor).__reduce_ex__(protocol)  # pickles as a plain tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_write(func, args, kwargs):
            ro = args[0] if isinstance(args[0], ReadOnlyTensor) else kwargs["out"]
            raise ReadOnlyWeightError(
                f"this weight is {ro.reason}, not a view of stored parameters: a write would not reach "
                "the model"
            )
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        sources = [a for a in args if isinstance(a, ReadOnlyTensor)]
        if not sources:
            return out
        if isinstance(out, tuple | list):  # split, chunk, unbind: views each
            return type(out)(_keep_read_only(o, sources) for o in out)
        return _keep_read_only(out, sources)


def _keep_read_only(out: Any, sources: list[ReadOnlyTensor]) -> Any:
    """A view of a read-only tensor stays read-only; a new tensor is the caller's to change."""
    if type(out) is not Tensor or out.layout != torch.strided:
        return out
    with torch._C.DisableTorchFunctionSubclass():
        ptr = out.untyped_storage().data_ptr()
        alias = next((a for a in sources if a.untyped_storage().data_ptr() == ptr), None)
    return out if alias is None else read_only(out, alias.reason)


def read_only(t: Tensor, reason: str) -> ReadOnlyTensor:
    """``t`` as a :class:`ReadOnlyTensor` (same data, same autograd history); ``reason`` ends the error
    message: "this weight is <reason>, not a view of stored parameters ...".

    Example:
        >>> read_only(torch.zeros(3), "the product of two low-rank factors").add_(1)   # raises
    """
    with torch._C.DisableTorchFunctionSubclass():
        out = t.as_subclass(ReadOnlyTensor)
    out.reason = reason
    return out


# ----- structural generations ---------------------------------------------------------------------
_GENERATIONS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def generation(module: nn.Module) -> int:
    """How many committed structural changes touched ``module`` (0 for a module never changed).

    Example:
        >>> generation(model.model.layers[0].mlp.up_proj)
        0
    """
    return _GENERATIONS.get(module, 0)


def bump_generation(module: nn.Module, *, deep: bool = False) -> None:
    """Count one more structural change of ``module`` (and, ``deep``, of every module inside it: a module
    taken out of the model, whose handles must not be used any more).

    Example:
        >>> bump_generation(old_linear, deep=True)   # the transaction does this for replaced modules
    """
    for m in module.modules() if deep else (module,):
        _GENERATIONS[m] = _GENERATIONS.get(m, 0) + 1
