"""The app's evaluation tab: an `otclip eval` JSON or the partial-pairs report as Markdown tables and plots."""

from __future__ import annotations

import json
from pathlib import Path


def report_markdown(report: Path | None) -> str:
    if report is None:
        return ("Start the app with `--report PATH` (an `otclip eval` JSON or the partial-pairs report) "
                "to compare models here.")
    report = Path(report)
    markdown = report.with_suffix(".md")
    if markdown.exists():  # `otclip eval --md` and the partial-pairs experiment write one beside the JSON
        return markdown.read_text()
    return report_tables(json.loads(report.read_text()))


def report_plots(report: Path | None) -> list[str]:
    if report is None:
        return []
    report = Path(report)
    listed = json.loads(report.read_text()).get("plots")  # the experiment lists its plots' file names
    if listed:
        paths = [report.parent / Path(name).name for name in listed]
        return [str(path) for path in paths if path.exists()]
    return sorted(str(p) for p in report.parent.glob(f"{report.stem}-*.png"))


def report_tables(data: dict) -> str:
    """A report's metrics as Markdown: each {metric: number} block is a row of one table, and each
    {name: {metric: number}} block a table of its own."""
    def numeric(d) -> bool:  # None is a metric that could not be measured
        return isinstance(d, dict) and d and all(v is None or isinstance(v, (int, float)) for v in d.values())

    def cell(v) -> str:
        return "n/a" if v is None else str(v) if isinstance(v, int) else f"{v:.3f}"  # a count is not a ratio

    rows = {k: v for k, v in data.items() if numeric(v)}
    out = []
    if rows:
        metrics = list(dict.fromkeys(m for v in rows.values() for m in v))
        out += ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        out += [f"| {k.replace('_', ' ')} | " + " | ".join(cell(v[m]) if m in v else "" for m in metrics) + " |"
                for k, v in rows.items()]
        out.append("")
    for section, block in data.items():
        if isinstance(block, dict) and block and all(numeric(v) for v in block.values()):
            out.append(f"### {section.replace('_', ' ')}\n")
            out.append(report_tables(block))
    return "\n".join(out) or "The report has no metric tables."
