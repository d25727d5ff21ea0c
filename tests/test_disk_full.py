"""Issue #10: the ledger cannot be written (a full disk: the data dir on a small tmpfs;
another process holding SQLite's write lock). Submits are refused with a clear error,
a running job's state change is held until it can be written, the daemon carries on,
and the ledger is never corrupted."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

import gpud_client as gpud
from gpud.domain import FINAL

from .conftest import DaemonProc, kill_instance_jobs, needs_root, pid_alive, wait_for

app = gpud.App("diskfull")


@app.function()
def gated(gate: str, pidfile: str) -> str:
    """Run until the test creates ``gate``."""
    import os
    import time

    with open(pidfile, "w") as fh:
        fh.write(str(os.getpid()))
    while not os.path.exists(gate):
        time.sleep(0.05)
    return "done"


def _post(d: DaemonProc, path: str, body: object) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(d.socket))
    with httpx.Client(transport=transport, base_url="http://gpud", timeout=60) as h:
        return h.post(
            "/v1" + path,
            content=msgspec.json.encode(body),
            headers={"content-type": "application/json"},
        )


def _state(d: DaemonProc, job_id: int) -> str:
    """The job's state in the ledger file, read without taking any lock."""
    conn = sqlite3.connect(f"file:{d.data_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        return str(conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
    finally:
        conn.close()


def _final_events(d: DaemonProc, job_id: int) -> list[str]:
    led = d.ledger()
    try:
        return [e.to_state.value for e in led.events(job_id) if e.to_state in FINAL]
    finally:
        led.close()


def _integrity(d: DaemonProc) -> str:
    conn = sqlite3.connect(d.data_dir / "ledger.db")
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


@contextlib.contextmanager
def _stopped_after(d: DaemonProc) -> Iterator[DaemonProc]:
    """Stop the daemon and kill the jobs it left, whatever the test did."""
    try:
        yield d
    finally:
        d.stop()
        kill_instance_jobs(d.data_dir)


@pytest.fixture
def tmpfs_daemon(base_dir: Path) -> Iterator[DaemonProc]:
    """A daemon whose data directory is a 16 MiB tmpfs of its own."""
    d = DaemonProc(base_dir)
    d.data_dir.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(d.data_dir)], check=True
    )
    try:
        with _stopped_after(d):
            yield d
    finally:
        subprocess.run(["umount", "-l", str(d.data_dir)], check=False)


@pytest.fixture
def plain_daemon(base_dir: Path) -> Iterator[DaemonProc]:
    with _stopped_after(DaemonProc(base_dir)) as d:
        yield d


def _start_with_a_gated_job(d: DaemonProc, shared: Path) -> tuple[gpud.JobHandle, Path, int]:
    """Start the daemon and a job that runs until the returned gate file exists; its pid."""
    d.start()
    gate, pidfile = shared / "go", shared / "pid"
    handle = gated.with_options(url=d.url).spawn(str(gate), str(pidfile))
    wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=30)
    return handle, gate, int(pidfile.read_text())


def _works_as_before_and_ledger_intact(d: DaemonProc, shared: Path) -> None:
    gate2 = shared / "go2"
    gate2.touch()
    assert gated.with_options(url=d.url).remote(str(gate2), str(shared / "pid2")) == "done"
    d.stop()
    assert _integrity(d) == "ok"
    assert "Traceback" not in d.log.read_text()


def _fill(path: Path) -> None:
    """Write until the filesystem has not a byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


@needs_root
def test_full_disk_refuses_submits_holds_state_changes_and_recovers(
    tmpfs_daemon: DaemonProc, shared_dir: Path
) -> None:
    d = tmpfs_daemon
    handle, gate, pid = _start_with_a_gated_job(d, shared_dir)
    # Empty the WAL, so that the next ledger write needs new space, then fill the disk.
    conn = sqlite3.connect(d.data_dir / "ledger.db")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    ballast = d.data_dir / "ballast"
    _fill(ballast)

    r = _post(d, "/jobs", gated.submit_request((str(gate), "/dev/null"), {}))
    assert r.status_code == 507, r.text
    assert r.json()["error"] == "disk_full"
    assert str(d.data_dir) in r.json()["detail"] and "free space" in r.json()["detail"]

    gate.touch()  # the job ends while nothing can be written
    wait_for(lambda: not pid_alive(pid), timeout=30)
    time.sleep(1.0)  # let the daemon try (and fail) to record it
    assert _state(d, handle.id) == "running"  # held, not lost, not written half
    assert d.alive()  # the daemon carries on
    with gpud.Client(d.url) as c:
        assert c.health().status == "ok"

    ballast.unlink()  # space returns: the held change is written
    wait_for(lambda: _state(d, handle.id) in {s.value for s in FINAL}, timeout=60)
    assert len(_final_events(d, handle.id)) == 1
    # Its worker could not write its result either: the error says why.
    info = handle.status()
    assert info.state == "succeeded" or "disk" in (info.error or ""), info
    _works_as_before_and_ledger_intact(d, shared_dir)


def test_a_held_write_lock_gets_503_and_the_daemon_carries_on(
    plain_daemon: DaemonProc, shared_dir: Path
) -> None:
    d = plain_daemon
    handle, gate, pid = _start_with_a_gated_job(d, shared_dir)

    locker = sqlite3.connect(d.data_dir / "ledger.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # e.g. an admin's sqlite3 shell left open
    retried: dict[str, object] = {}

    def submit_with_retries() -> None:
        # The client's own submit retries the 503 (same key) until the lock is gone.
        with gpud.Client(d.url) as c:
            retried["id"] = c.submit(gated.submit_request((str(gate), "/dev/null"), {})).id

    t = threading.Thread(target=submit_with_retries)
    try:
        gate.touch()
        wait_for(lambda: not pid_alive(pid), timeout=30)
        t.start()
        # After the busy timeout (10 s): a clear 503, never a 500 or a crash.
        r = _post(d, "/jobs", gated.submit_request((str(gate), "/dev/null"), {}))
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "ledger_busy" and "locked" in r.json()["detail"]
        assert r.headers["retry-after"]
        assert _state(d, handle.id) == "running"  # its end is held meanwhile
        assert d.alive()
    finally:
        with contextlib.suppress(sqlite3.Error):
            locker.execute("ROLLBACK")
        locker.close()
    assert handle.get(timeout=60) == "done"
    assert _final_events(d, handle.id) == ["succeeded"]
    t.join(60)
    assert isinstance(retried.get("id"), int)
    with gpud.Client(d.url) as c:
        assert c.wait(retried["id"], 30).state == "succeeded"  # type: ignore[arg-type]
    led = d.ledger()
    assert led.conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2  # not 3
    led.close()
    _works_as_before_and_ledger_intact(d, shared_dir)
