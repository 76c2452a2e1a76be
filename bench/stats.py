"""Samples, their summaries across repetitions, and the results table."""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of `values` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Sample:
    """One measurement: how many operations succeeded, in how long, with which latencies (ms)."""

    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    reported: tuple[float, float] | None = None  # (p50, p99) from a tool that gives only percentiles
    cpu_seconds: float = 0.0  # CPU time the process under test used meanwhile
    error_kinds: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def cpu_us(self) -> float:
        """CPU microseconds of the process under test per successful operation."""
        return self.cpu_seconds * 1e6 / self.ok if self.ok else 0.0

    @property
    def rate(self) -> float:
        """Successful operations per second."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50(self) -> float:
        """Median latency in ms."""
        if self.reported:
            return self.reported[0]
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        """99th percentile latency in ms."""
        if self.reported:
            return self.reported[1]
        return percentile(self.latencies_ms, 99)


@dataclass(frozen=True)
class Metric:
    """What a row measures, and which way is better."""

    name: str
    unit: str
    higher_is_better: bool


RATE = Metric("throughput", "/s", True)
P50 = Metric("p50", "ms", False)
P99 = Metric("p99", "ms", False)
MSG_RATE = Metric("messages", "msg/s", True)
CPU = Metric("CPU per op", "us", False)


@dataclass(frozen=True)
class Target:
    """A goal for a row: a ratio against the baseline (`ratio`) or an absolute value (`absolute`)."""

    ratio: float | None = None
    absolute: float | None = None

    def describe(self, metric: Metric) -> str:
        """The goal in words, e.g. `>= 0.8x` or `< 5 ms`."""
        if self.ratio is not None:
            return f"{'>=' if metric.higher_is_better else '<='} {self.ratio:g}x"
        if self.absolute is not None:
            return f"{'>' if metric.higher_is_better else '<'} {self.absolute:g} {metric.unit}"
        return ""

    def met(self, metric: Metric, ours: float, ratio: float | None) -> bool | None:
        """Whether the goal is reached (None when there is no goal or nothing to judge)."""
        if self.ratio is not None and ratio is not None:
            return ratio >= self.ratio if metric.higher_is_better else ratio <= self.ratio
        if self.absolute is not None:
            return ours > self.absolute if metric.higher_is_better else ours < self.absolute
        return None


@dataclass
class Row:
    """One line of the table: a case's metric for ours and for the baseline, over every repetition."""

    case: str
    metric: Metric
    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = ""
    target: Target = field(default_factory=Target)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Median of ours over median of the baseline."""
        if not self.ours or not self.baseline or statistics.median(self.baseline) == 0:
            return None
        return statistics.median(self.ours) / statistics.median(self.baseline)

    def cells(self) -> list[str]:
        """The row's cells, in the order of `HEADER`."""
        if not self.ours and not self.baseline:
            return [self.case, self.metric.name, "", self.baseline_name, "", "", "", self.note]
        ratio = self.ratio
        verdict = self.target.met(self.metric, statistics.median(self.ours), ratio) if self.ours else None
        return [
            self.case,
            f"{self.metric.name} ({self.metric.unit})",
            _spread(self.ours),
            f"{self.baseline_name}: {_spread(self.baseline)}" if self.baseline else self.baseline_name,
            f"{ratio:.2f}x" if ratio is not None else "",
            self.target.describe(self.metric),
            {True: "met", False: "MISSED", None: ""}[verdict],
            self.note,
        ]


HEADER = [
    "case",
    "metric",
    "ours: median (min-max)",
    "baseline: median (min-max)",
    "ratio",
    "target",
    "",
    "note",
]


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{_num(statistics.median(values))} ({_num(min(values))}-{_num(max(values))})"


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |")
    return "\n".join(lines)


def plain(rows: list[Row]) -> str:
    """The rows as an aligned text table for the terminal."""
    table = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table
    )
