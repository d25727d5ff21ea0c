"""Long runs (#14, items 1 and 2): a state directory kept across attempts, the early
warning before the timeout, TERM / grace / KILL with the events saying which ended a
job, and ``@gpud.exit``. Real daemons, over both executors (the Podman runs skip
without Podman, and fail in CI where it is required)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import gpud_client as gpud
from gpud_client import Client, JobCancelled, JobTimedOut

from .conftest import DaemonProc, gpud_cli, wait_for

app = gpud.App("longrun")


@pytest.fixture(autouse=True)
def _app_talks_to_this_daemon(daemon: DaemonProc) -> None:
    app.close()


@app.function(retries=1)
def train(steps: int, fail_at: int) -> dict:
    """A training loop that checkpoints every step and crashes once, on attempt 1."""
    import json
    import os

    d = os.environ["GPUD_STATE_DIR"]
    ckpt = os.path.join(d, "ckpt.json")
    start = 0
    if os.path.exists(ckpt):
        with open(ckpt) as fh:
            start = json.load(fh)["step"]
    ran = []
    for step in range(start + 1, steps + 1):
        ran.append(step)
        with open(os.path.join(d, "steps.log"), "a") as fh:
            fh.write(f"{step}\n")
        with open(ckpt + ".tmp", "w") as fh:
            json.dump({"step": step}, fh)
        os.replace(ckpt + ".tmp", ckpt)
        if step == fail_at and os.environ["GPUD_ATTEMPT"] == "1":
            raise RuntimeError(f"crashed at step {step}")
    return {"attempt": int(os.environ["GPUD_ATTEMPT"]), "start": start, "ran": ran}


@app.function(timeout="6s", signal_before="3s")
def warned() -> None:
    """Saves its state on the warning; its atexit hook (run on SIGTERM) notes the stop."""
    import atexit
    import os
    import signal
    import time

    d = os.environ["GPUD_STATE_DIR"]
    t0 = time.monotonic()

    def save(signum: int, frame: object) -> None:
        with open(os.path.join(d, "saved.txt"), "w") as fh:
            fh.write(f"{time.monotonic() - t0:.3f}\n")

    def stopped() -> None:
        with open(os.path.join(d, "stopped.txt"), "w") as fh:
            fh.write(f"{time.monotonic() - t0:.3f}\n")

    signal.signal(signal.SIGUSR1, save)
    atexit.register(stopped)
    while True:
        time.sleep(0.05)


@app.function()
def stubborn(pidfile: str) -> None:
    """Ignores SIGTERM: only the KILL after the grace ends it."""
    import os
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pidfile, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    while True:
        time.sleep(0.05)


@app.function()
def patient(pidfile: str) -> None:
    import os
    import time

    with open(pidfile, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    while True:
        time.sleep(0.05)


@app.function()
def forks(pidfile: str) -> None:
    """Its exit hook must run once, in the worker, not in the child it forked too."""
    import atexit
    import os
    import time

    d = os.environ["GPUD_STATE_DIR"]

    def hook() -> None:
        with open(os.path.join(d, "hooks.txt"), "a") as fh:
            fh.write(f"{os.getpid()}\n")

    atexit.register(hook)
    child = os.fork()
    if child == 0:
        while True:
            time.sleep(0.05)
    with open(pidfile, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    while True:
        time.sleep(0.05)


@app.cls()
class Trainer:
    @gpud.method()
    def step(self, n: int) -> int:
        self.n = n
        return n * 2

    @gpud.exit()
    def save(self) -> None:
        import os

        with open(os.path.join(os.environ["GPUD_STATE_DIR"], "exit.txt"), "w") as fh:
            fh.write(f"saved {self.n}\n")


def _state(job_id: int, path: str) -> bytes:
    with Client() as c:
        return b"".join(c.state_file(job_id, path))


def test_training_resumes_from_its_last_checkpoint_on_attempt_2(daemon: DaemonProc) -> None:
    handle = train.spawn(6, 3)
    assert handle.get(timeout=60) == {"attempt": 2, "start": 3, "ran": [4, 5, 6]}
    info = handle.status()
    assert info.state == "succeeded" and info.attempt == 2
    # Six steps in all, each run once: 1-3 on attempt 1, 4-6 on attempt 2.
    assert _state(handle.id, "steps.log").split() == [b"1", b"2", b"3", b"4", b"5", b"6"]
    with Client() as c:
        listing = c.state_files(handle.id)
    assert [f.path for f in listing.files] == ["ckpt.json", "steps.log"]
    assert json.loads(_state(handle.id, "ckpt.json")) == {"step": 6}
    assert listing.total_bytes == sum(f.size for f in listing.files) > 0


@pytest.mark.parametrize("keep_warm", [0, 2], ids=["cold", "warm"])
def test_signal_before_the_timeout_lets_the_job_save_its_state(
    daemon: DaemonProc, keep_warm: float
) -> None:
    handle = warned.with_options(keep_warm=keep_warm).spawn()
    with pytest.raises(JobTimedOut):
        handle.get(timeout=60)
    info = handle.status()
    assert info.state == "timed_out"
    assert (info.signal_before, info.signal) == (3.0, None)
    saved = float(_state(handle.id, "saved.txt"))
    stopped = float(_state(handle.id, "stopped.txt"))
    # About 3 s before the end: the warning at deadline - 3 s, the TERM at the deadline
    # (the user's code begins a little after the job's start, so "saved" is a bit under 3).
    assert 1.0 < saved < 3.5, saved
    assert 2.0 < stopped - saved < 4.0, (saved, stopped)
    assert info.error == "timed out after 6 s: ended by SIGTERM before the grace ran out"
    log = "".join(handle.logs())
    assert "[gpud] sent SIGUSR1: the job's timeout is in 3 s" in log


def test_a_job_that_ignores_sigterm_is_killed_after_its_grace(
    daemon: DaemonProc, shared_dir: Path
) -> None:
    pidfile = shared_dir / "pid"
    handle = stubborn.with_options(grace=1).spawn(str(pidfile))
    wait_for(pidfile.exists, timeout=30)
    t0 = time.monotonic()
    info = handle.cancel()
    assert time.monotonic() - t0 >= 0.9
    assert info.state == "cancelled" and info.grace == 1.0
    assert info.error == "cancelled: killed (SIGKILL) after 1 s grace"
    with Client() as c:
        events = c.events(job_id=handle.id).events
    assert (events[-1].to_state, events[-1].reason) == ("cancelled", info.error)


def test_a_cancel_that_sigterm_ends_says_so(daemon: DaemonProc, shared_dir: Path) -> None:
    pidfile = shared_dir / "pid"
    handle = patient.spawn(str(pidfile))
    wait_for(pidfile.exists, timeout=30)
    info = handle.cancel()
    assert info.error == "cancelled: ended by SIGTERM after cancel"
    with Client() as c:
        assert c.events(job_id=handle.id).events[-1].reason == info.error
    with pytest.raises(JobCancelled):
        handle.get(timeout=5)


def test_sigterm_runs_exit_hooks_once_in_the_worker_not_its_forks(
    daemon: DaemonProc, shared_dir: Path
) -> None:
    pidfile = shared_dir / "pid"
    handle = forks.spawn(str(pidfile))
    wait_for(pidfile.exists, timeout=30)
    wait_for(lambda: pidfile.read_text().endswith("\n"))
    info = handle.cancel()
    assert info.error == "cancelled: ended by SIGTERM after cancel"
    assert _state(handle.id, "hooks.txt") == pidfile.read_bytes()


def test_exit_methods_run_when_the_worker_ends(daemon: DaemonProc) -> None:
    handle = Trainer().step.spawn(21)
    assert handle.get(timeout=60) == 42
    assert _state(handle.id, "exit.txt") == b"saved 21\n"


def test_exit_methods_of_a_warm_worker_run_when_it_is_let_go(daemon: DaemonProc) -> None:
    handle = Trainer().step.with_options(keep_warm=1).spawn(5)
    assert handle.get(timeout=60) == 10
    # Not while it is kept warm; once its keep_warm ran out and it was closed.
    wait_for(
        lambda: any(f.path == "exit.txt" for f in Client().state_files(handle.id).files), timeout=30
    )
    assert _state(handle.id, "exit.txt") == b"saved 5\n"


def test_state_dir_is_private_and_kept_where_the_job_saw_it(daemon: DaemonProc) -> None:
    @gpud.function
    def where() -> dict:
        import os
        import stat

        d = os.environ["GPUD_STATE_DIR"]
        st = os.stat(d)
        return {"dir": d, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "me": os.getuid()}

    out = where.spawn().get(timeout=60)
    assert out["mode"] == 0o700 and out["uid"] == out["me"] != 0
    if daemon.executor == "podman":
        assert out["dir"] == "/gpud/state"
    else:
        assert out["dir"].endswith("/state") and Path(out["dir"]).parent.name.isdigit()


def test_gpud_state_lists_and_fetches(daemon: DaemonProc, tmp_path: Path) -> None:
    handle = train.spawn(2, 0)
    assert handle.get(timeout=60)["ran"] == [1, 2]
    env = daemon.client_env()
    out = gpud_cli("state", str(handle.id), env=env)
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["ckpt.json", "steps.log"]
    out = gpud_cli("state", str(handle.id), "steps.log", env=env)
    assert (out.returncode, out.stdout) == (0, "1\n2\n")
    dest = tmp_path / "ckpt.json"
    out = gpud_cli("state", str(handle.id), "ckpt.json", "-o", str(dest), env=env)
    assert out.returncode == 0 and json.loads(dest.read_text()) == {"step": 2}
    out = gpud_cli("state", str(handle.id), "../output.log", env=env)
    assert out.returncode == 1 and "gpud state JOB" in out.stderr
    out = gpud_cli("state", str(handle.id), "nothing", env=env)
    assert out.returncode == 1 and "has no file 'nothing'" in out.stderr
    out = gpud_cli("state", str(handle.id), "--json", env=env)
    assert json.loads(out.stdout)["total_bytes"] > 0


def test_gpud_run_takes_the_long_run_options(daemon: DaemonProc) -> None:
    env = daemon.client_env()
    out = gpud_cli(
        "run",
        "--detach",
        "--timeout",
        "1m",
        "--signal-before",
        "10s",
        "--signal",
        "usr2",
        "--grace",
        "3s",
        "examples/hello.py::square",
        "--x",
        "3",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    with Client() as c:
        info = c.get_job(int(out.stdout))
    assert (info.signal_before, info.signal, info.grace) == (10.0, "SIGUSR2", 3.0)
    out = gpud_cli(
        "run", "--signal-before", "soon", "examples/hello.py::square", "--x", "3", env=env
    )
    assert out.returncode == 2 and "invalid duration 'soon'" in out.stderr
    out = gpud_cli(
        "run",
        "--timeout",
        "10s",
        "--signal-before",
        "1m",
        "examples/hello.py::square",
        "--x",
        "3",
        env=env,
    )
    assert out.returncode == 2 and "shorter than the timeout" in out.stderr
    out = gpud_cli("run", "--grace", "1h", "examples/hello.py::square", "--x", "3", env=env)
    assert out.returncode != 0 and "max_grace" in out.stderr
