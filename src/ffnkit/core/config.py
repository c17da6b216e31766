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
import math
from dataclasses import asdict, fields, is_dataclass
from enum import Enum
from pathlib import PurePath
from typing import Any

from ffnkit.core.errors import InvalidArgumentError

__all__ = ["JsonConfig", "Result", "as_dict", "check_finite", "finite_json", "jsonable"]


def check_finite(value: Any, name: str) -> None:
    """Refuse NaN and ±inf anywhere in ``value`` (a number, or lists/tuples/dicts of them).

    A NaN threshold or an infinite time budget never means what the user wanted: it compares false with
    everything (silently picking nothing) or runs forever.

    Example:
        >>> check_finite([0.5, 1.0], "ratios")
        >>> check_finite(float("nan"), "value")  # raises InvalidArgumentError
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value}")
    if isinstance(value, list | tuple):
        for v in value:
            check_finite(v, name)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{name}[{k!r}]")


class JsonConfig:
    """Mixin for config dataclasses: ``Config.from_dict(json.loads(c.to_json())) == c``.

    Every field is checked for NaN/±inf when the config is built, before the subclass's own
    ``__post_init__`` runs (one check for all configs, whatever built them: CLI, JSON or Python).

    Example:
        >>> PruneConfig.from_dict(PruneConfig("flap", 0.3).to_dict()).ratio
        0.3
    """

    def __post_init__(self) -> None:
        for f in fields(self):
            check_finite(getattr(self, f.name), f.name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None:  # inherited: the parent's already checks
            return

        def __post_init__(self) -> None:
            JsonConfig.__post_init__(self)
            own(self)

        cls.__post_init__ = __post_init__

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


def finite_json(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """``value`` (plain JSON data) with every NaN/±inf replaced by ``None``, and where they were.

    Strict JSON has no NaN or Infinity; a result may legitimately hold one (the perplexity of a broken
    model is inf), so it becomes ``null`` and the note says what it was.

    Example:
        >>> finite_json({"ppl": float("inf"), "n": 3})
        ({'ppl': None, 'n': 3}, ['ppl: inf'])
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, [f"{path or '.'}: {value}"]
    notes: list[str] = []
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], sub = finite_json(v, f"{path}.{k}" if path else str(k))
            notes += sub
        return out, notes
    if isinstance(value, list | tuple):
        items = []
        for i, v in enumerate(value):
            item, sub = finite_json(v, f"{path}[{i}]")
            items.append(item)
            notes += sub
        return items, notes
    return value, notes


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
