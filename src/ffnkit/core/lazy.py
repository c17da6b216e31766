"""Lazy public names for a package's ``__init__``: ``import ffnkit`` stays fast and touches no accelerator.

Example:
    >>> __getattr__, __dir__ = lazy_exports(__name__, {"prune_": "ffnkit.compress.prune"}, globals())
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` that import ``exports[name]`` on first access.

    ``exports`` maps a public name to the module defining it; the value is cached in ``namespace``
    (the package's ``globals()``), so later lookups cost nothing.

    Example:
        >>> __getattr__, __dir__ = lazy_exports("ffnkit.inspect", {"trace": "ffnkit.inspect.tracing"}, globals())
    """

    def __getattr__(name: str) -> Any:  # noqa: N807
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(namespace.get("__all__", ())) | set(exports))

    return __getattr__, __dir__
