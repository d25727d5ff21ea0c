"""The benchmark runs end to end: `bench/run.py --quick` produces every number.

A smoke test of the benchmark itself, not a timing assertion: it checks that each metric
is present and is a positive, finite number, and that the run cleaned up after itself.
The Podman executor's numbers are optional (the benchmark skips them, saying why, where
rootful Podman or its image is missing), except under GPUD_REQUIRE_PODMAN=1.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "run.py"

LATENCIES = [
    "baseline_subprocess_pass",
    "baseline_subprocess_cloudpickle",
    "baseline_worker_python_pass",
    "baseline_worker_python_cloudpickle",
    "remote",
    "spawn_get",
    "spawn_submit",
    "remote_warm",
    "spawn_get_warm",
]
RATIOS = [
    "remote_p50_over_subprocess_cloudpickle_p50",
    "remote_p50_over_worker_python_cloudpickle_p50",
    "spawn_get_p50_over_worker_python_cloudpickle_p50",
    "map_cores_over_target",
    "map_4x_over_target",
    "remote_warm_p50_over_worker_python_cloudpickle_p50",
    "remote_warm_p50_over_remote_p50",
    "map_warm_over_target",
]
#: differences of two latencies: finite, but their sign is not the benchmark's to promise
DIFFERENCES = [
    "remote_p50_minus_worker_python_cloudpickle_p50_ms",
    "remote_p50_minus_worker_python_pass_p50_ms",
]
#: present only when the Podman executor was measured
PODMAN_LATENCIES = ["podman_remote", "podman_spawn_get"]
PODMAN_RATIOS = [f"{m}_{q}_over_process_{q}" for m in PODMAN_LATENCIES for q in ("p50", "p95")]
PODMAN_DIFFERENCES = [
    f"{m}_{q}_minus_process_{q}_ms" for m in PODMAN_LATENCIES for q in ("p50", "p95")
]


def _positive(value: Any, where: str) -> None:
    assert isinstance(value, int | float) and not isinstance(value, bool), (
        f"{where} is {value!r}, not a number"
    )
    assert math.isfinite(value) and value > 0, f"{where} = {value!r} is not positive and finite"


def _numbers(obj: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _numbers(v, f"{where}.{k}")]
    return [(where, obj)]


@pytest.mark.slow
def test_quick_benchmark_reports_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=str(REPO),
    )
    assert proc.returncode == 0, f"bench/run.py failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(out.read_text())
    metrics, ratios = result["metrics"], result["ratios"]

    for key in LATENCIES:
        for field in ("p50_ms", "p95_ms", "n"):
            _positive(metrics[key][field], f"metrics.{key}.{field}")
        assert metrics[key]["p95_ms"] >= metrics[key]["p50_ms"]
    for key in ("map_cores", "map_4x", "map_warm"):
        for field in ("inputs", "cpu_slots", "wall_s", "jobs_per_s"):
            _positive(metrics[key][field], f"metrics.{key}.{field}")
    assert metrics["map_4x"]["cpu_slots"] > metrics["map_cores"]["cpu_slots"]
    for field in ("submits_per_s", "wall_s"):
        _positive(metrics["spawn_submit"][field], f"metrics.spawn_submit.{field}")
    for field in ("inputs", "ack_s", "jobs_per_s"):
        _positive(metrics["batch_submit"][field], f"metrics.batch_submit.{field}")
    # Every number anywhere under metrics, not only the ones named above.
    for where, value in _numbers(metrics, "metrics"):
        _positive(value, where)

    for key in RATIOS:
        _positive(ratios[key], f"ratios.{key}")
    for key in DIFFERENCES:
        assert math.isfinite(ratios[key]), f"ratios.{key} = {ratios[key]!r}"
    assert result["meta"]["quick"] is True

    # The Podman executor: all of its numbers, or none and a reason.
    measured = [k for k in PODMAN_LATENCIES if k in metrics]
    if measured:
        assert measured == PODMAN_LATENCIES, f"only some Podman metrics: {measured}"
        for key in PODMAN_LATENCIES:
            assert metrics[key]["p95_ms"] >= metrics[key]["p50_ms"]
        for key in PODMAN_RATIOS:
            _positive(ratios[key], f"ratios.{key}")
        for key in PODMAN_DIFFERENCES:
            assert math.isfinite(ratios[key]), f"ratios.{key} = {ratios[key]!r}"
        assert result["meta"]["podman_skipped"] is None
        assert "Podman executor overhead (podman - process)" in proc.stdout
    else:
        why = result["meta"]["podman_skipped"]
        assert isinstance(why, str) and why, "Podman was skipped without a reason"
        assert not any(k.startswith("podman_") for k in ratios)
        assert f"Podman executor: not measured ({why})" in proc.stdout
        assert os.environ.get("GPUD_REQUIRE_PODMAN") != "1", (
            f"GPUD_REQUIRE_PODMAN=1 but the benchmark skipped Podman: {why}"
        )

    # The table went to stdout, naming the headline numbers.
    assert "remote p50 / subprocess+cloudpickle p50" in proc.stdout
    assert "/s target" in proc.stdout

    # It removed its temporary directory (and so stopped its daemons first).
    m = re.search(r"working in (\S+)", proc.stderr)
    assert m is not None, proc.stderr
    assert not Path(m.group(1)).exists(), f"{m.group(1)} was left behind"
