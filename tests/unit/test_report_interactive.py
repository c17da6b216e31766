"""The report page: sortable/searchable tables, a panel per concept neuron with a quality flag, text
escaped, the frontier shown only as published results on the report's corpus (skipped otherwise)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from ffnkit.report import frontier, html
from ffnkit.report.concepts_section import match_flag, match_share
from ffnkit.report.inspect_sections import CONCEPTS
from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    from ffnkit.report import build_report

    root = tmp_path_factory.mktemp("report")
    corpus = root / f"{HOSTILE}.txt"  # a file name is data: it must reach the page escaped
    corpus.write_text(SAMPLE_TEXT)
    out = root / "out"
    doc = build_report(
        "tiny-llama",
        out,
        corpus=str(corpus),
        samples=2,
        seq_len=16,
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
        progress=False,
    )
    return {"doc": doc, "page": (out / "report.html").read_text(), "out": out}


def test_tables_are_sortable_and_searchable_and_the_page_is_self_contained(built):
    page = built["page"]
    assert page.count("<table class='ffk-sort'>") >= 3  # FFN table, activations, concepts, …
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    assert "addEventListener('click'" in script and "ffk-search" in script
    assert "innerHTML" not in script  # the sorter moves rows; it never parses cell text as HTML
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page)  # nothing fetched from elsewhere


def test_text_from_data_is_escaped(built):
    page = built["page"]
    assert HOSTILE not in page
    assert html.esc(HOSTILE) in page


def test_every_concept_has_a_panel_with_projection_contexts_and_a_quality_flag(built):
    page, concepts = built["page"], built["doc"]["concept_neurons"]["concepts"]
    assert set(concepts) == set(CONCEPTS)
    for name, entry in concepts.items():
        assert f"id='concept-{name}'" in page
        assert len(entry["promoted"]) == 10 and len(entry["suppressed"]) == 10
        # the flag by its rule, recomputed here from the tokens and the words
        tokens = {t["token"].lstrip(" Ġ▁") for t in entry["promoted"]}
        share = sum(w in tokens for w in CONCEPTS[name]) / len(CONCEPTS[name])
        assert entry["match_share"] == share
        assert entry["quality"] == ("match" if share >= 0.5 else "partial" if share >= 0.25 else "weak")
    assert page.count("<details class='neuron'") == len(CONCEPTS)
    assert built["doc"]["concept_neurons"]["match_rule"]


def test_match_rule_flags_the_published_failures():
    # top-10 promoted tokens of smollm2-135m's best neurons for "months" and "numbers" (layer 29/896 and
    # 22/935, read off `ffnkit inspect search`): may/might is not the month May; two/three/four/five are numbers
    months = [" may", "may", " might", " May", "might", "May", " Might", "possibly", " probably", "probably"]
    numbers = [" two", " three", " four", "two", " Two", "three", " Three", "Three", "Two", " five"]
    as_tokens = lambda xs: [{"token": t} for t in xs]  # noqa: E731
    months_share = match_share(CONCEPTS["months"], as_tokens(months))
    assert months_share == 1 / 6 and match_flag(months_share) == "weak"  # only " May" (capitalised)
    numbers_share = match_share(CONCEPTS["numbers"], as_tokens(numbers))
    assert numbers_share == 4 / 6 and match_flag(numbers_share) == "match"
    assert match_flag(2 / 6) == "partial"


def _ctx(tmp_path: Path, model: str, corpus: str) -> SimpleNamespace:
    return SimpleNamespace(model_name=model, corpus=SimpleNamespace(name=corpus), out_dir=tmp_path, json={})


def test_frontier_is_published_results_on_the_report_corpus_or_skipped(tmp_path, monkeypatch):
    if not any((frontier.RESULTS / f).is_file() for f in frontier.FILES):
        pytest.skip("no benchmark results in this tree")
    ctx = _ctx(tmp_path, "smollm2-135m", "austen")
    _, body = frontier.section_frontier(ctx)
    assert "Published in benchmarks/results" in body and "machine:" in body
    assert "dequantised" in body and ctx.json["frontier"]["corpus"] == "austen"
    files = [json.loads((frontier.RESULTS / Path(f).name).read_text()) for f in ctx.json["frontier"]["files"]]
    assert all(d.get("evaluation", {}).get("corpus", "austen") == "austen" for d in files)
    # another corpus: skipped, one corpus per report
    ctx = _ctx(tmp_path, "smollm2-135m", "shakespeare")
    _, body = frontier.section_frontier(ctx)
    assert "Skipped" in body and "one corpus" in body and "skipped" in ctx.json["frontier"]
    # after pip install (no benchmarks/results): skipped, saying where it lives
    monkeypatch.setattr(frontier, "RESULTS", tmp_path / "absent")
    ctx = _ctx(tmp_path, "smollm2-135m", "austen")
    _, body = frontier.section_frontier(ctx)
    assert "Skipped" in body and "pip install" in body


def test_dense_baseline_of_the_default_model_is_labelled(built):
    assert built["doc"]["perplexity"]["dense_note"] is None  # not the default model: no note
    from ffnkit.sources.models import DEQUANTISED_NOTE

    assert "4-bit" in DEQUANTISED_NOTE and "dequantised" in DEQUANTISED_NOTE


FAKE_DOM = """
function el(text){ return {textContent:text}; }
function row(cells){ return {cells:cells.map(el), style:{}, get textContent(){return cells.join(' ');}}; }
var head={cells:[], style:{}};
var table={rows:[], parentNode:{insertBefore:function(box){ global.box=box; }}};
['name','value'].forEach(function(h){
  var th={textContent:h, listeners:{}, cls:new Set(),
    addEventListener:function(e,f){this.listeners[e]=f;},
    classList:{add:function(){for(var a of arguments) th.cls.add(a);}, remove:function(){for(var a of arguments) th.cls.delete(a);},
               contains:function(a){return th.cls.has(a);}}};
  th.classList.th=th; head.cells.push(th);
});
head.cells.forEach(function(th){ var t=th; t.classList={add:function(){for(var a of arguments) t.cls.add(a);},
  remove:function(){for(var a of arguments) t.cls.delete(a);}, contains:function(a){return t.cls.has(a);}}; });
var body=[['a','10'],['b','9'],['c','1e+03'],['d',''],['e','2,000'],['f','x'],['g','3']].map(row);
var parent={appendChild:function(r){ table.rows.splice(table.rows.indexOf(r),1); table.rows.push(r); }};
body.forEach(function(r){ r.parentNode=parent; });
table.rows=[head].concat(body);
global.document={querySelectorAll:function(){return [table];},
  createElement:function(){ return {addEventListener:function(e,f){this.f=f;}}; }};
eval(SCRIPT);
function order(){ return table.rows.slice(1).map(function(r){return r.cells[0].textContent;}).join(''); }
head.cells[1].listeners.click(); var up=order();
head.cells[1].listeners.click(); var down=order();
box.value='b'; box.f(); var shown=table.rows.slice(1).filter(function(r){return r.style.display!=='none';}).length;
console.log(JSON.stringify({up:up, down:down, shown:shown}));
"""


def test_the_sorter_orders_numbers_as_numbers_and_the_search_filters_rows(tmp_path):
    import shutil
    import subprocess

    from ffnkit.report.interactive import SCRIPT

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    js = tmp_path / "sorter.js"
    js.write_text(f"var SCRIPT = {json.dumps(SCRIPT)};\n{FAKE_DOM}")
    run = subprocess.run(["node", str(js)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    # ascending: 3 < 9 < 10 < 1e3 < 2,000 (numbers), then text (x), then the empty cell
    assert got["up"] == "gbacefd"
    assert got["down"] == "fecabgd"  # descending flips the order; the empty cell stays last
    assert got["shown"] == 1  # typing "b" keeps the rows whose text contains it
