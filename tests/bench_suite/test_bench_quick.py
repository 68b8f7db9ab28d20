"""The bench suite's CI run: `python -m bench --quick` end to end, as a load tester runs it, so the
suite never rots. It pins that every scenario comes back with numbers or an explicit, reasoned skip,
never a silent gap, and that the run leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import COLUMNS
from bench.scenarios import SCENARIOS

REPO = Path(__file__).resolve().parents[2]
QUICK_RUN_SECONDS = 240  # ~90 s on an idle machine; CI machines are shared


def _children_of_test_session() -> set[int]:
    """PIDs whose parent chain reaches this pytest process (what the run could have leaked)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    mine = set()
    for pid in parents:
        cursor = pid
        while cursor in parents and cursor not in (0, 1):
            if parents[cursor] == os.getpid():
                mine.add(pid)
                break
            cursor = parents[cursor]
    return mine


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("curl") is None,
                    reason="wrk and curl are needed (make bench installs them)")
def test_quick_run_reports_every_scenario_with_numbers_or_a_reasoned_skip(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(results), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=QUICK_RUN_SECONDS, check=False)
    assert results.exists(), f"no JSON written\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    document = json.loads(results.read_text())
    by_name = {s["name"]: s for s in document["scenarios"]}
    assert set(by_name) == {s.name for s in SCENARIOS}
    for name, scenario in by_name.items():
        assert scenario["error"] is None, f"{name} failed: {scenario['error']}\n{done.stderr[-3000:]}"
        measured = 0
        for column in COLUMNS:
            figures = scenario["columns"][column]
            if "skipped" in figures:
                assert len(figures["skipped"]) > 10, f"{name}/{column}: a skip needs a reason"
                continue
            assert figures, f"{name}/{column}: neither figures nor a skip"
            assert all(isinstance(v, (int, float)) for v in figures.values()), figures
            measured += 1
        assert measured >= 1, f"{name}: every column skipped"
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scenario" in done.stdout and "gw/nginx" in done.stdout  # the table was printed
    assert not _children_of_test_session(), "the bench left processes running"
    assert not list(tmp_path.glob("zlh-bench-*")), "the bench left its work dir behind"
