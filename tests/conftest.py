"""Shared fixtures: real daemons on real sockets over real SQLite files.

Two ways to get a daemon:
* ``served`` starts :func:`gpud.server.serve` inside the test's trio nursery (for API
  tests with the async client);
* ``daemon`` runs `gpud serve` as a subprocess, as a user would (for the sync client,
  the CLI, and SIGKILL/restart tests).
Jobs run as real processes, or in Podman containers: ``daemon`` and ``fresh_daemon`` are
parametrised over both executors. As root (CI) a job runs as its submitter's Unix user,
and the test itself (root) submits as root, whose jobs run as ``nobody``; so data
directories are made under /tmp with modes such users can traverse. The shared-box
fixtures (real Unix users, tokens, TCP) are at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from gpud.testing.daemon_proc import DaemonProc as _DaemonProc
from gpud.testing.daemon_proc import free_port, kill_instance_jobs

REPO = Path(__file__).resolve().parent.parent
GPUD = [sys.executable, "-m", "gpud"]

# Jobs run with their caller's own interpreter by default (#11). This process's is the
# repository's .venv, whose base interpreter may sit where a job user cannot go (a pyenv
# Python under a 0700 /root while root's jobs run as nobody), so the suite's jobs ask for
# the admin's; tests/test_caller_env.py runs jobs from environments of its own.
os.environ.setdefault("GPUD_JOB_PYTHON", "daemon")

# Fast settings for tests: short kill grace and backoff; two fake H100s and an L4.
TEST_SETTINGS = {
    "GPUD_GPUS": "fake",
    "GPUD_FAKE_GPUS": "h100,h100,l4",
    "GPUD_KILL_GRACE": "1",
    "GPUD_RETRY_BACKOFF": "0.2",
    "GPUD_CPU_SLOTS": "4",
    "GPUD_GPU_POLL_INTERVAL": "0.2",
    "GPUD_LOG_LEVEL": "info",
    # No collection behind a test's back (tests write jobs with old times into ledgers);
    # tests/test_retention.py runs `gpud gc` and the periodic loop itself.
    "GPUD_RETENTION_INTERVAL": "none",
}


def make_base_dir() -> Path:
    base = Path(tempfile.mkdtemp(prefix="gpud-test-", dir="/tmp"))
    os.chmod(base, 0o755)
    return base


@pytest.fixture
def base_dir() -> Iterator[Path]:
    base = make_base_dir()
    yield base
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class DaemonProc(_DaemonProc):
    """`gpud serve` in a subprocess (gpud.testing.daemon_proc), with the tests' settings."""

    settings: Mapping[str, str] = field(default_factory=lambda: dict(TEST_SETTINGS))


EXECUTORS = ["process", "podman"]
#: Jobs may write here whichever user and executor runs them: Podman jobs get it mounted
#: at the same path (as an admin would mount shared datasets with podman_volumes).
SHARED_ROOT = Path(tempfile.gettempdir()) / f"gpud-test-shared-{os.getpid()}"


def podman_problem() -> str | None:
    """Why Podman tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "the Podman executor needs rootful Podman (run as root)"
    if shutil.which("podman") is None:
        return "podman is not installed (run ../shared/ci/podman-host-setup.sh --image)"
    image = "localhost/gpud-python:{}.{}".format(*sys.version_info)
    probe = subprocess.run(["podman", "image", "exists", image], capture_output=True)
    if probe.returncode != 0:
        return f"image {image} is missing (run ../shared/ci/podman-host-setup.sh --image)"
    return None


def require_podman() -> None:
    """Skip with the reason, or fail when CI demands Podman (GPUD_REQUIRE_PODMAN=1)."""
    why = podman_problem()
    if why is None:
        return
    if os.environ.get("GPUD_REQUIRE_PODMAN") == "1":
        pytest.fail(f"GPUD_REQUIRE_PODMAN=1 but {why}")
    pytest.skip(why)


def executor_env(executor: str) -> dict[str, str]:
    if executor == "process":
        return {}
    require_podman()
    SHARED_ROOT.mkdir(exist_ok=True)
    os.chmod(SHARED_ROOT, 0o777)
    return {
        "GPUD_EXECUTOR": "podman",
        "GPUD_PODMAN_START_SERVICE": "1",
        "GPUD_PODMAN_VOLUMES": f"{SHARED_ROOT}:{SHARED_ROOT}",
    }


def containers_of(d: DaemonProc, job_id: int | None = None) -> list[str]:
    """Ids of the Podman containers a test daemon has (for one job, or all)."""
    try:
        instance = (d.data_dir / "instance").read_text().strip()
    except OSError:
        return []
    cmd = ["podman", "ps", "-a", "-q", "--filter", f"label=gpud.daemon={instance}"]
    if job_id is not None:
        cmd += ["--filter", f"label=gpud.job={job_id}"]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.split()


def _finished_jobs_containers(d: DaemonProc) -> list[str]:
    """Containers whose job is over: those gpud must have removed."""
    from gpud.domain import FINAL
    from gpud.ledger import Ledger, UnknownJob

    out = []
    led = Ledger(d.data_dir / "ledger.db")
    try:
        for cid in containers_of(d):
            label = subprocess.run(
                ["podman", "inspect", "--format", '{{index .Config.Labels "gpud.job"}}', cid],
                capture_output=True,
                text=True,
            ).stdout.strip()
            try:
                if label and led.get(int(label)).state in FINAL:
                    out.append(cid)
            except (UnknownJob, ValueError):
                out.append(cid)
    finally:
        led.close()
    return out


def _run_daemon(base: Path, env: dict[str, str] | None = None) -> Iterator[DaemonProc]:
    d = DaemonProc(base, env=dict(env or {}))
    d.start()
    old = os.environ.get("GPUD_URL")
    os.environ["GPUD_URL"] = d.url
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("GPUD_URL", None)
        else:
            os.environ["GPUD_URL"] = old
        d.stop()
        kill_instance_jobs(d.data_dir)
        if d.executor == "podman":
            leaked = _finished_jobs_containers(d)
            leftover = containers_of(d)  # incl. running jobs' (a stopped daemon leaves them)
            if leftover:
                subprocess.run(["podman", "rm", "-f", *leftover], capture_output=True)
            assert not leaked, f"containers of finished jobs left behind: {leaked}"


@pytest.fixture(scope="module", params=EXECUTORS)
def daemon(request: pytest.FixtureRequest) -> Iterator[DaemonProc]:
    """One `gpud serve` shared by a test module (tests there must not depend on its
    state), once per executor."""
    env = executor_env(request.param)
    base = make_base_dir()
    try:
        yield from _run_daemon(base, env)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=EXECUTORS)
def fresh_daemon(request: pytest.FixtureRequest, base_dir: Path) -> Iterator[DaemonProc]:
    """A `gpud serve` of this test's own, which it may kill and restart."""
    yield from _run_daemon(base_dir, executor_env(request.param))


@pytest.fixture
def process_daemon(base_dir: Path) -> Iterator[DaemonProc]:
    """A `gpud serve` of this test's own with the process executor only."""
    yield from _run_daemon(base_dir)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory jobs can write to whichever user (and executor) runs them."""
    SHARED_ROOT.mkdir(exist_ok=True)
    os.chmod(SHARED_ROOT, 0o777)
    d = Path(tempfile.mkdtemp(dir=SHARED_ROOT))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


#: the single-node Slurm of tests/test_slurm.py and the contract suite's Slurm harness (#15)
SLURM_LOCAL = REPO.parent / "shared" / "ci" / "slurm-local.sh"


def _slurm_problem() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurm-local.sh starts munged and slurmd)"
    if not SLURM_LOCAL.exists():
        return f"{SLURM_LOCAL} is missing"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """Start the single-node cluster once per session; stop it at the end if this session
    started it (one another test run on this machine started is left running: stopping it
    would pull it from under that run)."""
    why = _slurm_problem()
    out = None
    ours = False
    if why is None:
        ours = (
            subprocess.run(
                ["bash", str(SLURM_LOCAL), "status"], capture_output=True, timeout=60
            ).returncode
            != 0
        )
        out = subprocess.run(
            ["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=600
        )
        if out.returncode != 0:
            why = f"slurm-local.sh start failed: {out.stderr.strip()[-500:]}"
    if why is not None:
        if os.environ.get("GPUD_REQUIRE_SLURM") == "1":
            pytest.fail(f"GPUD_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    assert out is not None
    conf = out.stdout.strip().split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if ours:
            subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(SHARED_ROOT, ignore_errors=True)


@pytest.fixture
async def served(base_dir: Path, nursery):  # type: ignore[no-untyped-def]
    """The daemon in this test's trio nursery, with fake GPUs it can poke at."""
    from gpud.config import load_config
    from gpud.server import serve
    from gpud.testing import FakeGpuInventory

    env = dict(TEST_SETTINGS)
    env["GPUD_DATA_DIR"] = str(base_dir / "data")
    env["GPUD_SOCKET"] = str(base_dir / "gpud.sock")
    cfg = load_config(env=env)
    inv = FakeGpuInventory(cfg.fake_gpus)
    s = await nursery.start(partial(serve, cfg, inventory=inv, kill_jobs_on_exit=True))
    yield s
    kill_instance_jobs(cfg.data_dir)


def gpud_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `gpud` command line."""
    return subprocess.run(
        GPUD + list(args),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=str(REPO),
        input=None if input is None else input.decode(),
    )


# -- the shared box (#5): real Unix users, tokens, TCP ----------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="creates real Unix users and runs jobs as them: needs root (CI runs as root)",
)


@dataclass
class UnixUser:
    name: str
    uid: int
    gid: int
    home: Path


def create_unix_user(prefix: str) -> UnixUser:
    """A real, throw-away Unix user (root only): gpudt_<prefix>_<random>."""
    import pwd
    import secrets

    name = f"gpudt_{prefix}_{secrets.token_hex(3)}"
    home = Path("/tmp") / f"{name}-home"
    subprocess.run(
        [
            "useradd",
            "--create-home",
            "--home-dir",
            str(home),
            "--shell",
            "/bin/sh",
            "--user-group",
            name,
        ],
        check=True,
        capture_output=True,
    )
    pw = pwd.getpwnam(name)
    return UnixUser(name, pw.pw_uid, pw.pw_gid, home)


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry.path).st_uid == uid:
                    pids.append(int(entry.name))
    return pids


def delete_unix_user(user: UnixUser) -> None:
    """Remove a test user. userdel refuses while the user has processes, so first stop
    what the test left running as them (jobs of an aborted test), by pid."""
    for _ in range(50):
        pids = _pids_of(user.uid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    out = subprocess.run(["userdel", "--remove", user.name], capture_output=True, text=True)
    if out.returncode not in (0, 12):  # 12: no home directory to remove (already gone)
        import warnings

        warnings.warn(f"could not delete test user {user.name}: {out.stderr}", stacklevel=1)
    shutil.rmtree(user.home, ignore_errors=True)


@pytest.fixture
def unix_users() -> Iterator[Callable[[str], UnixUser]]:
    """Make real Unix users (deleted afterwards); skips unless root."""
    if os.geteuid() != 0:
        pytest.skip("creates real Unix users: needs root (CI runs as root)")
    made: list[UnixUser] = []

    def make(prefix: str) -> UnixUser:
        u = create_unix_user(prefix)
        made.append(u)
        return u

    yield make
    for u in made:
        delete_unix_user(u)


def add_gpud_user(data_dir: Path, name: str, *, admin: bool = False) -> str:
    """Register a gpud user straight in the ledger, as `gpud admin user add` does; return
    the token."""
    import time as _time

    from gpud.ledger import Ledger
    from gpud.ledger.users import add_user
    from gpud.users import hash_token, new_token

    token = new_token()
    led = Ledger(data_dir / "ledger.db")
    try:
        add_user(led, name, admin=admin, token_hash=hash_token(token), now=_time.time())
    finally:
        led.close()
    return token


@pytest.fixture
async def served_tcp(base_dir: Path, nursery):  # type: ignore[no-untyped-def]
    """Like ``served``, also listening on loopback TCP (where every request needs a token)."""
    from gpud.config import load_config
    from gpud.server import serve
    from gpud.testing import FakeGpuInventory

    env = dict(TEST_SETTINGS)
    env["GPUD_DATA_DIR"] = str(base_dir / "data")
    env["GPUD_SOCKET"] = str(base_dir / "gpud.sock")
    env["GPUD_TCP"] = f"127.0.0.1:{free_port()}"
    cfg = load_config(env=env)
    inv = FakeGpuInventory(cfg.fake_gpus)
    s = await nursery.start(partial(serve, cfg, inventory=inv, kill_jobs_on_exit=True))
    yield s
    kill_instance_jobs(cfg.data_dir)


def wait_for(pred: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``pred`` every 50 ms until it is true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def pid_alive(pid: int) -> bool:
    """Is the process there and not a zombie?"""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
