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


def test_section_reports_the_latest_rows_of_every_published_file():
    import json
    from types import SimpleNamespace

    from ffnkit.report.sparsity_section import RESULT, RESULT_FIXES, section_sparsity

    ctx = SimpleNamespace(model_name="smollm2-135m", json={})
    _, page = section_sparsity(ctx)
    got = ctx.json["sparsity_frontier"]
    present = [p for p in (RESULT, *RESULT_FIXES) if p.is_file()]
    assert got["files"] == [f"benchmarks/results/{p.name}" for p in present]
    # every (rule, level) shows the value of the last file that has it
    want: dict = {}
    for path in present:
        for r in json.loads(path.read_text()).get("results", []):
            for corpus, ev in r.get("evaluation", {}).items():
                want.setdefault(corpus, {}).setdefault(str(r["sparsity"]), {})[r["rule"]] = ev[
                    "perplexity_vs_dense"
                ]
    assert got["vs_dense"] == want
    assert all(p.name in page for p in present)
