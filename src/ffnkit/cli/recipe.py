"""``--config FILE``: a recipe whose keys are config dataclass fields; options on the command line win.

A recipe is JSON, or YAML when PyYAML is installed (``.yaml``/``.yml``). An unknown key is a one-line
error listing the valid keys; nothing is loaded before the recipe is checked.

Example (``ffnkit compress --config prune.yaml -o out``)::

    method: flap
    ratio: 0.3
    allocation: global
    reconstruct: true
    layers: [0, 1, 2, 3]
    corpus: austen
    heal: {max_minutes: 5}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["apply_recipe", "given_on_command_line", "read_recipe", "check_keys"]


def read_recipe(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """The mapping in recipe file ``path`` (JSON, or YAML by its suffix), or a one-line error.

    Example:
        >>> read_recipe("recipe.json")
        {'method': 'flap', 'ratio': 0.3}
    """
    from ffnkit.core.errors import InvalidArgumentError

    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(f"{flag} {path}: no such file; give a JSON or YAML recipe")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{flag} {path}: cannot be read as text ({type(exc).__name__})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InvalidArgumentError(
                f"{flag} {path}: YAML needs PyYAML (pip install pyyaml), or write the recipe as JSON"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise InvalidArgumentError(f"{flag} {path}: not valid YAML{line}") from None
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(
                f"{flag} {path}: not valid JSON (line {exc.lineno}: {exc.msg}); YAML files end in .yaml"
            ) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InvalidArgumentError(
            f"{flag} {path}: a recipe is a mapping of fields, got {type(doc).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in doc.items()}


def check_keys(doc: dict[str, Any], valid: Iterable[str], where: str) -> None:
    """Refuse keys of ``doc`` not in ``valid``: one line naming them and listing the valid keys.

    Example:
        >>> check_keys({"ratio": 0.3, "ration": 1}, ["ratio", "method"], "recipe r.json")
        Traceback (most recent call last):
        InvalidArgumentError: recipe r.json: unknown key ration; valid keys: method, ratio
    """
    from ffnkit.core.errors import InvalidArgumentError

    valid = sorted(set(valid))
    unknown = [k for k in doc if k not in valid]
    if unknown:
        raise InvalidArgumentError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid keys: {', '.join(valid)}"
        )


def given_on_command_line(ctx: Any) -> set[str]:
    """Names of the parameters the user typed (not defaults): those that override a recipe.

    Example:
        >>> given_on_command_line(ctx)
        {'ratio', 'output'}
    """
    # by the source's name: typer may carry its own copy of click, whose ParameterSource is another enum
    typed = ("COMMANDLINE", "ENVIRONMENT")
    names = [p.name for p in ctx.command.params if p.name]
    return {name for name in names if getattr(ctx.get_parameter_source(name), "name", None) in typed}


def apply_recipe(
    path: str | Path | None, fields: dict[str, Any], valid: Iterable[str], typed: set[str], where: str = ""
) -> dict[str, Any]:
    """``fields`` (config field -> the command line's value) with recipe ``path`` underneath: a recipe key
    wins over an option left at its default, an option typed on the command line (``typed``) wins over
    the recipe. Keys outside ``valid`` are a one-line error; no recipe returns ``fields`` unchanged.

    Example:
        >>> apply_recipe("r.json", {"sparsity": 0.4, "rule": "best"}, ["sparsity", "rule"], {"rule"})
        {'sparsity': 0.5, 'rule': 'best'}
    """
    if path is None:
        return dict(fields)
    recipe = read_recipe(path)
    check_keys(recipe, valid, f"--config {path}{where}")
    return {**fields, **{k: v for k, v in recipe.items() if k not in typed}}
