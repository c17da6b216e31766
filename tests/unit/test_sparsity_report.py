"""The report's sparsity section reads the benchmark JSON's shape."""

from __future__ import annotations

from ffnkit.report.sparsity_section import frontier_rows


def test_frontier_rows_show_every_rule_and_level():
    ev = {"perplexity": 40.0, "perplexity_vs_dense": 1.05, "bytes_skipped": 0.41}
    doc = {
        "results": [
            {"rule": "teal", "sparsity": 0.4, "evaluation": {"austen": ev}},
            {"rule": "best", "sparsity": 0.4, "evaluation": {"austen": {**ev, "perplexity": 39.0}}},
            {"rule": "cats", "sparsity": 0.8, "error": "at most 67%"},
        ]
    }
    rows, columns = frontier_rows(doc, "austen")
    assert columns == ["40%", "80%"]
    assert [r["rule"] for r in rows] == ["teal", "best", "cats"]
    assert rows[1]["40%"].startswith("39.00 (×1.050, 41%)") and rows[2]["80%"] == "n/a"
