"""Render the report JSON as one self-contained HTML page (images inlined as base64)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ffnkit.report import interactive

STYLE = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .note{color:#555;font-size:.9em} img{max-width:100%}
.kv td{text-align:left}
"""


def esc(x) -> str:
    """``x`` as HTML text: every name, token, prompt or path from the user or the data goes through this
    (a corpus file may be called ``<img src=x onerror=...>.txt``).

    Example:
        >>> esc("<b>")
        '&lt;b&gt;'
    """
    return html.escape(str(x), quote=True)


def table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            v = f"{v:.4g}" if isinstance(v, float) else v
            cells.append(f"<td>{esc(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    # every data table sorts by a click on its header and, when long, has a search box (interactive.py)
    return f"<table class='{interactive.TABLE_CLASS}'><tr>{head}</tr>{''.join(body)}</table>"


def key_values(d: dict) -> str:
    return (
        "<table class='kv'>"
        + "".join(
            f"<tr><th class='l'>{esc(k)}</th><td>{esc(f'{v:.4g}' if isinstance(v, float) else v)}</td></tr>"
            for k, v in d.items()
        )
        + "</table>"
    )


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<p><img alt='{esc(alt)}' src='data:image/png;base64,{data}'></p>"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """sections: (heading, html body) pairs, in order."""
    body = "".join(f"<h2>{esc(h)}</h2>\n{b}\n" for h, b in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{STYLE}{interactive.STYLE}</style></head><body><h1>{esc(title)}</h1>\n{body}"
        f"<script>{interactive.SCRIPT}</script></body></html>\n"
    )
