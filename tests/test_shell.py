"""`gpud shell`, `gpud attach` and `gpud exec` (#14) on a real PTY against a real daemon."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator

import pexpect
import pytest

from gpud.testing.daemon_proc import DaemonProc
from gpud_client import Client
from gpud_client.models import JobInfo
from tests.conftest import (
    EXECUTORS,
    GPUD,
    REPO,
    TEST_SETTINGS,
    add_gpud_user,
    executor_env,
    gpud_cli,
    make_base_dir,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=EXECUTORS)
def tcp_daemon(request: pytest.FixtureRequest) -> Iterator[DaemonProc]:
    base = make_base_dir()
    env = {**executor_env(request.param), "GPUD_SHELL_IDLE_TIMEOUT": "2"}
    d = DaemonProc(base, settings=TEST_SETTINGS, env=env, tcp=True)
    d.start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def _spawn(d: DaemonProc, *args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    e = dict(os.environ, GPUD_URL=d.url, TERM="dumb", **(env or {}))
    e.pop("GPUD_TOKEN", None)
    return pexpect.spawn(
        GPUD[0], [*GPUD[1:], *args], env=e, cwd=str(REPO), timeout=60, encoding="utf-8"
    )


def _job(d: DaemonProc, job_id: str) -> JobInfo:
    with Client(d.url) as c:
        return c.get_job(int(job_id))


def _final(d: DaemonProc, job_id: str) -> JobInfo:
    with Client(d.url) as c:
        return c.wait(int(job_id), timeout=30)


def test_shell_runs_on_the_jobs_gpus_exits_succeeded_and_is_accounted(tcp_daemon: DaemonProc):
    d = tcp_daemon
    child = _spawn(d, "shell", "--gpu", "h100:2", "--timeout", "10m")
    child.expect(r"job (\d+) queued")
    job_id = child.match.group(1)
    child.expect(r"\$ ")
    child.sendline("echo CVD=$CUDA_VISIBLE_DEVICES; echo JOB=$GPUD_JOB_ID")
    child.expect(r"CVD=(GPU-[^\r\n]*)\r?\n")
    cvd = child.match.group(1)
    child.expect(f"JOB={job_id}")
    assert len(cvd.split(",")) == 2
    assert cvd == ",".join(_job(d, job_id).gpus)
    child.sendline("exit")
    child.expect(r"exited \(0\)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    job = _final(d, job_id)
    assert job.state == "succeeded", job
    assert job.gpu_seconds > 0
    usage = gpud_cli("usage", env=d.client_env())
    assert usage.returncode == 0, usage.stderr
    assert "root" in usage.stdout, usage.stdout


def test_nonzero_exit_fails_the_job_with_its_code(tcp_daemon: DaemonProc) -> None:
    child = _spawn(tcp_daemon, "shell")
    child.expect(r"job (\d+) queued")
    job_id = child.match.group(1)
    child.expect(r"\$ ")
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3
    job = _final(tcp_daemon, job_id)
    assert job.state == "failed" and "3" in (job.error or ""), job


def test_detach_attach_others_refused_and_exec(tcp_daemon: DaemonProc) -> None:
    d = tcp_daemon
    child = _spawn(d, "shell", "--gpu", "h100")
    child.expect(r"job (\d+) queued")
    job_id = child.match.group(1)
    child.expect(r"\$ ")
    child.sendline("export MARK=kept; echo READY")
    child.expect("READY")
    child.send("\x1dd")  # Ctrl-] d
    child.expect(rf"detached from job {job_id}")
    child.expect(pexpect.EOF)

    # Another user, over TCP with their token: refused as for a job they cannot touch.
    token = add_gpud_user(d.data_dir, f"bob_{os.getpid()}")
    env = {"GPUD_URL": d.tcp_url, "GPUD_TOKEN": token}
    other = gpud_cli("attach", job_id, env=dict(os.environ, **env))
    assert other.returncode != 0
    assert "only its owner" in other.stderr
    other = gpud_cli("exec", job_id, "--", "true", env=dict(os.environ, **env))
    assert other.returncode != 0 and "only its owner" in other.stderr

    # exec: the job's environment, its exit code.
    ran = gpud_cli(
        "exec",
        job_id,
        "--",
        "sh",
        "-c",
        "echo $GPUD_JOB_ID $CUDA_VISIBLE_DEVICES; exit 7",
        env=d.client_env(),
    )
    assert ran.returncode == 7, ran.stderr
    assert ran.stdout.split() == [job_id, ",".join(_job(d, job_id).gpus)]

    again = _spawn(d, "attach", job_id)
    again.sendline("echo MARK=$MARK")
    again.expect("MARK=kept")
    again.sendline("exit")
    again.expect(r"exited \(0\)")
    again.expect(pexpect.EOF)


def test_an_idle_session_ends(tcp_daemon: DaemonProc) -> None:
    out = gpud_cli("shell", "--detach", env=tcp_daemon.client_env())
    job_id = out.stdout.strip()
    assert job_id.isdigit(), out.stderr
    job = _final(tcp_daemon, job_id)
    assert job.state == "failed" and "idle" in (job.error or ""), job


def test_exec_needs_a_command(tcp_daemon: DaemonProc) -> None:
    out = gpud_cli("exec", "1", env=tcp_daemon.client_env())
    assert out.returncode == 2
    assert sys.executable  # the CLI is the real one
