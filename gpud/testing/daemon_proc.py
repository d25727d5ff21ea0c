"""`gpud serve` in a subprocess, for tests and benchmarks: one wrapper instead of five.

tests/conftest.py, bench/run.py (and through it the hot_* benchmarks and bench/fuzz.py),
bench/chaos.py and bench/attack.py each had their own copy of this; they differed in small
ways that each user needs, which are options here:

* ``settings`` are the base environment (fake GPUs and fast timers; the tests' and the
  benchmarks' differ), ``env`` the caller's own on top;
* ``own_session``: the daemon in a session of its own that gets SIGTERM when its parent
  dies (a benchmark's Ctrl-C reaches the benchmark only, which stops it cleanly);
* ``tcp``: also listen on a free loopback port (every request there needs a token).

Starting waits for the daemon's "gpud serving on" line in this start's part of its log (a
restart appends to the same log). Stopping never kills the daemon's jobs: they outlive it
by design, and a test that restarts the daemon expects it to re-adopt them;
:meth:`DaemonProc.kill_jobs` and :meth:`DaemonProc.remove_containers` are the clean-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gpud

if TYPE_CHECKING:
    from gpud.ledger import Ledger

__all__ = ["DaemonProc", "free_port", "kill_instance_jobs", "stop_podman_service"]

#: The daemon's working directory: `python -m gpud` finds this checkout's gpud from there.
SOURCE_ROOT = Path(gpud.__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_pdeathsig() -> None:
    """In the daemon child: get SIGTERM if the parent dies without cleaning up."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def gpud_admin(data_dir: Path, *args: str, cwd: Path | None = None) -> str:
    """Run `gpud admin --data-dir DATA_DIR ARGS...` as an admin would, and return what it
    printed; a failure raises with its error output (bench/fuzz.py, bench/hot_sweep.py)."""
    argv = [sys.executable, "-m", "gpud", "admin", "--data-dir", str(data_dir), *args]
    out = subprocess.run(
        argv, capture_output=True, text=True, cwd=str(cwd) if cwd else None, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"gpud admin {' '.join(args)} failed: {out.stderr}")
    return out.stdout.strip()


def kill_instance_jobs(data_dir: Path) -> None:
    """Kill every job process a daemon on ``data_dir`` left (by the instance id in their
    environment; they run in sessions of their own)."""
    try:
        instance = (data_dir / "instance").read_text().strip()
    except OSError:
        return
    from gpud.executors.process import processes_with_env

    for pid in processes_with_env(f"GPUD_INSTANCE={instance}"):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def stop_podman_service(url: str) -> None:
    """The `podman system service` a daemon started on its private socket (it outlives the
    daemon by design): found by its exact command line, stopped by pid."""
    want = ["podman", "system", "service", "--time=0", url]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if argv == want:
            pid = int(entry.name)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@dataclass
class DaemonProc:
    """`gpud serve` in a subprocess, its socket, log and data directory under ``base``."""

    base: Path
    env: dict[str, str] = field(default_factory=dict)
    settings: Mapping[str, str] = field(default_factory=dict)
    data_dir: Path = None  # type: ignore[assignment]  # base/"data" unless given
    own_session: bool = False
    tcp: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    #: how much of the log :meth:`new_log` has returned
    log_seen: int = 0

    def __post_init__(self) -> None:
        if self.data_dir is None:
            self.data_dir = self.base / "data"

    @property
    def executor(self) -> str:
        return self.env.get("GPUD_EXECUTOR", "process")

    @property
    def socket(self) -> Path:
        return self.base / "gpud.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.base / "daemon.log"

    def client_env(self) -> dict[str, str]:
        """This process's environment, with GPUD_URL pointing at this daemon."""
        return dict(os.environ, GPUD_URL=self.url)

    def start(self, timeout: float = 60.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # job users (nobody, as root) traverse it
        env = dict(os.environ)
        env.pop("GPUD_CONFIG", None)  # the caller's own config file is not this daemon's
        env.update(self.settings)
        env.update(self.env)
        env["GPUD_DATA_DIR"] = str(self.data_dir)
        env["GPUD_SOCKET"] = str(self.socket)
        if self.tcp:
            self.port = self.port or free_port()
            env["GPUD_TCP"] = f"127.0.0.1:{self.port}"
        # A restart appends to the same log: look for this start's line only.
        before = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpud", "serve"],
                env=env,
                stdout=logf,
                stderr=logf,
                stdin=subprocess.DEVNULL,
                cwd=str(SOURCE_ROOT),
                start_new_session=self.own_session,
                preexec_fn=_set_pdeathsig if self.own_session else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gpud serve exited ({self.proc.returncode}):\n" + self.log_since(before)
                )
            if b"gpud serving on" in self.log.read_bytes()[before:]:
                return
            time.sleep(0.02)
        raise RuntimeError("gpud serve did not start in time:\n" + self.log_since(before))

    def log_since(self, offset: int = 0) -> str:
        return self.log.read_bytes()[offset:].decode(errors="replace")

    def new_log(self) -> str:
        """What the daemon logged since the last call."""
        data = self.log.read_bytes()
        new, self.log_seen = data[self.log_seen :], len(data)
        return new.decode(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> int | None:
        """The exit status, or None while it runs (or was never started)."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        """Signal the daemon and wait for it (SIGKILL after ``grace`` s). Its jobs live on."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
        self.proc = None

    def instance(self) -> str | None:
        try:
            return (self.data_dir / "instance").read_text().strip()
        except OSError:
            return None

    def kill_jobs(self) -> None:
        """Kill the job processes this daemon left (they outlive it by design)."""
        kill_instance_jobs(self.data_dir)

    def remove_containers(self) -> None:
        """Remove the Podman containers this daemon left, and the `podman system service`
        it started on a private socket (GPUD_PODMAN_URL), if any."""
        instance = self.instance()
        if instance is not None:
            with contextlib.suppress(Exception):
                ids = subprocess.run(
                    ["podman", "ps", "-a", "-q", "--filter", f"label=gpud.daemon={instance}"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout.split()
                if ids:
                    subprocess.run(["podman", "rm", "-f", *ids], capture_output=True, timeout=120)
        if url := self.env.get("GPUD_PODMAN_URL"):
            stop_podman_service(url)

    def ledger(self) -> Ledger:
        """The daemon's ledger, opened beside it (close it when done)."""
        from gpud.ledger import Ledger

        return Ledger(self.data_dir / "ledger.db")
