"""Issue 11 item 6: report.html escapes everything that comes from the user or the data (corpus and file
names, tokens, model names), so a hostile corpus file name cannot run script in the page."""

from __future__ import annotations

import shutil
from pathlib import Path

from ffnkit.report import html, interactive
from tests.reliability.cli import ffnkit
from tests.tiny_models import SAMPLE_TEXT

HOSTILE = "<img src=x onerror=alert(1)>"
TOKENS = "<script>alert(2)</script>"


def test_report_escapes_corpus_file_name_and_tokens(tiny_folder: Path, tmp_path: Path) -> None:
    corpus = tmp_path / f"{HOSTILE}.txt"  # a legal Linux file name: no slash
    corpus.write_text(f"{SAMPLE_TEXT}\n{TOKENS} {TOKENS}\n" * 3)
    model = tmp_path / f"m{HOSTILE}"  # the model name is the folder the user passed
    shutil.copytree(tiny_folder, model)
    out = tmp_path / "report"
    run = ffnkit(
        "report", str(model), "-o", str(out), "--corpus", str(corpus), "--samples", "2", "--seq-len", "16"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    page = (out / "report.html").read_text()
    own_script = f"<script>{interactive.SCRIPT}</script>"
    assert page.count(own_script) == 1  # the page's one script is ffnkit's own table sorter ...
    page = page.replace(own_script, "")  # ... and nothing from the data may add markup beside it
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # the name is shown, as text
    assert "<img src=x" not in page and "<script" not in page
    assert "onerror=alert(1)>" not in page


def test_html_helpers_escape_attributes_and_cells() -> None:
    cell = html.table([{"name": HOSTILE}], ["name"])
    kv = html.key_values({HOSTILE: TOKENS})
    title = html.page(HOSTILE, [(TOKENS, "")]).replace(f"<script>{interactive.SCRIPT}</script>", "")
    for text in (cell, kv, title):
        assert "<img" not in text and "<script" not in text
    assert html.esc("a'b\"c") == "a&#x27;b&quot;c"  # safe inside either attribute quote
