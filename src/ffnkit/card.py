"""The model card: a ``README.md`` written into every output folder, saying what was done and measured.

It is rendered from the run record (:class:`ffnkit.pipeline.RunRecord`'s ``to_dict()``, also saved as
``run.json``): the command line, the source model, each step's method and config, healing, parameters
and perplexity before/after with their protocol, and the machine. Every number on the card is one of the
record's; nothing is typed in. For the default model the card says what its "dense" baseline is (the
dequantised 4-bit GGUF, :data:`ffnkit.sources.models.DEQUANTISED_NOTE`).

Example:
    >>> record = run_pipeline(PipelineConfig(steps=[Step("flap", {"ratio": 0.3})], output="out"))
    >>> write_model_card("out", record.to_dict())
    PosixPath('out/README.md')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CARD", "model_card", "write_model_card"]

CARD = "README.md"  # the card's name inside an output folder


def _num(x: Any) -> str:
    if x is None:
        return "not measured"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _code(text: str) -> str:
    """Inline code that survives any backticks inside ``text`` (a corpus path may hold one)."""
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def _dense_note(model: str) -> str | None:
    from ffnkit.sources.models import MODELS

    if model in MODELS:
        return MODELS.entry(model).meta.get("dense_note") or None
    return None


def model_card(record: dict[str, Any]) -> str:
    """The card (Markdown) of a run record.

    Example:
        >>> "## What was done" in model_card(record.to_dict())
        True
    """
    model = str(record.get("model"))
    config = record.get("config") or {}
    out = str(record.get("output") or "this folder")
    lines = [
        f"# {Path(out).name}: {model}, {record.get('title') or 'with smaller FFNs'}",
        "",
        f"Made by ffnkit from **{model}**. Load it with `ffnkit.load({out!r})` (Python) or give the folder",
        f"to any command: `ffnkit eval {out}`.",
        "",
        "## What was done",
        "",
    ]
    if record.get("command"):
        lines += ["Command:", "", "```", str(record["command"]), "```", ""]
    for i, step in enumerate(record.get("steps") or [], 1):
        fields = json.dumps(step.get("config") or {}, sort_keys=True, default=str)
        lines.append(f"{i}. **{step.get('method')}** ({_num(step.get('seconds'))} s): {_code(fields)}")
    heal = record.get("heal")
    if heal:
        lines.append(
            f"{len(record.get('steps') or []) + 1}. **healing** (distillation towards the original, "
            f"{_num(heal.get('steps'))} steps, {_num(heal.get('seconds'))} s): "
            + _code(json.dumps(heal.get("config", {}), sort_keys=True, default=str))
        )
    lines += [
        "",
        f"Calibration corpus: {_code(str(record.get('corpus')))}; computed on "
        f"{_code(str(config.get('device') or 'cpu'))} in {_code(str(config.get('dtype') or 'float32'))}"
        + (f", saved in {_code(str(config['save_dtype']))}" if config.get("save_dtype") else "")
        + ".",
        "",
        "## Measured",
        "",
        "| | before | after |",
        "|---|---|---|",
    ]
    before, after = record.get("parameters_before") or {}, record.get("parameters_after") or {}
    lines.append(f"| parameters (total) | {_num(before.get('total'))} | {_num(after.get('total'))} |")
    lines.append(f"| parameters (FFN) | {_num(before.get('ffn'))} | {_num(after.get('ffn'))} |")
    lines.append(
        f"| perplexity | {_num(record.get('perplexity_before'))} | {_num(record.get('perplexity_after'))} |"
    )
    if record.get("perplexity_before_heal") is not None:
        lines.append(f"| perplexity before healing | | {_num(record['perplexity_before_heal'])} |")
    protocol = record.get("protocol")
    lines.append("")
    if protocol:
        lines.append(
            f"Perplexity: the last {_num(protocol.get('max_tokens'))} tokens of the evaluation split of "
            f"{_code(str(protocol.get('corpus')))} in windows of {protocol.get('window')} tokens "
            f"(stride {protocol.get('stride') or protocol.get('window')}), {_num(protocol.get('n_windows'))} windows."
        )
    else:
        lines.append("Perplexity was not measured (`--no-eval`).")
    note = _dense_note(model)
    if note:
        lines += ["", f'**The baseline ("before")**: {note}.']
    env = record.get("environment") or {}
    seconds = record.get("seconds") or {}
    lines += [
        "",
        "## Machine",
        "",
        f"{env.get('platform')}, {env.get('cpu_count')} CPU cores"
        + (f", {env['device_name']}" if env.get("device_name") else "")
        + f"; torch {env.get('torch')}, transformers {env.get('transformers')}; "
        f"{_num(seconds.get('total'))} s in all. The full record: `run.json`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write ``README.md`` (the card of ``record``) into ``folder``; its path.

    Example:
        >>> write_model_card("out", record.to_dict())
        PosixPath('out/README.md')
    """
    path = Path(folder) / CARD
    path.write_text(model_card(record))
    return path
