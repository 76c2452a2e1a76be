"""The benchmark's machine-readable results and `python -m bench --compare` (no benchmark is run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import results
from bench.run import main
from bench.stats import CPU, P50, RATE, Metric, Row, Target


def _rows(rate: float, base_rate: float, cpu: float, start_ms: float) -> list[Row]:
    return [
        Row("create", RATE, ours=[rate, rate + 10], baseline=[base_rate], baseline_name="responder",
            target=Target(ratio=0.6)),
        Row("create", CPU, ours=[cpu], baseline=[100.0], baseline_name="responder"),
        Row("start", Metric("start", "ms", False), ours=[start_ms]),
        Row("skipped", P50, note="not available"),
    ]  # fmt: skip


def _write(tmp_path: Path, name: str, rows: list[Row], commit: str) -> Path:
    path = tmp_path / name
    results.write(path, rows, [("commit", commit), ("mode", "quick")])
    return path


def test_results_file_holds_every_measured_row_with_its_ratio_and_commit(tmp_path: Path) -> None:
    path = _write(tmp_path, "run.json", _rows(1000, 2000, 300, 900), "abc1234")
    document = json.loads(path.read_text())
    assert document["header"]["commit"] == "abc1234"
    first, cpu, start = document["results"]  # the row without figures is left out
    assert first["case"] == "create"
    assert first["metric"] == "throughput"
    assert first["ours"] == 1005
    assert first["baseline"] == 2000
    assert first["ratio"] == pytest.approx(0.5025)
    assert first["target"] == ">= 0.6x"
    assert first["met"] is False
    assert first["commit"] == "abc1234"
    assert cpu["ratio"] == pytest.approx(3.0)
    assert cpu["higher_is_better"] is False
    assert start["ratio"] is None
    assert start["ours"] == 900


def test_compare_flags_a_ratio_more_than_ten_percent_worse_in_either_direction(tmp_path: Path) -> None:
    old = results.entries(_rows(1000, 2000, 300, 900), "old")
    # throughput ratio 0.50 -> 0.44 (-12 %), CPU ratio 3.0 -> 3.2 (+7 %), start 900 -> 1000 ms (+11 %)
    new = results.entries(_rows(875, 2000, 320, 1000), "new")
    changes = {(c.case, c.metric): c for c in results.compare(old, new)}
    assert changes["create", "throughput"].worse
    assert not changes["create", "CPU per op"].worse
    assert changes["start", "start"].worse
    text = results.render(list(changes.values()))
    assert "WORSE" in text
    assert "2 of 3 figures more than 10% worse" in text


def test_compare_of_two_files_exits_1_on_a_regression_and_0_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _write(tmp_path, "old.json", _rows(1000, 2000, 300, 900), "old")
    same = _write(tmp_path, "same.json", _rows(1010, 2000, 290, 890), "same")
    slower = _write(tmp_path, "slower.json", _rows(500, 2000, 300, 900), "slower")
    assert main(["--compare", str(old), "--against", str(same)]) == 0
    assert "no figure more than 10% worse" in capsys.readouterr().out
    assert main(["--compare", str(old), "--against", str(slower)]) == 1
    out = capsys.readouterr().out
    assert "WORSE" in out
    assert "-50%" in out


def test_a_row_only_one_run_has_is_shown_as_new_or_gone(tmp_path: Path) -> None:
    old = results.entries(_rows(1000, 2000, 300, 900), "old")
    new = results.entries([Row("list", P50, ours=[60.0], baseline=[55.0], baseline_name="watch")], "new")
    text = results.render(results.compare(old, new))
    assert "new" in text
    assert "gone" in text
    assert len(results.compare(old, new, gone=False)) == 1
