"""The pipeline reproduces a committed benchmark row on the real default model: dense perplexity and
magnitude pruning at 30% (data-free, so no calibration pass) under the frontier's protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, Step, run_pipeline

pytestmark = pytest.mark.integration

FRONTIER = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "compress_frontier_cpu.json"


def test_pipeline_reproduces_the_frontiers_magnitude_row():
    committed = json.loads(FRONTIER.read_text())
    row = next(r for r in committed["results"] if r["label"] == "magnitude/uniform" and r["ratio"] == 0.3)
    protocol = committed["evaluation"]  # austen, last 4,096 tokens, 512-token windows
    config = PipelineConfig(
        model=committed["model"],
        steps=[Step("magnitude", {"ratio": 0.3})],
        evaluation=PerplexityProtocol(corpus=protocol["corpus"], max_tokens=protocol["n_tokens"], window=512),
    )
    record = run_pipeline(config, progress=False)
    assert record.protocol["n_windows"] == protocol["n_windows"]
    assert record.perplexity_before == pytest.approx(committed["dense"]["perplexity"], rel=1e-5)
    assert record.perplexity_after == pytest.approx(row["perplexity"], rel=1e-4)
    assert record.parameters_after["total"] == row["parameters"]["total"]
