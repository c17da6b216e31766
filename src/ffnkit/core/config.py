"""The shared shape of every transform's config dataclass: a JSON round trip whose fields map 1:1 to CLI flags."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from ffnkit.core.errors import InvalidArgumentError


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
