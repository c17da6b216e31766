"""The pipeline on a tiny saved model: config JSON round trip, early errors, and a full run whose record
matches independent measurements (perplexity by ffnkit.evaluate, the saved folder reloaded)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.pipeline import (
    PerplexityProtocol,
    PipelineConfig,
    Step,
    evaluation_set,
    measure,
    run_pipeline,
    run_step,
    step_config,
)
from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    return {"root": root, "model": model_dir, "corpus": corpus}


def test_config_json_round_trip():
    config = PipelineConfig(
        model="m",
        steps=[Step("flap", {"ratio": 0.2, "allocation": "global"}), Step("quantize", {"bits": 8})],
        corpus="austen",
        evaluation=PerplexityProtocol(corpus="shakespeare", max_tokens=1024, window=256),
        heal={"max_minutes": 1.0},
        output="out",
    )
    again = PipelineConfig.from_dict(json.loads(config.to_json()))
    assert again == config and isinstance(again.steps[1], Step)
    assert isinstance(again.evaluation, PerplexityProtocol) and again.evaluation.window == 256
    assert PipelineConfig.from_dict(json.loads(PipelineConfig(evaluation=None).to_json())).evaluation is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"steps": [{"method": "nope"}]}, "svd-llm"),  # unknown method lists the methods
        ({"steps": [{"method": "flap", "config": {"rank": 3}}]}, "allocation"),  # lists flap's settings
        ({"steps": [{"method": "flap", "config": {"ratio": 1.5}}]}, "ratio"),
        ({"steps": [{"method": "best", "config": {"allocation": "uniform"}}]}, "fixes"),
        ({"heal": {"max_minutes": 0}}, "max_minutes"),
        ({"heal": {"nope": 1}}, "nope"),
        ({"evaluation": {"window": 1}}, "window"),
    ],
)
def test_bad_settings_fail_when_the_config_is_made(kwargs, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        PipelineConfig(**kwargs)


def test_steps_inherit_the_corpus_unless_they_set_one():
    assert step_config(Step("svd-llm", {}), "austen").corpus == "austen"
    assert step_config(Step("svd-llm", {"corpus": "x.txt"}), "austen").corpus == "x.txt"
    assert step_config(Step("svd-llm", {}), "austen").ratio == 0.3  # the method's default
    assert step_config(Step("svd-llm", {"rank": 4}), "austen").ratio is None  # rank displaces it
    assert step_config(Step("best", {"ratio": 0.2})).allocation == "sensitivity"  # prune.BEST


def test_run_records_what_independent_measurements_say(saved):
    from ffnkit import io
    from ffnkit.data import evaluation_tokens, load_corpus
    from ffnkit.evaluate import perplexity
    from ffnkit.sources.models import load_model

    out = saved["root"] / "out"
    config = PipelineConfig(
        model=str(saved["model"]),
        steps=[Step("magnitude", {"ratio": 0.25}), Step("svd", {"ratio": 0.2, "matrices": ["out"]})],
        corpus=str(saved["corpus"]),
        evaluation=PerplexityProtocol(max_tokens=200, window=32),
        heal={"steps": 2, "samples": 4, "seq_len": 16, "batch_size": 2},
        output=str(out),
        measure_before_heal=True,
    )
    stages = []
    record = run_pipeline(config, progress=False, command="test", on_stage=lambda s, i: stages.append(s))
    assert stages == [
        "load",
        "measure_before",
        "step",
        "step",
        "measure_before_heal",
        "heal",
        "measure_after",
        "save",
    ]

    # before: the original model measured directly with the same protocol
    original, tok = load_model(str(saved["model"]))
    tokens = evaluation_tokens(load_corpus(str(saved["corpus"])), tok, max_tokens=200)
    assert record.perplexity_before == pytest.approx(
        perplexity(original, tokens, window=32).perplexity, rel=1e-6
    )
    assert record.protocol["window"] == 32 and record.protocol["n_tokens"] == 200
    # after: the saved folder reloaded gives the recorded perplexity (what was measured is what was saved)
    loaded, _ = io.load(out)
    assert record.perplexity_after == pytest.approx(
        perplexity(loaded, tokens, window=32).perplexity, rel=1e-6
    )
    assert record.perplexity_after != record.perplexity_before

    assert [s.method for s in record.steps] == ["magnitude", "svd"]
    assert record.steps[0].config["method"] == "magnitude" and record.steps[0].config["corpus"] == str(
        saved["corpus"]
    )
    assert record.steps[1].config["matrices"] == ["out"] and record.steps[1].report["transform"] == "lowrank"
    assert record.heal["steps"] == 2 and record.heal["config"]["corpus"] == str(saved["corpus"])
    assert record.parameters_after["ffn"] < record.parameters_before["ffn"]
    stage_seconds = {
        "load",
        "measure_before",
        "steps",
        "measure_before_heal",
        "heal",
        "measure_after",
        "save",
    }
    assert set(record.seconds) == stage_seconds | {"total"}
    # the same steps without healing end where the healed run measured before healing
    unhealed = run_pipeline(
        replace(config, heal=None, output=None, measure_before_heal=False), progress=False
    )
    assert unhealed.perplexity_after == record.perplexity_before_heal != record.perplexity_after
    assert unhealed.perplexity_before_heal is None and "save" not in unhealed.seconds
    assert record.environment["torch"] == torch.__version__ and record.command == "test"
    # the run record is saved next to the model, and the saved reports hold every step and the healing
    assert json.loads((out / "run.json").read_text()) == json.loads(json.dumps(record.to_dict(), default=str))
    transforms = [r["transform"] for r in loaded.ffnkit_reports]
    assert transforms.count("prune") == 1 and transforms.count("lowrank") == 1 and "heal" in transforms
    assert PipelineConfig.from_dict(record.config) == config


def test_stage_functions_share_precomputed_inputs(saved):
    """What the benchmarks do: measure once, run steps with statistics collected once."""
    from ffnkit.compress.scores import collect_stats
    from ffnkit.sources.models import load_model

    model, tok = load_model(str(saved["model"]))
    ev = evaluation_set(PerplexityProtocol(max_tokens=100, window=25), tok, str(saved["corpus"]))
    dense = measure(model, ev)
    ids = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, ids)
    import copy

    a, b = copy.deepcopy(model), copy.deepcopy(model)
    rec_a, _ = run_step(a, Step("wanda-sp", {"ratio": 0.3}), calibration=ids, stats=stats)
    rec_b, _ = run_step(b, Step("wanda-sp", {"ratio": 0.3}), calibration=ids)  # collects the same itself
    assert rec_a.report["layers"] == rec_b.report["layers"]
    assert measure(a, ev).perplexity == measure(b, ev).perplexity != dense.perplexity
    assert measure(a).perplexity is None and measure(a).parameters == rec_a.report["parameters_after"]


def test_a_step_that_cannot_apply_fails_before_any_measuring(monkeypatch):
    import ffnkit.pipeline as pipeline

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured before the step was checked")

    monkeypatch.setattr(pipeline, "measure", no_measuring)
    model = tiny_model("llama")
    d_ff = model.config.intermediate_size
    bad = next(e for e in range(3, d_ff) if d_ff % e)  # experts that do not divide d_ff
    config = PipelineConfig(steps=[Step("moefy", {"experts": bad, "split": "random", "router": "centroid"})])
    with pytest.raises(InvalidArgumentError, match="do not divide"):
        run_pipeline(config, model=model, tokenizer=tiny_tokenizer())
