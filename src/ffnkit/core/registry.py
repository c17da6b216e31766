"""One registry style for every "name → thing" table: methods, scores, reducers, replays, sections, …

A :class:`Registry` maps a name to an object, or to a lazy ``"package.module:attr"`` string that is
imported on the first :meth:`Registry.get` (so ``import ffnkit`` and ``ffnkit --help`` stay fast). Each
entry carries a one-line ``help`` and free metadata (``**meta``: e.g. ``data_free=True`` for a score).
An unknown name is a one-line error of the :mod:`ffnkit.core.errors` family that lists the names
available, so every table gives the same message shape.

Example:
    >>> SCORES = Registry("score")
    >>> @SCORES.register("magnitude", help="weight norms", data_free=True)
    ... def magnitude(unit, stats): ...
    >>> SCORES.register("flap", "mypackage.scores:flap", help="FLAP fluctuation")  # imported when used
    >>> SCORES.names()
    ['magnitude', 'flap']
    >>> SCORES.get("nope")
    Traceback (most recent call last):
    InvalidArgumentError: unknown score 'nope'; available: magnitude, flap
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ffnkit.core.errors import FFNKitError, InvalidArgumentError

__all__ = ["Entry", "Registry"]

T = TypeVar("T")
_MISSING: Any = object()
# "package.module:attr" (attr may be dotted: "module:Class.method")
_LAZY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class Entry(Generic[T]):
    """One registered name: its target (an object or a lazy "module:attr" string), help and metadata.

    Example:
        >>> Entry("svd", "ffnkit.compress.lowrank:lowrank_", "truncated SVD").lazy
        True
    """

    name: str
    target: T | str
    help: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lazy(self) -> bool:
        """True while the target is a "module:attr" string not yet imported."""
        return isinstance(self.target, str)

    def resolve(self) -> T:
        """The target, importing it the first time when it is a "module:attr" string."""
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.target = obj
        return self.target  # type: ignore[return-value]


class Registry(Generic[T]):
    """Ordered name → object table with lazy imports, help lines and one-line unknown-name errors.

    ``kind`` names what the table holds in messages ("compression method", "corpus"); ``error`` is the
    exception class raised for an unknown name (an :class:`FFNKitError`); ``hint`` is appended to that
    message (what else the user may give, e.g. "a text file or folder").

    Example:
        >>> REDUCERS = Registry("reducer")
        >>> REDUCERS.register("mean", Mean, help="running mean")
        >>> REDUCERS.get("mean") is Mean, "mean" in REDUCERS, list(REDUCERS)
        (True, True, ['mean'])
    """

    def __init__(self, kind: str, *, error: type[FFNKitError] = InvalidArgumentError, hint: str = "") -> None:
        self.kind = kind
        self.error = error
        self.hint = hint
        self._entries: dict[str, Entry[T]] = {}
        self._listeners: list[Callable[[Entry[T]], None]] = []

    # ----- registration ----------------------------------------------------------------------------
    def register(self, name: str, target: Any = _MISSING, *, help: str = "", **meta: Any) -> Any:
        """Add (or replace) ``name``. With no ``target`` it returns a decorator.

        ``target``: the object, or a ``"package.module:attr"`` string imported on the first ``get``.

        Example:
            >>> METHODS.register("svd", "ffnkit.compress.lowrank:lowrank_", help="truncated SVD")
            >>> @METHODS.register("mine", help="my method")
            ... def mine(model, config): ...
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if target is _MISSING:

            def decorator(obj: Any) -> Any:
                self.register(name, obj, help=help, **meta)
                return obj

            return decorator
        if isinstance(target, str) and not _LAZY.match(target):
            raise InvalidArgumentError(
                f"{self.kind} {name!r}: a lazy target is a 'package.module:attr' string, got {target!r}"
            )
        self._entries[name] = entry = Entry(name, target, help, dict(meta))
        for listener in self._listeners:
            listener(entry)
        return target

    def listen(self, listener: Callable[[Entry[T]], None]) -> None:
        """Call ``listener(entry)`` for every entry, now and whenever one is registered later (a table
        derived from this one stays complete, e.g. one pruning method per score).

        Example:
            >>> SCORES.listen(lambda e: print("new score", e.name))
        """
        self._listeners.append(listener)
        for entry in list(self._entries.values()):
            listener(entry)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (an unknown name is the usual one-line error).

        Example:
            >>> METHODS.unregister("mine")
        """
        self.entry(name)
        del self._entries[name]

    # ----- lookup ----------------------------------------------------------------------------------
    def unknown(self, name: object) -> FFNKitError:
        """The one-line error for a name that is not registered (returned, for the caller to raise).

        Example:
            >>> raise REDUCERS.unknown("median")
        """
        names = ", ".join(self._entries) or "none"
        hint = f"; {self.hint}" if self.hint else ""
        return self.error(f"unknown {self.kind} {name!r}; available: {names}{hint}")

    def entry(self, name: str) -> Entry[T]:
        """The :class:`Entry` of ``name`` (nothing is imported).

        Example:
            >>> SCORES.entry("lorap").meta["keep_lowest"]
            0.01
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    def get(self, name: str) -> T:
        """The object registered as ``name``, imported now if it was registered as a string.

        Example:
            >>> REDUCERS.get("mean")().update(torch.ones(3, 2)).result()
            tensor([1., 1.])
        """
        return self.entry(name).resolve()

    def meta(self, name: str, key: str, default: Any = None) -> Any:
        """One metadata value of ``name`` (``default`` when the entry does not set it).

        Example:
            >>> SCORES.meta("magnitude", "data_free", False)
            True
        """
        return self.entry(name).meta.get(key, default)

    def names(self) -> list[str]:
        """The registered names, in registration order.

        Example:
            >>> REDUCERS.names()[:2]
            ['count', 'mean']
        """
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs in registration order; lazy targets are imported.

        Example:
            >>> dict(REDUCERS.items())["mean"]
            <class 'ffnkit.core.reducers.Mean'>
        """
        return [(name, e.resolve()) for name, e in list(self._entries.items())]

    def entries(self) -> list[Entry[T]]:
        """Every :class:`Entry` in registration order (nothing is imported).

        Example:
            >>> [e.name for e in SCORES.entries() if e.meta.get("data_free")]
            ['magnitude']
        """
        return list(self._entries.values())

    def help(self, name: str | None = None) -> Any:
        """The help line of ``name``; without a name, {name: help line} for every entry.

        Example:
            >>> builtin = CORPORA.help()   # {'shakespeare': "Shakespeare's 42 plays …", …}
        """
        if name is not None:
            return self.entry(name).help
        return {n: e.help for n, e in self._entries.items()}

    def filter(self, predicate: Callable[[Entry[T]], bool]) -> list[str]:
        """The names whose entry satisfies ``predicate`` (nothing is imported).

        Example:
            >>> SCORES.filter(lambda e: e.meta.get("data_free"))
            ['magnitude']
        """
        return [n for n, e in self._entries.items() if predicate(e)]

    # ----- container protocol (iterating gives the names, like a dict) -----------------------------
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
