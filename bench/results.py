"""What one scenario measured: figures per column (direct to the agent, through the gateway, through
nginx), an explicit reason for every column it did not measure, the ratios computed from figures of
the same run, and the targets (issue 4) judged against them.

It must never fill a missing figure with a guess: a column is either measured or skipped with a
reason, and a target whose figures are missing is "not judged", never "met".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

COLUMNS = ("direct", "gateway", "nginx")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


@dataclass(frozen=True)
class Target:
    """`gateway.metric` compared with `against` (a column, or None for an absolute bound)."""

    metric: str
    text: str
    against: str | None
    bound: float
    at_least: bool

    def judge(self, result: ScenarioResult) -> tuple[float | None, bool | None]:
        """(the compared figure, met?) — both None when a figure is missing."""
        mine = result.value("gateway", self.metric)
        if mine is None:
            return None, None
        if self.against is None:
            figure = mine
        else:
            theirs = result.value(self.against, self.metric)
            if theirs is None or theirs == 0:
                return None, None
            figure = mine / theirs
        return figure, (figure >= self.bound if self.at_least else figure <= self.bound)


@dataclass
class Column:
    values: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class ScenarioResult:
    name: str
    title: str
    metrics: list[Metric]
    targets: list[Target] = field(default_factory=list)
    columns: dict[str, Column] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    core_busy: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def column(self, name: str) -> Column:
        return self.columns.setdefault(name, Column())

    def record(self, column: str, metric: str, value: float) -> None:
        self.column(column).values[metric] = value

    def skip(self, column: str, reason: str) -> None:
        self.column(column).skipped = reason

    def value(self, column: str, metric: str) -> float | None:
        found = self.columns.get(column)
        if found is None or found.skipped:
            return None
        value = found.values.get(metric)
        return None if value is None or math.isnan(value) else value

    def ratio(self, metric: str, against: str) -> float | None:
        mine, theirs = self.value("gateway", metric), self.value(against, metric)
        if mine is None or not theirs:
            return None
        return mine / theirs

    def to_json(self) -> dict[str, Any]:
        columns: dict[str, Any] = {}
        for name in COLUMNS:
            column = self.columns.get(name)
            if column is None:
                columns[name] = {"skipped": "not measured by this scenario"}
            elif column.skipped:
                columns[name] = {"skipped": column.skipped}
            else:
                columns[name] = dict(column.values)
        targets = []
        for target in self.targets:
            figure, met = target.judge(self)
            targets.append({"metric": target.metric, "target": target.text, "against": target.against,
                            "figure": figure, "met": met})
        return {
            "name": self.name,
            "title": self.title,
            "seconds": round(self.seconds, 2),
            "error": self.error,
            "metrics": [{"key": m.key, "label": m.label, "unit": m.unit,
                         "higherIsBetter": m.higher_is_better} for m in self.metrics],
            "columns": columns,
            "ratios": {
                m.key: {"gatewayToNginx": self.ratio(m.key, "nginx"),
                        "gatewayToDirect": self.ratio(m.key, "direct")}
                for m in self.metrics
            },
            "targets": targets,
            "coreBusy": {str(core): round(share, 3) for core, share in self.core_busy.items()},
            "notes": self.notes,
        }
