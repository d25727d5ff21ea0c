"""End to end: the real client against `gpud serve` in a subprocess, jobs as real processes."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

import gpud_client as gpud
from gpud_client import Client, JobCancelled, JobFailed, JobTimedOut

from .conftest import DaemonProc, containers_of, pid_alive, wait_for

app = gpud.App("e2e")


@pytest.fixture(autouse=True)
def _app_talks_to_this_daemon(daemon: DaemonProc) -> None:
    """The module's daemon changes with the executor parameter: drop the app's connection
    to the previous one (a real script has one daemon for its life)."""
    app.close()


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def boom(message: str) -> None:
    raise ValueError(message)


@app.function()
def whoami() -> dict:
    import os

    return {"uid": os.getuid(), "gid": os.getgid(), "env": dict(os.environ), "cwd": os.getcwd()}


@app.function(gpu="h100")
def one_h100(hold: float = 0.0) -> str:
    import os
    import time

    time.sleep(hold)
    return os.environ["CUDA_VISIBLE_DEVICES"]


@app.function()
def chatty(lines: int, pause: float) -> int:
    import sys
    import time

    for i in range(lines):
        print(f"line {i}")
        print(f"err {i}", file=sys.stderr)
        time.sleep(pause)
    return lines


@app.function()
def sleeper(seconds: float, pidfile: str = "") -> str:
    import os
    import subprocess
    import time

    if pidfile:
        # A grandchild in the job's process group: stopping the job must stop it too.
        child = subprocess.Popen(["sleep", "1000"])
        with open(pidfile, "w") as fh:
            fh.write(f"{os.getpid()} {child.pid}\n")
    time.sleep(seconds)
    return "slept"


@app.function()
def holder(pidfile: str, release: str) -> str:
    """Runs until ``release`` exists (at most 2 minutes): a job that is surely still
    running when the test wants it to be, however loaded the machine."""
    import os
    import time

    with open(pidfile, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "released"


@app.function(retries=2)
def flaky(marker: str, fail_times: int) -> int:
    import os

    n = len(os.listdir(marker))
    with open(os.path.join(marker, f"attempt-{n}"), "w"):
        pass
    if n < fail_times:
        raise RuntimeError(f"failure {n}")
    return n


def job_alive(daemon: DaemonProc, job_id: int, pids: list[int]) -> bool:
    """Is anything of the job still running? A Podman job's pids are its container's own
    (namespaced), so there the container tells: removed means every process is gone."""
    if daemon.executor == "podman":
        return bool(containers_of(daemon, job_id))
    return any(pid_alive(p) for p in pids)


def kill_behind_daemons_back(daemon: DaemonProc, job_id: int, leader: int) -> None:
    import signal
    import subprocess

    if daemon.executor == "podman":
        subprocess.run(
            ["podman", "rm", "-f", *containers_of(daemon, job_id)], check=True, capture_output=True
        )
    else:
        os.killpg(leader, signal.SIGKILL)
        wait_for(lambda: not pid_alive(leader))


# -- the basics ----------------------------------------------------------------------------


def test_remote_spawn_map(daemon: DaemonProc) -> None:
    assert square.remote(7) == 49
    handle = square.spawn(7)
    assert handle.get(timeout=30) == 49
    assert handle.status().state == "succeeded"
    assert list(square.map(range(100))) == [i * i for i in range(100)]


def test_remote_exception_keeps_type_and_remote_traceback(daemon: DaemonProc) -> None:
    with pytest.raises(ValueError, match="bad") as info:
        boom.remote("bad")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes and "raise ValueError(message)" in notes


def test_map_return_exceptions(daemon: DaemonProc) -> None:
    out = list(boom.map(["a", "b"], return_exceptions=True))
    assert [type(e) for e in out] == [ValueError, ValueError]
    assert [str(e) for e in out] == ["a", "b"]


def test_job_runs_unprivileged_with_a_clean_environment(daemon: DaemonProc) -> None:
    os.environ["GPUD_TEST_SECRET"] = "leak"  # the daemon's env had none, the client's has it
    try:
        info = whoami.with_options(env={"MY_VAR": "1"}).remote()
    finally:
        del os.environ["GPUD_TEST_SECRET"]
    if os.geteuid() == 0:
        assert info["uid"] == pwd.getpwnam("nobody").pw_uid
    else:
        assert info["uid"] == os.geteuid()
    assert info["uid"] != 0
    env = info["env"]
    assert env["MY_VAR"] == "1" and "GPUD_TEST_SECRET" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU-only job sees no GPU
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    if daemon.executor == "podman":
        assert info["cwd"] == "/gpud/job"  # the job directory, mounted
    else:
        assert info["cwd"].startswith(str(daemon.data_dir))


def test_job_directory_is_private_to_the_job_user(daemon: DaemonProc) -> None:
    handle = square.spawn(3)
    assert handle.get(timeout=30) == 9
    jobdir = daemon.data_dir / "jobs" / str(handle.id)
    st = jobdir.stat()
    assert st.st_mode & 0o777 == 0o700
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert st.st_uid == expected


# -- GPUs ----------------------------------------------------------------------------------


def test_gpu_job_sees_exactly_its_gpu_by_uuid(daemon: DaemonProc) -> None:
    handle = one_h100.spawn()
    visible = handle.get(timeout=30)
    job = handle.status()
    assert job.gpus == [visible] and visible.startswith("GPU-")
    assert job.gpu_indices in ([0], [1])


def test_two_gpu_jobs_never_share_and_a_third_waits_with_a_reason(daemon: DaemonProc) -> None:
    a, b = one_h100.spawn(3.0), one_h100.spawn(3.0)
    with Client() as c:
        wait_for(lambda: c.get_job(a.id).state == "running" and c.get_job(b.id).state == "running")
        third = one_h100.spawn(0.0)
        wait_for(lambda: c.get_job(third.id).reason is not None)
        info = c.get_job(third.id)
        assert info.state == "queued" and info.position == 1
        assert "waiting for 1 x h100" in info.reason and f"job {a.id}" in info.reason
        held = {g.job_id for g in c.gpus().gpus if g.type == "h100"}
        assert held == {a.id, b.id}
    va, vb = a.get(timeout=30), b.get(timeout=30)
    assert va != vb
    assert third.get(timeout=30) in (va, vb)


# -- logs ----------------------------------------------------------------------------------


def test_logs_follow_streams_until_the_end(daemon: DaemonProc) -> None:
    handle = chatty.spawn(5, 0.2)
    text = "".join(handle.logs(follow=True))
    assert [f"line {i}" in text for i in range(5)] == [True] * 5
    assert "err 4" in text
    assert handle.get(timeout=10) == 5
    assert "".join(handle.logs()) == text


# -- stop means stop -----------------------------------------------------------------------


def test_cancel_running_job_kills_its_whole_process_group(
    daemon: DaemonProc, shared_dir: Path
) -> None:
    pidfile = shared_dir / "pids"
    handle = sleeper.with_options(gpu="h100").spawn(600, str(pidfile))
    wait_for(pidfile.exists)
    wait_for(lambda: pidfile.read_text().endswith("\n"))
    leader, child = map(int, pidfile.read_text().split())
    assert job_alive(daemon, handle.id, [leader]) and job_alive(daemon, handle.id, [child])
    info = handle.cancel()
    assert info.state == "cancelled"
    wait_for(lambda: not job_alive(daemon, handle.id, [leader, child]), timeout=5)
    with pytest.raises(JobCancelled):
        handle.get(timeout=5)
    with Client() as c:
        assert all(g.job_id != handle.id for g in c.gpus().gpus)


def test_cancel_queued_job(daemon: DaemonProc) -> None:
    blockers = [one_h100.spawn(5.0) for _ in range(2)]
    queued = one_h100.spawn(0.0)
    info = queued.cancel()
    assert info.state == "cancelled" and info.attempt == 0
    for b in blockers:
        b.cancel()


def test_timeout_kills_the_job(daemon: DaemonProc, shared_dir: Path) -> None:
    pidfile = shared_dir / "pids"
    handle = sleeper.with_options(timeout=1).spawn(600, str(pidfile))
    with pytest.raises(JobTimedOut, match="timed out"):
        handle.get(timeout=30)
    leader, child = map(int, pidfile.read_text().split())
    wait_for(lambda: not job_alive(daemon, handle.id, [leader, child]), timeout=5)
    assert handle.status().state == "timed_out"


# -- retries -------------------------------------------------------------------------------


def test_retries_until_success(daemon: DaemonProc, shared_dir: Path) -> None:
    marker = shared_dir / "m"
    marker.mkdir()
    os.chmod(marker, 0o777)
    handle = flaky.spawn(str(marker), 2)
    assert handle.get(timeout=60) == 2
    job = handle.status()
    assert job.attempt == 3 and job.state == "succeeded"
    log = "".join(handle.logs())
    assert "[gpud] attempt 2 of 3" in log and "[gpud] attempt 3 of 3" in log


def test_retries_exhausted_fail(daemon: DaemonProc, shared_dir: Path) -> None:
    marker = shared_dir / "m"
    marker.mkdir()
    os.chmod(marker, 0o777)
    handle = flaky.with_options(retries=1).spawn(str(marker), 5)
    with pytest.raises(RuntimeError, match="failure 1"):
        handle.get(timeout=60)
    job = handle.status()
    assert job.state == "failed" and job.attempt == 2
    assert len(os.listdir(marker)) == 2


def test_crash_without_result_is_a_clear_failure(daemon: DaemonProc) -> None:
    @gpud.function
    def die() -> None:
        import os

        os._exit(7)

    with pytest.raises(JobFailed, match="exited with code 7"):
        die.remote()


# -- restart -------------------------------------------------------------------------------


def test_sigkill_daemon_mid_job_then_restart_adopts_and_collects(
    fresh_daemon: DaemonProc, shared_dir: Path
) -> None:
    import signal

    pidfile, release = shared_dir / "pids", shared_dir / "release"
    handle = holder.with_options(url=fresh_daemon.url).spawn(str(pidfile), str(release))
    wait_for(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"))
    leader = int(pidfile.read_text().split()[0])
    fresh_daemon.stop(signal.SIGKILL)
    assert job_alive(fresh_daemon, handle.id, [leader])  # the job outlives its daemon
    led = fresh_daemon.ledger()
    assert led.integrity_check() == "ok" and led.get(handle.id).state.value == "running"
    led.close()
    fresh_daemon.start()
    # Still running when the new daemon looks: it must adopt it, then see it end.
    wait_for(lambda: f"job {handle.id} adopted" in fresh_daemon.log.read_text(), timeout=30)
    release.touch()
    assert handle.get(timeout=30) == "released"
    job = handle.status()
    assert job.state == "succeeded" and job.attempt == 1  # adopted, not re-run


def test_job_gone_after_restart_is_lost_then_retried(
    fresh_daemon: DaemonProc, shared_dir: Path
) -> None:
    import signal

    pidfile = shared_dir / "pids"
    handle = sleeper.with_options(retries=1, url=fresh_daemon.url).spawn(600, str(pidfile))
    wait_for(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"))
    leader = int(pidfile.read_text().split()[0])
    fresh_daemon.stop(signal.SIGKILL)
    kill_behind_daemons_back(fresh_daemon, handle.id, leader)  # dies while nobody watches
    pidfile.unlink()
    fresh_daemon.start()
    # Lost, then retried: a second attempt runs (and writes the pidfile again).
    wait_for(lambda: pidfile.exists(), timeout=30)
    job = handle.status()
    assert job.attempt == 2 and job.state in ("starting", "running")
    led = fresh_daemon.ledger()
    states = [e.to_state.value for e in led.events(handle.id)]
    led.close()
    assert states[:5] == ["queued", "starting", "running", "lost", "queued"]
    handle.cancel()


def test_job_gone_without_retries_stays_lost(fresh_daemon: DaemonProc, shared_dir: Path) -> None:
    import signal

    pidfile = shared_dir / "pids"
    handle = sleeper.with_options(url=fresh_daemon.url).spawn(600, str(pidfile))
    wait_for(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"))
    leader = int(pidfile.read_text().split()[0])
    fresh_daemon.stop(signal.SIGKILL)
    kill_behind_daemons_back(fresh_daemon, handle.id, leader)
    fresh_daemon.start()
    with pytest.raises(gpud.JobLost):
        handle.get(timeout=30)
