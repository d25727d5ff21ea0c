"""A warm job's small result travels inline and is stored with the job's end in one
unsynced commit (#12): a real `gpud serve`, real SQLite, kill -9. A result the client got
is kept by a kill -9 of the daemon (and of the worker), the job is not run again, and no
file was needed for it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpud_client as gpud
from gpud.domain import FINAL
from gpud.executors.process import processes_with_env
from gpud_client.handle import JobHandle

from .conftest import DaemonProc, kill_instance_jobs

app = gpud.App("warmresults")


@app.function(keep_warm=30)
def counted_value(path: str, x: int) -> dict[str, object]:
    """Append a line per run (a second run of a call shows), return a small value."""
    with open(path, "a") as fh:
        fh.write(f"{x}\n")
    return {"x": x, "pad": "r" * 100}


@pytest.fixture
def daemon(base_dir: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(base_dir)
    try:
        yield d
    finally:
        d.stop()
        kill_instance_jobs(d.data_dir)


def test_a_delivered_warm_result_survives_kill_9_and_the_job_runs_once(
    daemon: DaemonProc, shared_dir: Path
) -> None:
    d = daemon
    d.start()
    count = shared_dir / "runs"
    f = counted_value.with_options(url=d.url)
    # The first call starts the warm worker; the second is handed to it, idle.
    handles = []
    for x in (1, 2):
        h = f.spawn(str(count), x)
        assert h.get(timeout=60) == {"x": x, "pad": "r" * 100}
        handles.append(h)
    # The client has both results: kill -9 the daemon now, and its worker (which would
    # otherwise write the results to files, were they not yet acknowledged).
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=30)
    d.proc = None
    kill_instance_jobs(d.data_dir)
    for h in handles:
        jobdir = d.data_dir / "jobs" / str(h.id)
        for name in ("result.pkl", "status.json"):
            (jobdir / name).unlink(missing_ok=True)  # whatever the worker left: not needed
    d.start()
    for x, h in zip((1, 2), handles, strict=True):
        again = JobHandle(h.id, gpud.Client(d.url))
        info = again.status()
        assert info.state == "succeeded" and info.attempt == 1, info
        assert again.get(timeout=30) == {"x": x, "pad": "r" * 100}  # from the ledger
    assert count.read_text() == "1\n2\n", "a delivered job ran again"
    led = d.ledger()
    try:
        for h in handles:
            finals = [e.to_state.value for e in led.events(h.id) if e.to_state in FINAL]
            assert finals == ["succeeded"]
            assert led.integrity_check() == "ok"
    finally:
        led.close()


def test_a_warm_result_is_not_written_to_files(daemon: DaemonProc, shared_dir: Path) -> None:
    """The point of the inline path: a small result costs the worker no file and no
    fsync; the stream, the result endpoint and a batch's results all read it."""
    d = daemon
    d.start()
    f = counted_value.with_options(url=d.url)
    count = str(shared_dir / "runs")
    assert f.remote(count, 7) == {"x": 7, "pad": "r" * 100}
    h = f.spawn(count, 8)
    assert h.get(timeout=60) == {"x": 8, "pad": "r" * 100}
    assert list(f.starmap([(count, 9), (count, 10)])) == [
        {"x": x, "pad": "r" * 100} for x in (9, 10)
    ]
    assert not (d.data_dir / "jobs" / str(h.id) / "result.pkl").exists()
    assert not (d.data_dir / "jobs" / str(h.id) / "status.json").exists()


@app.function()
def doubled(value: dict[str, object]) -> object:
    return value["x"] * 2  # type: ignore[operator]


def test_result_of_a_warm_job_reaches_the_next_one(daemon: DaemonProc, shared_dir: Path) -> None:
    """A dependency's result kept in the ledger, not in a result.pkl, is still passed on
    to a job that takes it with gpud.result_of (#14)."""
    d = daemon
    d.start()
    up = counted_value.with_options(url=d.url).spawn(str(shared_dir / "runs"), 21)
    down = doubled.with_options(url=d.url).spawn(gpud.result_of(up))
    assert down.get(timeout=60) == 42
    assert not (d.data_dir / "jobs" / str(up.id) / "result.pkl").exists()


@app.function(keep_warm=30, retries=1)
def fails_first(path: str) -> int:
    """Fails the first time it runs (a line in ``path`` per run), then returns its pid."""
    import os

    with open(path, "a") as fh:
        fh.write("run\n")
    with open(path) as fh:
        if len(fh.readlines()) == 1:
            raise RuntimeError("first run fails")
    return os.getpid()


def test_a_retry_handed_to_the_idle_warm_worker_is_its_next_attempt(
    daemon: DaemonProc, shared_dir: Path
) -> None:
    """The retry of a warm call goes to the worker that ran attempt 1, its directory laid
    out while its start commits (#12): it runs as attempt 2, and says so in its log."""
    d = daemon
    d.start()
    count = shared_dir / "runs"
    h = fails_first.with_options(url=d.url).spawn(str(count))
    pid = h.get(timeout=60)
    info = h.status()
    assert info.state == "succeeded" and info.attempt == 2, info
    assert info.start_kind == "warm", info
    assert count.read_text() == "run\nrun\n"
    assert isinstance(pid, int)
    log = (d.data_dir / "jobs" / str(h.id) / "output.log").read_text()
    assert "attempt 2 of 2" in log, log


def test_an_unacknowledged_result_the_worker_writes_after_a_kill_9_changes_nothing(
    daemon: DaemonProc, shared_dir: Path
) -> None:
    """The word that a result is stored rides on the worker's next task (#12), so after a
    call its worker usually still holds the result. kill -9 of the daemon then (not of
    the worker): the worker writes the result to files for a job the ledger has final
    already. The next daemon keeps each job succeeded once, runs none again, and serves
    the results; an earlier call's result, acknowledged by riding on the next task, was
    never written to files."""
    d = daemon
    d.start()
    count = shared_dir / "runs"
    f = counted_value.with_options(url=d.url)
    handles = []
    for x in (1, 2, 3):
        h = f.spawn(str(count), x)
        assert h.get(timeout=60) == {"x": x, "pad": "r" * 100}
        handles.append(h)
    assert d.proc is not None
    instance = (d.data_dir / "instance").read_text().strip()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=30)
    d.proc = None
    # Its connection gone, the worker writes what it holds and ends on its own.
    deadline = time.monotonic() + 30
    while processes_with_env(f"GPUD_INSTANCE={instance}"):
        assert time.monotonic() < deadline, "the warm worker did not end with its daemon"
        time.sleep(0.05)
    for h in handles[:2]:
        # Stored, then acknowledged along with the next task: never written.
        assert not (d.data_dir / "jobs" / str(h.id) / "result.pkl").exists()
    d.start()
    for x, h in zip((1, 2, 3), handles, strict=True):
        again = JobHandle(h.id, gpud.Client(d.url))
        info = again.status()
        assert info.state == "succeeded" and info.attempt == 1, info
        assert again.get(timeout=30) == {"x": x, "pad": "r" * 100}
    assert f.remote(str(count), 4) == {"x": 4, "pad": "r" * 100}
    assert count.read_text() == "1\n2\n3\n4\n", "a job ran again"
    led = d.ledger()
    try:
        for h in handles:
            finals = [e.to_state.value for e in led.events(h.id) if e.to_state in FINAL]
            assert finals == ["succeeded"]
    finally:
        led.close()
