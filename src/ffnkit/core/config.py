"""The shared shapes of configs and results: a config dataclass is a JSON round trip whose fields map 1:1
to CLI flags (:class:`JsonConfig`); what a public operation returns is a dataclass with ``to_dict()``
(:class:`Result`).

Example:
    >>> PruneConfig.from_dict(PruneConfig("flap", 0.3).to_dict()).ratio
    0.3
    >>> json.dumps(block_influence(model, batches).to_dict())
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, is_dataclass
from enum import Enum
from pathlib import PurePath
from typing import Any

from ffnkit.core.errors import InvalidArgumentError

__all__ = ["JsonConfig", "Result", "as_dict", "jsonable"]


class JsonConfig:
    """Mixin for config dataclasses: ``Config.from_dict(json.loads(c.to_json())) == c``.

    Example:
        >>> PruneConfig.from_dict(PruneConfig("flap", 0.3).to_dict()).ratio
        0.3
    """

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, doc: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise InvalidArgumentError(
                f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**doc)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: results and dataclasses → dicts, tensors → (nested) lists,
    tuples → lists, paths and enums → strings; dict keys are kept as they are.

    Example:
        >>> jsonable({"x": torch.tensor([1.0, 2.0]), "p": Path("a")})
        {'x': [1.0, 2.0], 'p': 'a'}
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    return value


class Result:
    """Base of what public ffnkit operations return: a dataclass whose ``to_dict()`` is JSON-ready.

    ``to_dict`` walks the fields in order (nested results, tensors and tuples become plain data); a
    field declared with ``field(metadata={"json": False})`` stays out (large tensors kept for later
    use). Subclasses with another JSON shape override ``to_dict``.

    Example:
        >>> @dataclass
        ... class Hits(Result):
        ...     layers: list[int]
        >>> Hits([3, 5]).to_dict()
        {'layers': [3, 5]}
    """

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (see the class docstring)."""
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self) if f.metadata.get("json", True)}


def as_dict(result: Any) -> dict[str, Any]:
    """A result's ``to_dict()``, or a dict as it is (e.g. a result read back from JSON).

    Example:
        >>> as_dict(block_influence(model, batches))["ranking"][:3]
    """
    if isinstance(result, dict):
        return result
    if hasattr(result, "to_dict"):
        return result.to_dict()
    raise InvalidArgumentError(f"expected a result or a dict, got {type(result).__name__}")
