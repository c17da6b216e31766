"""Headless screenshots of the report page (docs/report-*.png): sorting, search, a concept panel.

Needs playwright (``pip install playwright``) and a Chromium: playwright's own download, or a system one
given with ``--chromium /usr/bin/chromium`` (Debian's ``chromium`` package). Builds the report first
unless ``--report DIR`` names one already built; ``--skip`` leaves sections out to save time.

    PYTHONPATH=src python scripts/report_screenshots.py --model smollm2-135m --corpus austen \\
        --samples 4 --seq-len 128 --skip importance --chromium /usr/bin/chromium --out docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build(args: argparse.Namespace) -> Path:
    from ffnkit.report import build_report
    from ffnkit.report.build import SECTIONS

    for name in args.skip.split(",") if args.skip else []:
        SECTIONS.unregister(name)
    out = Path(args.build_dir)
    build_report(args.model, out, corpus=args.corpus, samples=args.samples, seq_len=args.seq_len)
    (out / "screenshots.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    return out


def shoot(report: Path, out: Path, chromium: str | None) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as p:
        kwargs = {"executable_path": chromium, "args": ["--no-sandbox"]} if chromium else {}
        browser = p.chromium.launch(**kwargs)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto((report / "report.html").resolve().as_uri())
        shots.append(out / "report-top.png")
        page.screenshot(path=shots[-1])
        # the activations table, sorted by mean firing rate (descending: two clicks)
        table = page.locator("h2:has-text('Activations') ~ table.ffk-sort").first
        header = table.locator("th", has_text="mean_firing_rate")
        header.click()
        header.click()
        shots.append(out / "report-sorted.png")
        table.screenshot(path=shots[-1])
        # the search box above the FFN table filters rows
        box = page.locator("h2:has-text('FFN blocks') ~ input.ffk-search")
        if box.count():  # tables of more than 6 rows have one
            box.first.fill("layers.1")
            shots.append(out / "report-search.png")
            page.locator("h2:has-text('FFN blocks') ~ table.ffk-sort").first.screenshot(path=shots[-1])
        # concept neurons: the summary with its quality flags, and the "months" panel opened
        for name in ("months", "numbers"):
            panel = page.locator(f"#concept-{name}")
            if panel.count():
                panel.locator("summary").click()
                shots.append(out / f"report-concept-{name}.png")
                panel.screenshot(path=shots[-1])
        concepts = page.locator("h2:has-text('Concept neurons') ~ table.ffk-sort").first
        if concepts.count():
            shots.append(out / "report-concepts.png")
            concepts.screenshot(path=shots[-1])
        browser.close()
    return shots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="austen")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--skip", default="", help="comma list of report sections to leave out")
    ap.add_argument("--report", default=None, help="an already built report folder")
    ap.add_argument("--build-dir", default="ffnkit-report-screens")
    ap.add_argument("--chromium", default=None, help="a Chromium binary (default: playwright's)")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    report = Path(args.report) if args.report else build(args)
    for path in shoot(report, Path(args.out), args.chromium):
        print(path)


if __name__ == "__main__":
    main()
