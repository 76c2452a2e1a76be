"""The machine-readable results of a run (`bench/results.json`) and the comparison of two runs.

Each row of the table becomes one entry: its case and metric, the medians of ours and of the
baseline, the ratio, the target and the commit. `python -m bench --compare OLD.json` sets a run's
entries beside those of an older file and flags every case whose ratio (or, for a row without a
baseline, whose own value) moved the wrong way by more than `WORSE`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.stats import Row

WORSE = 0.10  # a change of more than 10 % the wrong way is flagged
FORMAT = 1


def entries(rows: Iterable[Row], commit: str) -> list[dict[str, object]]:
    """One JSON object per row that measured something."""
    found: list[dict[str, object]] = []
    for row in rows:
        if not row.ours and not row.baseline:
            continue
        verdict = row.target.met(row.metric, statistics.median(row.ours), row.ratio) if row.ours else None
        found.append(
            {
                "case": row.case,
                "metric": row.metric.name,
                "unit": row.metric.unit,
                "higher_is_better": row.metric.higher_is_better,
                "ours": statistics.median(row.ours) if row.ours else None,
                "ours_runs": row.ours,
                "baseline_name": row.baseline_name,
                "baseline": statistics.median(row.baseline) if row.baseline else None,
                "baseline_runs": row.baseline,
                "ratio": row.ratio,
                "target": row.target.describe(row.metric),
                "met": verdict,
                "note": row.note,
                "commit": commit,
            }
        )
    return found


def write(path: Path, rows: Iterable[Row], header: list[tuple[str, str]]) -> None:
    """Write the run's entries and its header (versions, commit, machine load) to `path`."""
    info = dict(header)
    document = {"format": FORMAT, "header": info, "results": entries(rows, info.get("commit", "?"))}
    path.write_text(json.dumps(document, indent=1) + "\n")


def load(path: Path) -> list[dict[str, object]]:
    """The entries of a results file."""
    document = json.loads(path.read_text())
    results: list[dict[str, object]] = document["results"]
    return results


@dataclass(frozen=True)
class Change:
    """One row's figure (its ratio, else its own value) in an old and a new run."""

    case: str
    metric: str
    old: float | None
    new: float | None
    by_ratio: bool
    higher_is_better: bool

    @property
    def change(self) -> float | None:
        """new / old - 1, or None when either is missing."""
        if self.old is None or self.new is None or self.old == 0:
            return None
        return self.new / self.old - 1

    @property
    def worse(self) -> bool:
        """Moved the wrong way by more than WORSE."""
        change = self.change
        if change is None:
            return False
        return change < -WORSE if self.higher_is_better else change > WORSE


def _key(entry: dict[str, object]) -> tuple[str, str, str]:
    return str(entry["case"]), str(entry["metric"]), str(entry.get("baseline_name", ""))


def _figure(entry: dict[str, object]) -> tuple[float | None, bool]:
    ratio = entry.get("ratio")
    if isinstance(ratio, int | float):
        return float(ratio), True
    ours = entry.get("ours")
    return (float(ours), False) if isinstance(ours, int | float) else (None, False)


def _change(entry: dict[str, object], old: float | None, new: float | None, by_ratio: bool) -> Change:
    higher_is_better = bool(entry.get("higher_is_better", True))
    return Change(str(entry["case"]), str(entry["metric"]), old, new, by_ratio, higher_is_better)


def compare(old: list[dict[str, object]], new: list[dict[str, object]], *, gone: bool = True) -> list[Change]:
    """Every row of `new` beside the same row (case, metric, baseline) of `old`, then (with `gone`)
    the rows of `old` that `new` lacks."""
    before = {_key(e): e for e in old}
    changes: list[Change] = []
    for entry in new:
        new_figure, by_ratio = _figure(entry)
        previous = before.pop(_key(entry), None)
        old_figure = _figure(previous)[0] if previous is not None else None
        if previous is not None and _figure(previous)[1] != by_ratio:
            old_figure = None  # one run had a baseline, the other not: not comparable
        changes.append(_change(entry, old_figure, new_figure, by_ratio))
    for entry in before.values() if gone else ():
        figure, by_ratio = _figure(entry)
        changes.append(_change(entry, figure, None, by_ratio))
    return changes


def render(changes: list[Change]) -> str:
    """The comparison as an aligned text table, with a last line counting the regressions."""

    def fmt(value: float | None, by_ratio: bool) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}x" if by_ratio else f"{value:,.2f}"

    table = [["case", "metric", "old", "new", "change", ""]]
    for c in changes:
        change = c.change
        flag = "WORSE" if c.worse else ("better" if change is not None and abs(change) > WORSE else "")
        if c.old is None or c.new is None:
            flag = "new" if c.old is None else "gone"
        table.append(
            [
                c.case,
                c.metric + ("" if c.by_ratio else " (value)"),
                fmt(c.old, c.by_ratio),
                fmt(c.new, c.by_ratio),
                f"{change:+.0%}" if change is not None else "",
                flag,
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]
    worse = sum(1 for c in changes if c.worse)
    lines.append("")
    lines.append(
        f"{worse} of {len(changes)} figures more than {WORSE:.0%} worse"
        if worse
        else f"no figure more than {WORSE:.0%} worse ({len(changes)} compared)"
    )
    return "\n".join(lines)
