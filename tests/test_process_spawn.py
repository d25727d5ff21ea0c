"""How a root daemon starts a job as its user (#12): through setpriv, spawned with vfork,
the job gets exactly the identity ``Popen(user=, group=, extra_groups=)`` gave it, and
never root's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpud.daemon.jobfiles import judge
from gpud.executors.base import ExecutorRefusal, Outcome
from gpud.executors.process import (
    ProcessExecutor,
    find_setpriv,
    job_identity,
    switch_user_command,
)
from gpud.identity import JobIdentity

_FIELDS = ("Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapAmb:", "NoNewPrivs:")


def _identity_lines(status: str) -> list[str]:
    lines = [line for line in status.splitlines() if line.startswith(_FIELDS)]
    assert len(lines) == len(_FIELDS)
    return lines


def _needs_root_and_setpriv() -> str:
    if os.geteuid() != 0:
        pytest.skip("switches to another user: needs root (CI runs as root)")
    setpriv = find_setpriv()
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed here")
    return setpriv


@pytest.mark.parametrize("groups", [(), "member"])
def test_setpriv_gives_the_job_the_identity_popen_would(groups: object) -> None:
    setpriv = _needs_root_and_setpriv()
    nobody = job_identity("nobody")
    ident = JobIdentity(
        nobody.user,
        nobody.uid,
        nobody.gid,
        nobody.home,
        switch=True,
        groups=() if groups == () else (nobody.gid, 100, 20),
    )
    cmd = ["/bin/cat", "/proc/self/status"]  # anything the job user may run
    via_setpriv = subprocess.run(
        switch_user_command(setpriv, ident, cmd),
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
    ).stdout
    via_popen = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd="/", **ident.popen_kwargs()
    ).stdout
    assert _identity_lines(via_setpriv) == _identity_lines(via_popen)
    uids = next(line for line in via_setpriv.splitlines() if line.startswith("Uid:"))
    assert uids.split()[1:] == [str(ident.uid)] * 4  # real, effective, saved, fs: no way back
    caps = [line for line in via_setpriv.splitlines() if line.startswith(("CapPrm", "CapEff"))]
    assert caps and all(line.split()[1] == "0000000000000000" for line in caps)


def test_setpriv_refuses_root() -> None:
    root = JobIdentity("root", 0, 0, "/root", switch=True)
    with pytest.raises(ExecutorRefusal, match="never run as root"):
        switch_user_command("/usr/bin/setpriv", root, ["true"])


def test_setpriv_is_taken_only_as_roots_own_file(tmp_path: Path) -> None:
    fake = tmp_path / "setpriv"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(fake, 0, 0)
        assert find_setpriv([str(fake)]) == str(fake)
        fake.chmod(0o775)  # group-writable: someone else could replace what root runs
        assert find_setpriv([str(fake)]) is None
        fake.chmod(0o755)
        os.chown(fake, 65534, 0)
    assert find_setpriv([str(fake)]) is None  # not root's
    assert find_setpriv([str(tmp_path / "missing")]) is None


def test_a_daemon_that_is_not_root_switches_nobody(tmp_path: Path) -> None:
    me = JobIdentity("me", 1000, 1000, "/home/me", switch=False)
    ex = ProcessExecutor(
        python=sys.executable, version="3", runtime_dir=tmp_path, identity=me, instance="i"
    )
    assert ex.setpriv is None


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/root/.gpud-no-such-dir/python3"])
def test_an_interpreter_setpriv_cannot_exec_fails_the_job_saying_so(
    python: str, tmp_path: Path
) -> None:
    """Through setpriv, an interpreter the job user cannot execute is an exit code (126
    or 127, setpriv's message in the job's log), not an error raised at the spawn."""
    setpriv = _needs_root_and_setpriv()
    ident = job_identity("nobody")
    out = subprocess.run(
        switch_user_command(setpriv, ident, [python, "-c", "pass"]),
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert out.returncode in (126, 127)
    assert "setpriv" in out.stderr and python in out.stderr
    ended = judge(tmp_path, None, False, Outcome(exit_code=out.returncode))
    assert ended.error == (
        f"the job's interpreter could not be started (exit code {out.returncode}); its log says why"
    )
