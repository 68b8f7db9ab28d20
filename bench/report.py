"""Presenting a run: the text table (absolute figures per column, then the ratios, then each target's
verdict), the machine-readable JSON, and the comparison chart (`--plot`, needs matplotlib from the
`bench` extra).

It must never present a skipped column as a number: skips are footnoted with their reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.results import COLUMNS, ScenarioResult, Target


def _figure(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def render_table(results: list[ScenarioResult], header: list[str]) -> str:
    rows: list[list[str]] = []
    footnotes: list[str] = []
    reasons: dict[str, int] = {}

    def mark(reason: str) -> str:
        if reason not in reasons:
            reasons[reason] = len(reasons) + 1
            footnotes.append(f"  [{reasons[reason]}] {reason}")
        return f"skip[{reasons[reason]}]"

    for result in results:
        if result.error:
            rows.append([result.title, "FAILED", mark(result.error), "", "", "", "", ""])
            continue
        judged: dict[str, list[Target]] = {}
        for target in result.targets:
            judged.setdefault(target.metric, []).append(target)
        for index, metric in enumerate(result.metrics):
            cells = [result.title if index == 0 else "", f"{metric.label} ({metric.unit})"]
            for name in COLUMNS:
                column = result.columns.get(name)
                if column is None:
                    cells.append("n/a")
                elif column.skipped:
                    cells.append(mark(column.skipped))
                else:
                    cells.append(_figure(column.values.get(metric.key)))
            cells.append(_ratio(result.ratio(metric.key, "nginx")))
            cells.append(_ratio(result.ratio(metric.key, "direct")))
            verdicts = []
            for target in judged.get(metric.key, []):
                met = target.judge(result)[1]
                verdicts.append(f"{target.text}: {'not judged' if met is None else ('met' if met else 'MISSED')}")
            cells.append("; ".join(verdicts))
            rows.append(cells)
        busy = "  ".join(f"core{core} {share:.0%}" for core, share in sorted(result.core_busy.items()))
        if busy:
            rows.append(["", f"  cores busy: {busy}", "", "", "", "", "", ""])
    titles = ["scenario", "metric", "direct", "gateway", "nginx", "gw/nginx", "gw/direct", "target"]
    widths = [max(len(r[i]) for r in [titles, *rows]) for i in range(len(titles))]
    widths[1] = max(len(r[1]) for r in [titles, *rows] if not r[1].startswith("  cores busy"))

    def line(cells: list[str]) -> str:
        if cells[1].startswith("  cores busy"):
            return (" " * (widths[0] + 2) + cells[1]).rstrip()
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if i < 2 or i == 7 else cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    text = [*header, "", line(titles), line(["-" * w for w in widths])]
    text += [line(r) for r in rows]
    if footnotes:
        text += ["", "Skipped or failed:", *footnotes]
    notes = [f"  {r.title}: {note}" for r in results for note in r.notes]
    if notes:
        text += ["", "Notes:", *notes]
    return "\n".join(text)


def write_json(path: Path, results: list[ScenarioResult], run: dict[str, Any]) -> None:
    document = {"run": run, "scenarios": [r.to_json() for r in results]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def write_plot(path: Path, results: list[ScenarioResult]) -> str | None:
    """Draw gateway/nginx and gateway/direct ratios per metric; the reason when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    labels: list[str] = []
    to_nginx: list[float] = []
    to_direct: list[float] = []
    for result in results:
        for metric in result.metrics:
            nginx, direct = result.ratio(metric.key, "nginx"), result.ratio(metric.key, "direct")
            if nginx is None and direct is None:
                continue
            # Show every ratio as "higher is better for the gateway" so bars read the same way.
            flip = (lambda r: 1 / r if r else math.nan) if not metric.higher_is_better else (lambda r: r)
            labels.append(f"{result.name}\n{metric.label}")
            to_nginx.append(flip(nginx) if nginx is not None else math.nan)
            to_direct.append(flip(direct) if direct is not None else math.nan)
    if not labels:
        return "no scenario has ratios to draw (every comparison column was skipped)"
    figure, axes = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 5))
    positions = range(len(labels))
    axes.bar([p - 0.2 for p in positions], to_nginx, width=0.4, label="gateway vs nginx")
    axes.bar([p + 0.2 for p in positions], to_direct, width=0.4, label="gateway vs direct")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(list(positions), labels, fontsize=7)
    axes.set_ylabel("gateway performance relative to the other column (>1: gateway better)")
    axes.set_title("ZLH bench: gateway relative to nginx and to direct, same run")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None
