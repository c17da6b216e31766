"""The report's MoE section: routing of MoE models, the published moefication frontier for dense ones."""

from __future__ import annotations

import json

import pytest
import torch

from ffnkit.core.archs import find_ffns
from ffnkit.data import Corpus
from ffnkit.report import moe_section
from ffnkit.report.build import SECTIONS, ReportContext
from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer


def _ctx(family: str, tmp_path, name: str = "tiny") -> ReportContext:
    model = tiny_model(family)
    text = {"cal": SAMPLE_TEXT[:20000], "eval": SAMPLE_TEXT[20000:]}
    corpus = Corpus("sample", text, ["cal"], ["eval"], "inline", "CC0")
    return ReportContext(name, model, tiny_tokenizer(), find_ffns(model), corpus, tmp_path, 2, 16, False)


def test_section_is_registered():
    assert dict(SECTIONS.items())["moe"] is moe_section.section_moe


def test_moe_model_gets_routing_plots_and_busiest_experts(tmp_path):
    ctx = _ctx("qwen2_moe", tmp_path)
    title, body = moe_section.section_moe(ctx)
    doc = ctx.json["moe"]
    assert title == "Mixture of experts" and body.count("data:image/png") == 2
    assert (tmp_path / "moe_load.png").stat().st_size > 0 and (
        tmp_path / "moe_balance.png"
    ).stat().st_size > 0
    assert doc["calibration"]["tokens"] == 32 and [r["layer"] for r in doc["layers"]] == [0, 1]
    for row in doc["layers"]:
        assert sum(row["load"]) == pytest.approx(row["top_k"]) and "coselection" not in row
    busiest = doc["busiest_experts"]["experts"]
    assert len(busiest) == 2 * moe_section.BUSIEST
    for row in doc["layers"]:  # the listed experts are each layer's most loaded
        listed = [b["load"] for b in busiest if b["layer"] == row["layer"]]
        assert listed == sorted(row["load"], reverse=True)[: moe_section.BUSIEST]
    json.dumps(doc)


def test_dense_model_without_a_published_frontier_gets_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(moe_section, "RESULTS", tmp_path / "none")
    ctx = _ctx("llama", tmp_path)
    title, body = moe_section.section_moe(ctx)
    assert ctx.json["moe"] is None and "no published moefication frontier" in body


def test_dense_model_shows_the_published_frontier_with_its_machine(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    doc = {
        "model": "tiny",
        "machine": "test-box (2 cores)",
        "command": "python benchmarks/moe_frontier.py",
        "dense": {"perplexity": 36.3},
        "results": [
            {"split": "kmeans", "router": "mlp", "active": 0.5, "perplexity": 45.0},
            {"split": "kmeans", "router": "mlp", "active": 0.25, "perplexity": 80.0},
            {"split": "random", "router": "centroid", "active": 0.5, "perplexity": 60.0},
            {"split": "random", "router": "centroid", "active": 0.5, "perplexity": 55.0, "refit": True},
            {"split": "random", "note": "no numbers"},
        ],
    }
    (results / "moe_frontier_cpu.json").write_text(json.dumps(doc))
    (results / "moe_frontier_other.json").write_text(json.dumps({**doc, "model": "another-model"}))
    monkeypatch.setattr(moe_section, "RESULTS", results)
    ctx = _ctx("llama", tmp_path)
    _, body = moe_section.section_moe(ctx)
    (entry,) = ctx.json["moe"]["published_frontiers"]  # the other model's frontier is not shown
    assert entry["machine"] == "test-box (2 cores)" and entry["dense"] == 36.3
    assert entry["curves"] == {
        "kmeans/mlp": {0.5: 45.0, 0.25: 80.0},
        "random/centroid": {0.5: 60.0},
        "random/centroid+refit": {0.5: 55.0},  # a refitted row of the same plan is its own curve
    }
    assert "Published result" in body and "test-box" in body
    assert (tmp_path / "moe_frontier_cpu.png").is_file()


def test_activation_statistics_of_an_all_moe_model_skip_every_layer(tmp_path):
    from ffnkit.report.stats import activation_stats

    ctx = _ctx("olmoe", tmp_path)
    rows = activation_stats(ctx.model, ctx.ffns, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert [(r["index"], r["kind"]) for r in rows] == [(0, "moe"), (1, "moe")]
