"""The shared box end to end (issue #5): real Unix users, a root daemon, real jobs.

Needs root (CI runs as root): it creates throw-away Unix users, and a root daemon runs
each job as its submitter. It proves that a job runs as its submitter's uid, gid and
groups; that its files are the submitter's and private (0700); that another user can
read them neither through the file system nor through the API.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gpud_client as gpud
from gpud_client import ApiError, Client

from .conftest import (
    EXECUTORS,
    DaemonProc,
    UnixUser,
    _run_daemon,
    executor_env,
    free_port,
    gpud_cli,
    needs_root,
)

pytestmark = needs_root


def _identity() -> dict[str, Any]:
    import os

    print("hello from the job")
    with open("note.txt", "w") as fh:  # written into the job directory (its cwd)
        fh.write("the job's own file\n")
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "home": os.environ["HOME"],
        "user": os.environ["USER"],
        "cwd": os.getcwd(),
    }


@pytest.fixture(params=EXECUTORS)
def box(request: pytest.FixtureRequest, base_dir: Path) -> Iterator[DaemonProc]:
    """A root daemon that also listens on TCP (tokens), once per executor: the Podman
    executor runs each container as the submitter's uid:gid and groups."""
    env = {**executor_env(request.param), "GPUD_TCP": f"127.0.0.1:{free_port()}"}
    yield from _run_daemon(base_dir, env)


@pytest.fixture
def process_box(base_dir: Path) -> Iterator[DaemonProc]:
    yield from _run_daemon(base_dir, {"GPUD_TCP": f"127.0.0.1:{free_port()}"})


def job_dir_of(d: DaemonProc, job_id: int, cwd: str) -> Path:
    """The job's directory on the host (a container sees it at /gpud/job)."""
    jobdir = d.data_dir / "jobs" / str(job_id)
    assert cwd == ("/gpud/job" if d.executor == "podman" else str(jobdir))
    return jobdir


def tcp_url(d: DaemonProc) -> str:
    line = next(x for x in d.log.read_text().splitlines() if "gpud serving on" in x)
    return "http://" + line.split(" and http://", 1)[1].split(";", 1)[0]


def add_user(d: DaemonProc, name: str) -> str:
    out = gpud_cli("admin", "--data-dir", str(d.data_dir), "user", "add", name, env=d.client_env())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def as_user(u: UnixUser, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd),
        user=u.uid,
        group=u.gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_jobs_run_as_their_submitter_and_their_files_are_private(
    box: DaemonProc, unix_users: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice: UnixUser = unix_users("alice")
    bob: UnixUser = unix_users("bob")
    # alice is also in a group of bob's: jobs get the submitter's supplementary groups.
    subprocess.run(["usermod", "-aG", bob.name, alice.name], check=True)
    a_tok, b_tok = add_user(box, alice.name), add_user(box, bob.name)
    url = tcp_url(box)

    monkeypatch.setenv("GPUD_TOKEN", a_tok)
    ident = gpud.App("shared-box", url=url).function()(_identity)
    handle = ident.spawn()
    got = handle.get(timeout=60)
    job = handle.status()
    assert job.owner == alice.name
    assert (got["uid"], got["euid"], got["gid"]) == (alice.uid, alice.uid, alice.gid)
    assert got["groups"] == sorted({alice.gid, bob.gid})
    # A container's HOME is its writable /tmp; a process job's is the user's own.
    home = "/tmp" if box.executor == "podman" else str(alice.home)
    assert (got["home"], got["user"]) == (home, alice.name)

    # The job directory and everything in it is alice's, and private.
    jobdir = job_dir_of(box, job.id, got["cwd"])
    st = jobdir.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (alice.uid, alice.gid, 0o700)
    names = sorted(p.name for p in jobdir.iterdir())
    assert {
        "function.pkl",
        "args.pkl",
        "job.json",
        "output.log",
        "result.pkl",
        "status.json",
        "note.txt",
    } <= set(names)
    for p in jobdir.iterdir():
        fst = p.lstat()
        assert (fst.st_uid, fst.st_gid) == (alice.uid, alice.gid), p
        if p.name == "state":  # its state directory (#14): alice's, private too
            assert stat.S_IMODE(fst.st_mode) == 0o700, p
        elif p.name != "note.txt":  # the job's own file has the job's umask
            assert stat.S_IMODE(fst.st_mode) == 0o600, p

    # bob can read none of it from the file system ...
    for cmd in (
        ["cat", str(jobdir / "output.log")],
        ["cat", str(jobdir / "result.pkl")],
        ["ls", str(jobdir)],
        ["ls", str(box.data_dir / "jobs")],
    ):
        r = as_user(bob, *cmd)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (cmd, r)
    # ... nor through the API; alice can.
    with Client(url, token=b_tok) as c:
        for call in (
            lambda: c.get_job(job.id),
            lambda: c.result(job.id),
            lambda: list(c.log_bytes(job.id)),
            lambda: c.cancel(job.id),
        ):
            with pytest.raises(ApiError) as e:
                call()
            assert e.value.status == 403 and f"belongs to {alice.name}" in e.value.detail
    with Client(url, token=a_tok) as c:
        assert b"hello from the job" in b"".join(c.log_bytes(job.id))
        assert c.whoami().runs_as == alice.name


def test_root_jobs_still_run_as_job_user(box: DaemonProc) -> None:
    # On the socket the test (root) is an admin; its jobs run as job_user, never root.
    ident = gpud.App("shared-box-root", url=box.url).function()(_identity)
    handle = ident.spawn()
    got = handle.get(timeout=60)
    assert got["uid"] == got["euid"] != 0
    assert job_dir_of(box, handle.id, got["cwd"]).stat().st_uid == got["uid"]


def test_each_user_gets_a_python_they_can_run(
    process_box: DaemonProc, unix_users: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's own interpreter may sit where a user cannot go (a venv under /root):
    it is probed as each job user, who falls back to the system python3 if need be.
    (Process executor only: a container runs its image's python3.)"""
    box = process_box
    carol: UnixUser = unix_users("carol")
    monkeypatch.setenv("GPUD_TOKEN", add_user(box, carol.name))

    def which_python() -> str:
        import sys

        return sys.executable

    fn = gpud.App("shared-box-py", url=tcp_url(box)).function()(which_python)
    exe = fn.remote()
    assert as_user(carol, exe, "-c", "pass").returncode == 0
    assert os.access(exe, os.X_OK)


def _whoami_warm() -> dict[str, Any]:
    import os

    return {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
    }


def test_warm_workers_run_as_their_submitter_and_serve_only_them(
    process_box: DaemonProc, unix_users: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm worker is launched with its first job's identity and is kept for the next
    calls of the same function by the same user only (warm workers: process executor)."""
    alice: UnixUser = unix_users("alice")
    bob: UnixUser = unix_users("bob")
    a_tok, b_tok = add_user(process_box, alice.name), add_user(process_box, bob.name)
    url = tcp_url(process_box)

    def warm_fn() -> gpud.Function[[], dict[str, Any]]:
        # A new App (and client) per user: a client keeps the token it started with.
        return gpud.App("shared-box-warm", url=url).function(keep_warm=30)(_whoami_warm)

    monkeypatch.setenv("GPUD_TOKEN", a_tok)
    fn = warm_fn()
    first = fn.spawn()
    first.get(timeout=60)
    second = fn.spawn()
    a1, a2 = first.get(timeout=60), second.get(timeout=60)
    assert (a1["uid"], a1["gid"], a1["groups"]) == (alice.uid, alice.gid, [alice.gid])
    assert a2 == a1  # the same process, still alice's
    assert second.status().start_kind == "warm"

    monkeypatch.setenv("GPUD_TOKEN", b_tok)
    b1 = warm_fn().remote()
    assert (b1["uid"], b1["gid"]) == (bob.uid, bob.gid) and b1["pid"] != a1["pid"]
