"""Suspend, resume and preemption of real CPU jobs (#13), end to end: `gpud serve` in a
subprocess with the process executor, jobs that count by appending to a file, and the
real client and CLI. A suspended job's process group is stopped (SIGSTOP): the file must
not grow while it is suspended, and the job must finish with the right result after."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import gpud_client as gpud
from gpud_client import ApiError, Client

from .conftest import (
    DaemonProc,
    _run_daemon,
    add_gpud_user,
    executor_env,
    free_port,
    gpud_cli,
    kill_instance_jobs,
    wait_for,
)

app = gpud.App("suspend")


@app.function()
def counter(path: str, lines: int, pause: float) -> int:
    import time

    for i in range(lines):
        with open(path, "a") as fh:
            fh.write(f"{i}\n")
        time.sleep(pause)
    with open(path) as fh:
        return sum(1 for _ in fh)


@app.function(gpu="h100")
def gpu_counter(path: str, lines: int, pause: float) -> int:
    import time

    for i in range(lines):
        with open(path, "a") as fh:
            fh.write(f"{i}\n")
        time.sleep(pause)
    return lines


@app.function(gpu="h100")
def gpu_holder(release: str) -> str:
    import os
    import time

    while not os.path.exists(release):
        time.sleep(0.05)
    return "released"


def _lines(p: Path) -> int:
    try:
        return p.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def box(base_dir: Path) -> Iterator[DaemonProc]:
    """A process-executor daemon with one fake H100, preemption after 0.5 s, and TCP with
    a token user (bob) who is not the jobs' owner."""
    port = free_port()
    (base_dir / "data").mkdir(mode=0o711)
    token = add_gpud_user(base_dir / "data", "bob")
    env = {"GPUD_FAKE_GPUS": "h100", "GPUD_PREEMPT_AFTER": "0.5s", "GPUD_TCP": f"127.0.0.1:{port}"}
    for d in _run_daemon(base_dir, env):
        d.env["_bob"] = token
        d.env["_tcp"] = f"http://127.0.0.1:{port}"
        app.close()
        yield d
        app.close()


def test_suspend_stops_a_job_and_resume_finishes_it(box: DaemonProc, shared_dir: Path) -> None:
    out = shared_dir / "count.txt"
    h = counter.spawn(str(out), 40, 0.05)
    wait_for(lambda: _lines(out) >= 5, timeout=30)
    with Client(url=box.url) as c:
        job = c.suspend(h.id)
        assert job.state == "suspended"
        me = c.whoami().name
        assert job.reason == f"suspended by {me}"
        time.sleep(0.3)  # a write in flight lands
        frozen = _lines(out)
        time.sleep(1.0)
        assert _lines(out) == frozen, "the job made progress while suspended"
        assert frozen < 40
        # `gpud ps` says so
        ps = gpud_cli("ps", env=box.client_env())
        assert "suspended" in ps.stdout and f"suspended by {me}" in ps.stdout, ps.stdout
        # A second suspend, and a resume of a running job, are refused with the reason.
        with pytest.raises(ApiError) as e:
            c.suspend(h.id)
        assert e.value.status == 409
        assert f"job {h.id} is suspended; only running jobs can be suspended" in e.value.detail
        job = c.resume(h.id)
        assert job.state == "running"
        assert job.suspended_seconds >= 1.0
        with pytest.raises(ApiError) as e:
            c.resume(h.id)
        assert "only suspended jobs can be resumed" in e.value.detail
    assert h.get(timeout=60) == 40
    assert _lines(out) == 40


def test_suspend_and_resume_are_events_with_their_reasons(
    box: DaemonProc, shared_dir: Path
) -> None:
    out = shared_dir / "count.txt"
    h = counter.spawn(str(out), 60, 0.1)  # 6 s: longer than two CLI start-ups
    wait_for(lambda: _lines(out) >= 2, timeout=30)
    r = gpud_cli("suspend", str(h.id), env=box.client_env())
    assert r.returncode == 0, r.stderr
    assert f"job {h.id}: suspended by" in r.stderr
    r = gpud_cli("resume", str(h.id), env=box.client_env())
    assert r.returncode == 0, r.stderr
    assert f"job {h.id}: resumed (running)" in r.stderr
    assert h.get(timeout=60) == 60
    led = box.ledger()
    try:
        moves = [(e.from_state, e.to_state, e.reason) for e in led.events(h.id)]
    finally:
        led.close()
    assert tuple(str(s) for s in moves[3][:2]) == ("running", "suspended")
    assert moves[3][2].startswith("suspended by ")
    assert (str(moves[4][0]), str(moves[4][1]), moves[4][2]) == ("suspended", "running", "resumed")


def test_wrong_states_are_refused_clearly(box: DaemonProc, shared_dir: Path) -> None:
    h = counter.spawn(str(shared_dir / "c.txt"), 1, 0.0)
    assert h.get(timeout=60) == 1
    r = gpud_cli("suspend", str(h.id), env=box.client_env())
    assert r.returncode != 0
    assert f"job {h.id} is succeeded; only running jobs can be suspended" in r.stderr
    assert "Traceback" not in r.stderr
    r = gpud_cli("resume", str(h.id), env=box.client_env())
    assert f"job {h.id} is succeeded; only suspended jobs can be resumed" in r.stderr


def test_the_timeout_clock_stops_while_suspended(box: DaemonProc, shared_dir: Path) -> None:
    """25 lines 0.1 s apart (~2.5 s of work) under a 5 s timeout, suspended for 3 s in the
    middle: it finishes, because its deadline moved by the time it was suspended."""
    out = shared_dir / "count.txt"
    h = counter.with_options(timeout=5).spawn(str(out), 25, 0.1)
    wait_for(lambda: _lines(out) >= 5, timeout=30)
    with Client(url=box.url) as c:
        c.suspend(h.id)
        time.sleep(3.0)
        c.resume(h.id)
    assert h.get(timeout=60) == 25


def test_a_suspended_job_can_be_cancelled(box: DaemonProc, shared_dir: Path) -> None:
    out = shared_dir / "count.txt"
    h = counter.spawn(str(out), 1000, 0.05)
    wait_for(lambda: _lines(out) >= 2, timeout=30)
    with Client(url=box.url) as c:
        c.suspend(h.id)
        job = c.cancel(h.id)
    assert job.state == "cancelled"


def test_another_user_gets_the_answer_for_a_job_they_cannot_touch(
    box: DaemonProc, shared_dir: Path
) -> None:
    out = shared_dir / "count.txt"
    h = counter.spawn(str(out), 1000, 0.05)
    wait_for(lambda: _lines(out) >= 2, timeout=30)
    bob = {"Authorization": f"Bearer {box.env['_bob']}"}
    with httpx.Client(base_url=box.env["_tcp"], headers=bob) as http:
        cancel = http.post(f"/v1/jobs/{h.id}/cancel")
        for verb in ("suspend", "resume"):
            r = http.post(f"/v1/jobs/{h.id}/{verb}")
            assert r.status_code == cancel.status_code == 403
            assert r.json()["detail"] == cancel.json()["detail"].replace("cancel", verb)
    with Client(url=box.url) as c:
        assert c.get_job(h.id).state == "running"
        c.cancel(h.id)


def test_a_high_priority_job_preempts_a_low_one(box: DaemonProc, shared_dir: Path) -> None:
    """One fake H100: a long low-priority job holds it; a priority-10 job waits past
    preempt_after (0.5 s), the low one is suspended for it, the high one runs, and then
    the low one resumes and finishes with the right result."""
    low_out, high_out = shared_dir / "low.txt", shared_dir / "high.txt"
    low = gpu_counter.spawn(str(low_out), 30, 0.1)
    wait_for(lambda: _lines(low_out) >= 3, timeout=30)
    high = gpu_counter.with_options(priority=10).spawn(str(high_out), 5, 0.05)
    with Client(url=box.url) as c:
        try:
            wait_for(lambda: c.get_job(low.id).state == "suspended", timeout=20)
        except AssertionError:
            raise AssertionError(box.log.read_text()[-3000:]) from None
        assert c.get_job(low.id).reason.startswith(f"suspended for job {high.id} (priority 10 > 0)")
        assert high.get(timeout=60) == 5
    assert low.get(timeout=60) == 30
    assert _lines(low_out) == 30
    led = box.ledger()
    try:
        reasons = [e.reason for e in led.events(low.id)]
    finally:
        led.close()
    assert f"suspended for job {high.id} (priority 10 > 0)" in reasons
    assert "resumed" in reasons


def test_a_job_marked_not_preemptible_is_left_alone(box: DaemonProc, shared_dir: Path) -> None:
    low_out = shared_dir / "low.txt"
    low = gpu_counter.with_options(preemptible=False).spawn(str(low_out), 80, 0.05)
    wait_for(lambda: _lines(low_out) >= 3, timeout=30)
    high = gpu_counter.with_options(priority=10).spawn(str(shared_dir / "h.txt"), 1, 0.0)
    with Client(url=box.url) as c:
        time.sleep(1.5)  # three times preempt_after
        assert c.get_job(low.id).state == "running"
        assert c.get_job(high.id).state == "queued"
    assert low.get(timeout=60) == 80
    assert high.get(timeout=60) == 1


def test_a_restart_resumes_a_suspended_job(box: DaemonProc, shared_dir: Path) -> None:
    """kill -9 of the daemon while a job is suspended: its process stays stopped until the
    next daemon adopts it and resumes it; it then finishes with the right result."""
    out = shared_dir / "count.txt"
    h = counter.spawn(str(out), 30, 0.05)
    wait_for(lambda: _lines(out) >= 3, timeout=30)
    with Client(url=box.url) as c:
        c.suspend(h.id)
    led = box.ledger()
    try:
        pid = led.get(h.id).pid
    finally:
        led.close()
    assert pid is not None
    box.stop(signal.SIGKILL)
    time.sleep(0.3)
    assert _proc_state(pid) == "T", "the job should still be stopped"
    frozen = _lines(out)
    time.sleep(0.5)
    assert _lines(out) == frozen
    box.start()
    assert h.get(timeout=60) == 30
    led = box.ledger()
    try:
        events = led.events(h.id)
    finally:
        led.close()
    assert [str(e.to_state) for e in events][-3:] == ["suspended", "running", "succeeded"]


def test_a_restart_marks_a_suspended_job_whose_process_is_gone_lost(
    box: DaemonProc, shared_dir: Path
) -> None:
    out = shared_dir / "count.txt"
    h = counter.spawn(str(out), 1000, 0.05)
    wait_for(lambda: _lines(out) >= 3, timeout=30)
    with Client(url=box.url) as c:
        c.suspend(h.id)
    box.stop(signal.SIGKILL)
    kill_instance_jobs(box.data_dir)
    box.start()
    with Client(url=box.url) as c:
        wait_for(lambda: c.get_job(h.id).state == "lost", timeout=20)
        assert "suspended" in (c.get_job(h.id).error or "")
    assert os.path.exists(out)


def test_podman_pauses_and_unpauses_a_job_container(base_dir: Path, shared_dir: Path) -> None:
    """The Podman executor suspends with `podman pause` (the cgroup freezer)."""
    env = executor_env("podman")
    out = shared_dir / "count.txt"
    for d in _run_daemon(base_dir, env):
        app.close()
        h = counter.spawn(str(out), 30, 0.05)
        wait_for(lambda: _lines(out) >= 3, timeout=60)
        with Client(url=d.url) as c:
            assert c.suspend(h.id).state == "suspended"
            time.sleep(0.3)
            frozen = _lines(out)
            time.sleep(1.0)
            assert _lines(out) == frozen
            assert c.resume(h.id).state == "running"
        assert h.get(timeout=60) == 30
        app.close()


def test_resume_waits_for_its_gpu_ahead_of_newer_work(box: DaemonProc, shared_dir: Path) -> None:
    """One fake H100. A suspended job's GPU goes to another job; asked to resume, it waits
    for it (saying so), and gets it back before a job queued after it."""
    low_out, release = shared_dir / "low.txt", shared_dir / "release"
    low = gpu_counter.with_options(preemptible=False).spawn(str(low_out), 60, 0.05)
    wait_for(lambda: _lines(low_out) >= 2, timeout=30)
    with Client(url=box.url) as c:
        c.suspend(low.id)
        mid = gpu_holder.with_options(preemptible=False).spawn(str(release))
        wait_for(lambda: c.get_job(mid.id).state == "running", timeout=20)
        job = c.resume(low.id)  # answers after 10 s, still waiting
        assert job.state == "suspended"
        assert job.reason is not None and job.reason.endswith("; resumes when its GPUs free up"), (
            job.reason
        )
        newer = gpu_counter.spawn(str(shared_dir / "new.txt"), 1, 0.0)
        release.touch()
        assert mid.get(timeout=60) == "released"
        wait_for(lambda: c.get_job(low.id).state != "suspended", timeout=20)
        assert c.get_job(newer.id).state == "queued"
    assert low.get(timeout=60) == 60
    assert newer.get(timeout=60) == 1
