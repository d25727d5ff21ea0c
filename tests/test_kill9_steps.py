"""kill -9 of a real `gpud serve` at the steps the suspend, warm-result and dependency
features added (reliability): each test stops the daemon at one exact step with the
test-only GPUD_TEST_CRASH_AT hook (gpud/crashpoint.py), restarts it, and checks that no
job is lost and none runs twice.

The steps: a suspend recorded before the job's GPU state was parked and its processes
stopped; a resume whose processes were continued before RUNNING was recorded; a warm
job's result committed before the worker was told it may forget it; a dependency's end
committed before the jobs waiting on it were freed or cancelled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import gpud_client as gpud
from gpud_client import Client, GpudError

from .conftest import (
    DaemonProc,
    containers_of,
    executor_env,
    kill_instance_jobs,
    wait_for,
)
from .test_durability import _died
from .test_durability import _final_events as _finals

app = gpud.App("kill9-steps")


@app.function(gpu="h100", retries=1)
def gpu_counted(path: str, seconds: float) -> str:
    """One line per run (a second run shows), then ``seconds`` of work in small steps."""
    import time

    with open(path, "a") as fh:
        fh.write("run\n")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
    return "done"


@app.function(retries=1, keep_warm=30)
def warm_counted(path: str, x: int) -> dict:
    with open(path, "a") as fh:
        fh.write(f"{x}\n")
    return {"x": x}


@app.function(retries=1)
def step(path: str, name: str, fail: bool = False) -> str:
    """Append ``start name`` and ``end name`` (the order of the lines is the order of the
    runs), failing on purpose where asked."""
    import time

    with open(path, "a") as fh:
        fh.write(f"start {name}\n")
    time.sleep(0.3)
    if fail:
        raise RuntimeError("failing on purpose")
    with open(path, "a") as fh:
        fh.write(f"end {name}\n")
    return name


@pytest.fixture
def crashable(base_dir: Path) -> Iterator[DaemonProc]:
    """A process-executor daemon on one fake H100 (so a suspend parks GPU state through
    the fake checkpointer), killed and restarted by the test."""
    d = DaemonProc(base_dir, env={"GPUD_FAKE_GPUS": "h100"})
    try:
        yield d
    finally:
        app.close()
        d.stop()
        kill_instance_jobs(d.data_dir)


def _states(d: DaemonProc, job_id: int) -> list[str]:
    led = d.ledger()
    try:
        return [e.to_state.value for e in led.events(job_id)]
    finally:
        led.close()


def _status_written(d: DaemonProc, job_id: int) -> bool:
    return (d.data_dir / "jobs" / str(job_id) / "status.json").exists()


def _call_dies(fn: object, *args: object) -> None:
    """Call the API while the daemon kills itself: the answer may never come."""
    with contextlib.suppress(GpudError, httpx.HTTPError):
        fn(*args)  # type: ignore[operator]  # a bound client method


@pytest.mark.parametrize("ended_while_down", [True, False], ids=["ended", "still-running"])
def test_kill_9_after_suspend_is_recorded(
    crashable: DaemonProc, shared_dir: Path, ended_while_down: bool
) -> None:
    """SUSPENDED committed, GPU state not parked, processes not stopped: the job ran on.
    Whether it ended while the daemon was down or is adopted at the restart, it is
    collected or resumed once, never marked lost (whose retry would run it again)."""
    d = crashable
    d.env["GPUD_TEST_CRASH_AT"] = "suspend_recorded"
    d.start()
    count = shared_dir / "runs"
    h = gpu_counted.with_options(url=d.url).spawn(str(count), 1.5 if ended_while_down else 8.0)
    with Client(d.url) as c:
        wait_for(lambda: c.get_job(h.id).state == "running" and count.exists(), timeout=30)
        _call_dies(c.suspend, h.id)
    _died(d)
    if ended_while_down:
        wait_for(lambda: _status_written(d, h.id), timeout=60)
    d.env.pop("GPUD_TEST_CRASH_AT")
    d.start()
    _succeeded_once(d, h, count)
    assert "suspended" in _states(d, h.id)
    if ended_while_down:
        assert "(suspended) finished while the daemon was down" in d.log.read_text()
    else:
        assert _states(d, h.id)[-2:] == ["running", "succeeded"]  # resumed, then ended


@pytest.mark.parametrize("ended_while_down", [True, False], ids=["ended", "still-running"])
def test_kill_9_during_resume(
    crashable: DaemonProc, shared_dir: Path, ended_while_down: bool
) -> None:
    """The processes were continued (GPU state first), RUNNING not yet recorded: the job
    runs while the ledger says SUSPENDED. A restart resumes or collects it, once."""
    d = crashable
    d.env["GPUD_TEST_CRASH_AT"] = "resume_continued"
    d.start()
    count = shared_dir / "runs"
    h = gpu_counted.with_options(url=d.url).spawn(str(count), 1.5 if ended_while_down else 8.0)
    with Client(d.url) as c:
        wait_for(lambda: c.get_job(h.id).state == "running" and count.exists(), timeout=30)
        assert c.suspend(h.id).state == "suspended"
        time.sleep(0.3)
        _call_dies(c.resume, h.id)
    _died(d)
    if ended_while_down:
        wait_for(lambda: _status_written(d, h.id), timeout=60)
    d.env.pop("GPUD_TEST_CRASH_AT")
    d.start()
    _succeeded_once(d, h, count)


def test_podman_kill_9_while_suspended_keeps_the_paused_container(
    base_dir: Path, shared_dir: Path
) -> None:
    """A suspended Podman job's container is paused. Found by bench/chaos.py: the restart
    took a paused container for one that had ended, removed it and marked the job lost
    (then ran it again). It must be adopted, unpaused and finish once."""
    d = DaemonProc(base_dir, env={**executor_env("podman"), "GPUD_FAKE_GPUS": "h100"})
    try:
        d.start()
        count = shared_dir / "runs"
        h = gpu_counted.with_options(url=d.url, gpu=None).spawn(str(count), 4.0)
        with Client(d.url) as c:
            wait_for(lambda: c.get_job(h.id).state == "running" and count.exists(), timeout=60)
            assert c.suspend(h.id).state == "suspended"
        d.kill9()
        d.start()
        assert h.get(timeout=90) == "done"
        info = h.status()
        assert info.state == "succeeded" and info.attempt == 1, info
        assert count.read_text() == "run\n", "the job ran more than once"
        assert _states(d, h.id)[-3:] == ["suspended", "running", "succeeded"]
        assert _finals(d, h.id) == ["succeeded"]
    finally:
        _podman_teardown(d)


def test_podman_a_job_whose_conmon_is_killed_ends_without_an_internal_error(
    base_dir: Path, shared_dir: Path
) -> None:
    """Found by bench/chaos.py's conmon fault: Podman has no exit code for a container
    whose conmon died, and its wait answered 500, which failed the job as "gpud hit an
    internal error" with a traceback. The job's own status.json now decides."""
    d = DaemonProc(base_dir, env=executor_env("podman"))
    try:
        d.start()
        count = shared_dir / "runs"
        h = gpu_counted.with_options(url=d.url, gpu=None, retries=0).spawn(str(count), 2.0)
        wait_for(count.exists, timeout=60)
        [cid] = containers_of(d, h.id)
        conmon = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.ConmonPid}}", cid],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        os.kill(int(conmon), signal.SIGKILL)
        assert h.get(timeout=90) == "done"
        assert h.status().state == "succeeded"
        assert "internal error" not in d.log.read_text()
        assert count.read_text() == "run\n"
    finally:
        _podman_teardown(d)


def test_kill_9_between_a_warm_result_stored_and_its_ack(
    crashable: DaemonProc, shared_dir: Path
) -> None:
    """The job's end and its small result are committed; the worker was not acked, so it
    writes result.pkl and status.json too. The restart keeps the ledger's word: the job
    succeeded once with its result, and the next call runs once."""
    d = crashable
    d.env["GPUD_TEST_CRASH_AT"] = "before_warm_ack"
    d.start()
    count = shared_dir / "runs"
    f = warm_counted.with_options(url=d.url)
    h = f.spawn(str(count), 1)
    _died(d)
    d.env.pop("GPUD_TEST_CRASH_AT")
    d.start()
    app.close()
    again = gpud.JobHandle(h.id, gpud.Client(d.url))
    try:
        assert again.get(timeout=60) == {"x": 1}
        info = again.status()
        assert info.state == "succeeded" and info.attempt == 1, info
    finally:
        again.client.close()
    assert _finals(d, h.id) == ["succeeded"]
    h2 = f.spawn(str(count), 2)
    assert h2.get(timeout=60) == {"x": 2}
    assert count.read_text() == "1\n2\n", "a job ran more than once"
    assert _finals(d, h2.id) == ["succeeded"]


@pytest.mark.parametrize("fails", [False, True], ids=["succeeded", "failed"])
def test_kill_9_while_a_dependency_end_is_propagated(
    crashable: DaemonProc, shared_dir: Path, fails: bool
) -> None:
    """The dependency's end is committed, its waiters not yet freed (or cancelled): after
    the restart the dependent runs once, after its dependency succeeded, or is cancelled
    and never runs when the dependency failed."""
    d = crashable
    d.env["GPUD_TEST_CRASH_AT"] = "deps_ended"
    d.start()
    log = shared_dir / "order"
    f = step.with_options(url=d.url, retries=0)
    first = f.spawn(str(log), "a", fails)
    then = f.spawn(str(log), "b", after=[first])
    _died(d)
    d.env.pop("GPUD_TEST_CRASH_AT")
    d.start()
    with Client(d.url) as c:
        done = c.wait(then.id, timeout=60)
        assert c.get_job(first.id).state == ("failed" if fails else "succeeded")
    if fails:
        assert done.state == "cancelled", done
        assert done.error == f"dependency job {first.id} failed"
        assert log.read_text() == "start a\n"
        assert _finals(d, then.id) == ["cancelled"]
    else:
        assert done.state == "succeeded" and done.attempt == 1, done
        assert log.read_text() == "start a\nend a\nstart b\nend b\n"
        assert _finals(d, then.id) == ["succeeded"]
    assert _finals(d, first.id) == ["failed" if fails else "succeeded"]


def _podman_teardown(d: DaemonProc) -> None:
    """After a Podman test: the daemon stopped, its jobs killed, its containers removed."""
    app.close()
    d.stop()
    kill_instance_jobs(d.data_dir)
    left = containers_of(d)
    if left:
        subprocess.run(["podman", "rm", "-f", *left], capture_output=True)


def _succeeded_once(d: DaemonProc, h: Any, count: Path) -> None:
    """After the restart: the job succeeded on its first attempt, ran once, ended once."""
    assert h.get(timeout=60) == "done"
    info = h.status()
    assert info.state == "succeeded" and info.attempt == 1, info
    assert count.read_text() == "run\n", "the job ran more than once"
    assert _finals(d, h.id) == ["succeeded"]


def test_kill_9_at_a_warm_hand_off(crashable: DaemonProc, shared_dir: Path) -> None:
    """A warm worker answered a call and the daemon chose to hand it the next queued call
    without a round (#12), then died before recording either: the answered call is
    collected from the files its worker writes when the hub goes away, the next one starts
    after the restart. Every call of the batch succeeds, each ran once."""
    d = crashable
    d.env["GPUD_CPU_SLOTS"] = "1"  # one worker: each next call is a hand-off
    d.env["GPUD_TEST_CRASH_AT"] = "warm_hand_off"
    d.start()
    count = shared_dir / "runs"
    f = warm_counted.with_options(url=d.url)
    batch = f.spawn_map([str(count)] * 3, [1, 2, 3])
    ids = batch.job_ids()
    _died(d)
    d.env.pop("GPUD_TEST_CRASH_AT")
    d.start()
    app.close()
    client = gpud.Client(d.url)
    try:
        for i, x in zip(ids, (1, 2, 3), strict=True):
            h = gpud.JobHandle(i, client)
            assert h.get(timeout=60) == {"x": x}
            info = h.status()
            assert info.state == "succeeded" and info.attempt == 1, info
    finally:
        client.close()
    assert sorted(count.read_text().split()) == ["1", "2", "3"], "a call ran twice or never"
    for i in ids:
        assert _finals(d, i) == ["succeeded"]


def test_kill_9_while_a_big_batch_is_filed_into_memory(
    crashable: DaemonProc, shared_dir: Path
) -> None:
    """A batch committed and only in part filed into the daemon's memory when it dies
    (#12): the client's retry gets the same batch, the restarted daemon holds every one
    of its jobs (its cancel ends them all, each once)."""
    from gpud.daemon.service import FILE_CHUNK

    d = crashable
    d.env["GPUD_TEST_CRASH_AT"] = "mid_filing"
    d.start()
    count = shared_dir / "runs"
    n = FILE_CHUNK + 2
    f = gpu_counted.with_options(url=d.url, retries=0)
    out: dict[str, Any] = {}

    def submit() -> None:
        try:
            out["batch"] = f.spawn_map([str(count)] * n, [30.0] * n, max_concurrency=1)
        except Exception as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=submit)
    t.start()
    _died(d)  # committed, filed in part, then killed before it answered
    d.env.pop("GPUD_TEST_CRASH_AT")
    d.start()  # the client retries meanwhile, with the same key
    t.join(60)
    assert "error" not in out, out
    batch = out["batch"]
    with Client(d.url) as c:
        ids = c.batch(batch.id, jobs=True).job_ids
        assert ids is not None and len(ids) == n
        led = d.ledger()
        try:
            assert led.conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == n
        finally:
            led.close()
        info = c.cancel_batch(batch.id)
        assert info.counts.cancelled == n, info
        assert c.queue().total == 0
    assert all(_finals(d, i) == ["cancelled"] for i in (ids[0], ids[FILE_CHUNK], ids[-1]))
    led = d.ledger()
    try:
        ended = led.conn.execute(
            "SELECT count(*), count(DISTINCT job_id) FROM events WHERE to_state = 'cancelled'"
        ).fetchone()
    finally:
        led.close()
    assert tuple(ended) == (n, n), "a job ended more than once, or not at all"
