"""Issue 11 item 7: NaN and ±inf are refused for every float option and config field, and every
``--json`` document is strict JSON (a non-finite result becomes null with a note)."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from ffnkit.cli.common import print_json
from ffnkit.compress.prune import PruneConfig
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.steering import ConceptConfig, NeuronEdit
from ffnkit.train.heal import HealConfig
from tests.reliability.cli import ffnkit, one_line_error


def _strict(text: str):
    """json.loads that refuses NaN/Infinity, as every JSON parser outside Python does."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "args",
    [
        ["steer", "neurons", "--prompt", "hi", "--neurons", "1", "--set", "nan"],
        ["steer", "neurons", "--prompt", "hi", "--neurons", "1", "--scale", "inf"],
        ["steer", "concept", "--words", "king", "--value", "nan"],
        ["steer", "concept", "--words", "king", "--scale", "-inf"],
        ["inspect", "early-exit", "--target", "nan"],
        ["compress", "--method", "flap", "--ratio", "0.1", "--heal", "--heal-minutes", "inf", "-o", "x"],
    ],
    ids=["set-nan", "scale-inf", "concept-value-nan", "concept-scale-ninf", "early-exit-nan", "heal-inf"],
)
def test_cli_refuses_non_finite_floats(args: list[str], tiny_folder: Path, tmp_path: Path) -> None:
    cmd, *rest = args
    sub = [rest.pop(0)] if cmd in ("steer", "inspect") else []
    run = ffnkit(cmd, *sub, str(tiny_folder), *rest, cwd=tmp_path)
    message = one_line_error(run)
    assert "finite" in message
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "build",
    [
        lambda: HealConfig(max_minutes=math.inf),
        lambda: HealConfig(lr=math.nan),
        lambda: PruneConfig.from_dict({"method": "flap", "ratio": math.nan}),
        lambda: ConceptConfig(words=["king"], value=math.nan),
        lambda: NeuronEdit(layer=0, neurons=[1], op="set", value=math.inf),
    ],
    ids=["heal-minutes", "heal-lr", "prune-ratio", "concept-value", "neuron-edit"],
)
def test_configs_refuse_non_finite_fields(build) -> None:
    with pytest.raises(InvalidArgumentError, match="finite"):
        build()


def test_print_json_is_strict_and_notes_non_finite_results() -> None:
    buf = io.StringIO()
    with redirect_stdout(buf):
        print_json({"perplexity": math.inf, "layers": [{"loss": math.nan}, {"loss": 1.5}]})
    doc = _strict(buf.getvalue())
    assert doc["perplexity"] is None and doc["layers"][0]["loss"] is None and doc["layers"][1]["loss"] == 1.5
    assert sorted(doc["non_finite"]) == ["layers[0].loss: nan", "perplexity: inf"]
