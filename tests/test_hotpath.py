"""Smoke test of the hot-path benchmark (#12): it runs, and every row it prints has a
figure, a baseline from the same run and a target, and says "ok" or "MISSED". It never
judges how fast anything is (that is the benchmark's own report, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_hotpath_quick_prints_every_row_with_its_target(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    # The two modules that need no daemon: the scheduler's rounds and retention's gc.
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "hotpath.py"),
            "--quick",
            "--only",
            "sched",
            "retention",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["quick"] is True
    rows = report["rows"]
    assert len(rows) >= 5
    for r in rows:
        assert r["measure"] and r["figure"] and r["baseline"] and r["target"]
        assert isinstance(r["ok"], bool)
    lines = run.stdout.splitlines()
    assert lines[0].startswith("measure") and set(lines[1]) <= {"-", " "}
    for line in lines[2:]:
        assert line.rstrip().endswith(("ok", "MISSED")), line
    assert any("plan()" in r["measure"] for r in rows)
