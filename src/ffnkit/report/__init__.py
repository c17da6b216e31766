"""The HTML + JSON report (``ffnkit report``)."""

from ffnkit.report.build import SECTIONS, build_report

__all__ = ["SECTIONS", "build_report"]
