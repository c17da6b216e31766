"""The one transaction every structural change of a model goes through: all of it, or none of it.

Inside ``with Transaction(model) as tx:`` a transform

- swaps attributes (:meth:`Transaction.swap`: a parameter, an int, a handle field, a config key),
- replaces modules by dotted path (:meth:`Transaction.replace`),
- runs other undoable steps (:meth:`Transaction.call`, e.g. attaching a parametrization),
- records the change in ``model.config.ffnkit`` (:meth:`Transaction.record`,
  :meth:`Transaction.record_structure`, :meth:`Transaction.set_meta`).

Each step applies at once. If the block raises (anything, ``KeyboardInterrupt`` included), every step is
undone in reverse order and the config's width keys and ``config.ffnkit`` are put back: the model is
exactly as it was. On success the transaction bumps the structural generation of every module it
touched or replaced (:mod:`ffnkit.core.views`), so FFN handles taken earlier raise when used, while the
handles that the edit updated in place (the ones passed to ``keep_neurons_`` ...) are marked current.

Transactions nest: one opened on a model that already has an open transaction joins it, and a failure
inside the inner block undoes the inner steps only (a savepoint); the outer one commits everything.

Example:
    >>> with Transaction(model) as tx:
    ...     tx.replace("model.layers.3.mlp.up_proj", LowRankLinear(576, 1536, rank=64))
    ...     tx.record({"kind": "ffn_lowrank", "modules": [...]})
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from ffnkit.core import structure
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.ffn import FFN
from ffnkit.core.layouts import Swap
from ffnkit.core.views import bump_generation

__all__ = ["Swap", "Transaction"]

T = TypeVar("T")

# model -> its outermost open transaction (so that a transform calling another one nests)
_OPEN: weakref.WeakKeyDictionary[nn.Module, Transaction] = weakref.WeakKeyDictionary()


@dataclass
class _Step:
    undo: Callable[[], None]
    touched: tuple[nn.Module, ...] = ()  # changed in place: their generation moves on commit
    retired: tuple[nn.Module, ...] = ()  # taken out of the model: they and their children move
    handle: FFN | None = None  # a handle the step updated: it stays current


def _apply_swap(swap: Swap) -> Any:
    """Set ``swap.obj.<attr> = new``; returns the old value (the one place every swap goes through)."""
    old = getattr(swap.obj, swap.attr)
    setattr(swap.obj, swap.attr, swap.new)
    return old


class Transaction:
    """All-or-nothing structural change of ``model`` (or, with ``model=None``, of loose modules and handles).

    Example:
        >>> with Transaction(model) as tx:
        ...     tx.swap(linear, "weight", new_weight)
        ...     tx.swap(linear, "out_features", 64)
        ...     tx.record_structure()
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model
        self._steps: list[_Step] = []
        self._parent: Transaction | None = None
        self._mark = 0
        self._config: dict | None = None
        self._open = False

    # ----- opening and closing ---------------------------------------------------------------------
    def begin(self) -> Transaction:
        """Open the transaction (``with`` does it); joins an open transaction on the same model."""
        if self._open:
            raise InvalidArgumentError("this transaction is already open")
        parent = _OPEN.get(self.model) if self.model is not None else None
        if parent is not None:
            self._parent, self._mark = parent, len(parent._steps)
        elif self.model is not None:
            _OPEN[self.model] = self
        self._config = structure.config_snapshot(self.model) if self.model is not None else None
        self._open = True
        return self

    def commit(self) -> None:
        """Keep every step. The outermost transaction moves the generations and marks updated handles current."""
        self._check_open()
        self._open = False
        if self._parent is not None:
            return  # the outer transaction commits (or rolls back) everything
        self._release()
        steps, self._steps = self._steps, []
        for step in steps:
            for module in step.touched:
                bump_generation(module)
            for module in step.retired:
                bump_generation(module, deep=True)
        for handle in {id(s.handle): s.handle for s in steps if s.handle is not None}.values():
            handle.refresh_generation()

    def rollback(self) -> None:
        """Undo every step (of this transaction only, when nested) and put the config back."""
        self._check_open()
        self._open = False
        root = self._root()
        try:
            while len(root._steps) > (self._mark if self._parent is not None else 0):
                root._steps.pop().undo()
            if self.model is not None:
                structure.restore_config(self.model, self._config)
        finally:
            if self._parent is None:
                self._release()

    def __enter__(self) -> Transaction:
        return self.begin()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        return False  # re-raise

    # ----- steps ---------------------------------------------------------------------------------------
    def swap(self, obj: Any, attr: str, new: Any) -> Any:
        """Set ``obj.<attr> = new`` now, undone on rollback; returns the old value.

        Example:
            >>> tx.swap(model.config, "num_hidden_layers", 28)
        """
        self._check_open()
        old = getattr(obj, attr)
        touched = (obj,) if isinstance(obj, nn.Module) else ()
        retired = (old,) if isinstance(old, nn.Module) and old is not new else ()
        handle = obj if isinstance(obj, FFN) else None
        # the undo is logged first: a swap interrupted half-way is put back too
        self._add(_Step(lambda: setattr(obj, attr, old), touched, retired, handle))
        _apply_swap(Swap(obj, attr, new))
        return old

    def apply(self, swaps: Iterable[Swap]) -> None:
        """Apply planned swaps in order (e.g. from a layout adapter's ``plan_*``).

        Example:
            >>> tx.apply(layout_of(lin).plan_keep_rows(lin, torch.arange(64)))
        """
        for s in swaps:
            self.swap(s.obj, s.attr, s.new)

    def replace(self, path: str, module: nn.Module) -> nn.Module:
        """Put ``module`` at dotted module path ``path`` of the model; returns the module it replaced.

        Example:
            >>> tx.replace("model.layers.3.mlp", ZeroFFN(3))
        """
        if self.model is None:
            raise InvalidArgumentError("replace(path, module) needs the transaction's model")
        owner_path, _, attr = path.rpartition(".")
        try:
            owner = self.model.get_submodule(owner_path) if owner_path else self.model
            getattr(owner, attr)
        except AttributeError:
            raise InvalidArgumentError(f"the model has no module {path!r}") from None
        return self.swap(owner, attr, module)

    def call(
        self,
        do: Callable[[], T],
        undo: Callable[[T], None],
        *,
        touched: Iterable[nn.Module] = (),
    ) -> T:
        """Run ``do()`` now and ``undo(result)`` on rollback; ``touched`` modules count as changed.

        Example:
            >>> tx.call(lambda: pz.attach(experts, "down_proj"),
            ...         lambda old: pz.detach(experts, "down_proj", old), touched=[experts])
        """
        self._check_open()
        result = do()
        self._add(_Step(lambda: undo(result), tuple(touched)))
        return result

    # ----- the change log --------------------------------------------------------------------------
    def record(self, change: dict) -> None:
        """Append ``change`` (JSON-ready, with a ``"kind"``) to ``model.config.ffnkit["changes"]``.

        Example:
            >>> tx.record({"kind": "sublayers_removed", "removed": [...]})
        """
        structure.record_change(self._need_model(), change)

    def record_structure(self, *, if_recorded: bool = False) -> None:
        """Record the current FFN widths (``model.config.ffnkit["structure"]`` and the width keys);
        ``if_recorded``: only where an earlier change already recorded them (the list then covers the
        FFNs that remain).

        Example:
            >>> tx.record_structure()
        """
        model = self._need_model()
        changes = (getattr(model.config, "ffnkit", None) or {}).get("changes", [])
        if if_recorded and not any(c.get("kind") == "ffn_structure" for c in changes):
            return
        structure.record_structure(model)

    def set_meta(self, key: str, value: Any) -> None:
        """Set ``model.config.ffnkit[key] = value`` (e.g. the neuron order of ``nest_``).

        Example:
            >>> tx.set_meta("nest", {"score": "wanda-sp", ...})
        """
        model = self._need_model()
        meta = dict(getattr(model.config, "ffnkit", None) or {})
        meta[key] = value
        model.config.ffnkit = meta

    # ----- internals ---------------------------------------------------------------------------------
    def _root(self) -> Transaction:
        tx = self
        while tx._parent is not None:
            tx = tx._parent
        return tx

    def _add(self, step: _Step) -> None:
        self._root()._steps.append(step)

    def _release(self) -> None:
        if self.model is not None and _OPEN.get(self.model) is self:
            del _OPEN[self.model]

    def _check_open(self) -> None:
        if not self._open:
            raise InvalidArgumentError("the transaction is not open: use `with Transaction(model) as tx:`")

    def _need_model(self) -> nn.Module:
        if self.model is None:
            raise InvalidArgumentError("recording a change needs the transaction's model")
        return self.model
