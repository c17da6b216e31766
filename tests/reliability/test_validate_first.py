"""Issue 11 item 9: every option is validated before the model is loaded (or, for bounds that need the
model's size, before any corpus or forward pass). A missing model or corpus is passed on purpose: a
check that runs first names the option; one that runs after the work would report the missing input."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.cli import ffnkit, one_line_error

NO_MODEL = "/nonexistent/ffnkit-model"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["inspect", "early-exit", NO_MODEL, "--target", "1.5"], "--target"),
        (["inspect", "early-exit", NO_MODEL, "--target", "0"], "--target"),
        (["inspect", "neurons", NO_MODEL, "--layer", "0", "--neurons", "-1"], "--neurons"),
        (["inspect", "neurons", NO_MODEL, "--layer", "-1"], "--layer"),
        (["inspect", "stats", NO_MODEL, "--layer", "-1"], "--layer"),
        (["steer", "neurons", NO_MODEL, "-p", "hi", "-n", "1", "--zero", "--layer", "-1"], "--layer"),
        (["inspect", "neurons", NO_MODEL, "--layer", "5-2"], "backwards"),
        (["inspect", "spectral", NO_MODEL, "--layer", "5-2"], "backwards"),
        (["inspect", "neurons", NO_MODEL, "--vocab-chunk", "-5"], "--vocab-chunk"),
        (["inspect", "stats", NO_MODEL, "--window", "-3"], "--window"),
        (["eval", NO_MODEL, "--window", "-3"], "--window"),
        (["steer", "concept", NO_MODEL, "--words", "king", "--n-neurons", "0"], "--n-neurons"),
        (["inspect", "trace", NO_MODEL, "-p", "hi", "--target", ""], "--target"),
        (["inspect", "trace", NO_MODEL, "-p", "hi", "--target", "New York"], "one word"),
        (["inspect", "trace", NO_MODEL, "-p", "hi", "--target", "Thursday,,Friday"], "empty item"),
        (["inspect", "trace", NO_MODEL, "-p", "hi", "--target", "Thursday,New York"], "one word"),
        (["models", "show", NO_MODEL, "--dtype", "float8"], "--dtype"),
        (["compress", NO_MODEL, "-o", "x", "--save-dtype", "auto"], "--save-dtype"),
    ],
    ids=lambda v: v if isinstance(v, str) else "_".join(v[:2] + v[3:]),
)
def test_bad_option_is_refused_before_loading(args: list[str], needle: str) -> None:
    message = one_line_error(ffnkit(*args))
    assert needle in message, message
    assert "nonexistent" not in message  # the option was checked first


def test_n_neurons_above_the_model_size_names_the_range(tiny_folder: Path) -> None:
    # the corpus does not exist: the old code loaded it (and searched) before noticing anything
    run = ffnkit("steer", "concept", str(tiny_folder), "--words", "king", "--n-neurons", "999999",
                 "--corpus", "/nonexistent/corpus.txt")  # fmt: skip
    message = one_line_error(run)
    assert "--n-neurons" in message and "1–96" in message  # 2 layers × d_ff 48


def test_experts_on_a_dense_model_is_an_error(tiny_folder: Path) -> None:
    message = one_line_error(ffnkit("inspect", "neurons", str(tiny_folder), "--layer", "0", "--experts", "1"))
    assert "--experts" in message and "mixture-of-experts" in message


def test_valid_ranges_still_work(tiny_folder: Path) -> None:
    run = ffnkit("inspect", "neurons", str(tiny_folder), "--layer", "0-1", "--neurons", "0,2-3", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"neuron": 3' in run.stdout
