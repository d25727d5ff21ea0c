"""`gpud doctor`: check what gpud needs on this machine, one small function per thing (#16).

Each check returns a :class:`Check`: ``ok``, ``warn`` (works, but something is off),
``fail`` (gpud, or a part of it that is configured, cannot work) or ``n/a`` (does not apply
here, with the reason), and for anything but ``ok`` what to do. The checks read the
settings the way the daemon does (:func:`gpud.config.load_config`) and work whether the
daemon runs or not: they only read, except the ledger check, which opens the ledger
read-only *through SQLite* (never with open()/close() of our own, which would drop a live
daemon's POSIX locks on it; see docs/architecture.md). Every external command has a
timeout, and the checks run in threads, so the whole run takes a few seconds at most.

The host's checks (GPUs, Podman, CRIU, runtime, cgroups) are in gpud.doctor_host.
"""

from __future__ import annotations

import os
import pwd
import re
import resource
import shutil
import socket
import sqlite3
import stat
import subprocess
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpud.config import Config
from gpud.doctor_host import (
    FAIL,
    NA,
    NVIDIA_PROC_VERSION,
    OK,
    WARN,
    Check,
    check_cdi,
    check_cgroups,
    check_criu,
    check_cuda_checkpoint,
    check_driver,
    check_nvml,
    check_podman,
    check_podman_service,
    check_runtime,
    last_line,
    run_command,
)

__all__ = [
    "CHECKS",
    "NVIDIA_PROC_VERSION",
    "Check",
    "check_cdi",
    "check_cgroups",
    "check_criu",
    "check_cuda_checkpoint",
    "check_driver",
    "check_nvml",
    "check_podman",
    "check_podman_service",
    "check_runtime",
    "check_user_switch",
    "run_checks",
]

#: Below this much free space in the data dir's filesystem: a warning (fail below the
#: daemon's own reserve, under which it refuses submits: gpud.storage.RESERVE_BYTES).
LOW_FREE_BYTES = 1024**3


def check_limits(cfg: Config) -> Check:
    """Every connection is a file descriptor: the daemon raises its soft limit to the hard
    one, which must leave room for the listen backlog."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    notes = []
    if hard != resource.RLIM_INFINITY and hard < 2 * cfg.listen_backlog:
        notes.append(f"open files hard limit {hard} < 2 x listen_backlog ({cfg.listen_backlog})")
    try:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        somaxconn = None
    if somaxconn is not None and somaxconn < cfg.listen_backlog:
        notes.append(f"net.core.somaxconn {somaxconn} < listen_backlog {cfg.listen_backlog}")
    if notes:
        return Check(
            "limits",
            WARN,
            "; ".join(notes),
            "raise LimitNOFILE in the unit and `sysctl -w net.core.somaxconn=N`, or "
            "lower listen_backlog",
        )
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    return Check("limits", OK, f"open files up to {shown}, somaxconn {somaxconn}")


# -- the daemon's own files -----------------------------------------------------------------


def _expected_dir_mode() -> int:
    # gpud.server.prepare_dirs: a root daemon lets job users traverse (0711), a user's
    # daemon keeps its directory private (0700).
    return 0o711 if os.geteuid() == 0 else 0o700


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_data_dir(cfg: Config, low_free: int = LOW_FREE_BYTES) -> Check:
    from gpud.storage import RESERVE_BYTES

    d = cfg.data_dir
    me = pwd.getpwuid(os.geteuid()).pw_name
    if not d.exists():
        parent = _existing_parent(d)
        if not os.access(parent, os.W_OK | os.X_OK):
            return Check(
                "data dir",
                FAIL,
                f"{d} does not exist and {parent} is not writable by {me}",
                f"mkdir -p {d} && chown {me} {d}, or set data_dir",
            )
        return Check("data dir", OK, f"{d} does not exist yet; gpud serve creates it")
    st = d.stat()
    if not stat.S_ISDIR(st.st_mode):
        return Check("data dir", FAIL, f"{d} is not a directory", "set data_dir to a directory")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        return Check(
            "data dir",
            FAIL,
            f"{d} belongs to uid {st.st_uid}, not to {me} who "
            "runs gpud: its owner could change the ledger and jobs' files",
            f"chown -R {me} {d}",
        )
    if mode & 0o022:
        return Check(
            "data dir",
            FAIL,
            f"{d} has mode {mode:04o}: others can write the ledger's directory",
            f"chmod {_expected_dir_mode():o} {d}",
        )
    if not os.access(d, os.W_OK | os.X_OK):
        return Check(
            "data dir", FAIL, f"{d} (mode {mode:04o}) is not writable by {me}", f"chmod u+rwx {d}"
        )
    free = shutil.disk_usage(d).free
    gib = free / 1024**3
    if free < RESERVE_BYTES:
        return Check(
            "data dir",
            FAIL,
            f"{d}: only {free} bytes free; submits are refused",
            "free space on its filesystem (`gpud gc`, docs/operations.md)",
        )
    if free < low_free:
        return Check(
            "data dir",
            WARN,
            f"{d}: only {gib:.2f} GiB free",
            "free space on its filesystem (`gpud gc`, docs/operations.md)",
        )
    note = (
        ""
        if mode == _expected_dir_mode()
        else f"; gpud serve sets it to {_expected_dir_mode():04o}"
    )
    return Check("data dir", OK, f"{d}: mode {mode:04o}, owner {me}, {gib:.1f} GiB free{note}")


def check_socket(cfg: Config, timeout: float = 2.0) -> Check:
    path = cfg.socket
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Check("socket", NA, f"no daemon running (no socket at {path})")
    if not stat.S_ISSOCK(st.st_mode):
        return Check("socket", FAIL, f"{path} is not a socket", f"remove {path}, or set socket")
    mode = stat.S_IMODE(st.st_mode)
    want = 0o660 if os.geteuid() == 0 else 0o600
    if st.st_uid != os.geteuid():
        return Check(
            "socket",
            FAIL,
            f"{path} belongs to uid {st.st_uid}, not to the user running this check",
            "run `gpud doctor` as the daemon's user, or stop the other daemon",
        )
    if mode & 0o007 or mode != want:
        return Check(
            "socket",
            WARN,
            f"{path} has mode {mode:04o}, gpud makes it {want:04o}",
            "restart the daemon (it recreates the socket)",
        )
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as e:
            return Check(
                "socket",
                WARN,
                f"{path} exists but nothing answers ({e.strerror}): "
                "a daemon that stopped uncleanly",
                "start gpud; it replaces it",
            )
    return Check("socket", OK, f"{path}: mode {mode:04o}, a daemon answers")


_PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3])"


def check_interpreter(cfg: Config) -> Check:
    """Can the job user execute the interpreter jobs run with (as the daemon picks it)?"""
    import sys

    from gpud.executors.process import WorkerPythonError, job_identity

    try:
        ident = job_identity(cfg.job_user)
    except WorkerPythonError as e:
        return Check("job interpreter", FAIL, str(e), "set job_user")
    candidates = [cfg.python] if cfg.python else [sys.executable, "/usr/bin/python3"]
    errors = []
    for python in candidates:
        assert python is not None
        try:
            cp = run_command(
                [python, "-c", _PROBE],
                cwd="/",
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": ident.home},
                **ident.popen_kwargs(),
            )
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{python}: {e}")
            continue
        if cp.returncode != 0:
            errors.append(f"{python}: {last_line(cp)}")
            continue
        # As the daemon: its own interpreter if the job user can run it, else python3.
        skipped = f" (not {'; '.join(errors)})" if errors else ""
        return Check(
            "job interpreter",
            OK,
            f"{ident.user} runs {python} (Python {cp.stdout.strip()}){skipped}",
        )
    return Check(
        "job interpreter",
        FAIL,
        f"job user {ident.user!r} cannot run " + "; ".join(errors),
        'set python = "/path/to/python3" to an interpreter that user can execute',
    )


def check_user_switch(
    cfg: Config, setpriv_paths: tuple[str, ...] | None = None, euid: int | None = None
) -> Check:
    """A root daemon starts each job through util-linux's setpriv (a vfork and two execs);
    without it every job start forks the whole daemon (#12: 8 ms at 50 MB, 30 ms at 200 MB
    on a 2-core box)."""
    from gpud.executors.process import SETPRIV_PATHS, find_setpriv

    if cfg.executor != "process":
        return Check("user switch", NA, f"the {cfg.executor} executor starts jobs itself")
    if (os.geteuid() if euid is None else euid) != 0:
        return Check("user switch", NA, "the daemon is not root: its jobs run as its own user")
    paths = SETPRIV_PATHS if setpriv_paths is None else setpriv_paths
    found = find_setpriv(paths)
    if found is None:
        return Check(
            "user switch",
            WARN,
            f"no setpriv owned by root and not writable by others at {' or '.join(paths)}: "
            "each job start forks the daemon (slower cold starts, more so as it grows)",
            "install util-linux (apt install util-linux; it provides setpriv)",
        )
    return Check("user switch", OK, f"jobs start as {cfg.job_user} through {found}")


def check_time_sync(timesync_dir: Path = Path("/run/systemd/timesync")) -> Check:
    """Job times, timeouts shown and the fair share's decay use the wall clock."""
    try:
        cp = run_command(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], timeout=3)
        if cp.returncode == 0 and cp.stdout.strip() in ("yes", "no"):
            if cp.stdout.strip() == "yes":
                return Check("time sync", OK, "timedatectl: synchronized")
            return Check(
                "time sync",
                WARN,
                "timedatectl: the clock is not synchronized",
                "timedatectl set-ntp true (or install chrony)",
            )
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        cp = run_command(["chronyc", "-n", "tracking"], timeout=3)
        if cp.returncode == 0:
            if re.search(r"Leap status\s*:\s*Normal", cp.stdout):
                return Check("time sync", OK, "chrony: synchronized")
            return Check("time sync", WARN, "chrony is not synchronized", "check `chronyc sources`")
    except (OSError, subprocess.SubprocessError):
        pass
    if (timesync_dir / "synchronized").exists():
        return Check("time sync", OK, "systemd-timesyncd: synchronized")
    return Check(
        "time sync",
        NA,
        "no time-sync service to ask (no systemd timedatectl, "
        "chronyc or systemd-timesyncd); a container shares its host's clock",
    )


def check_ledger(cfg: Config, timeout: float = 2.0) -> Check:
    """PRAGMA quick_check over a read-only connection: SQLite alone opens the file, so a
    live daemon's locks are left alone (closing our own descriptor of it would drop them)."""
    from gpud.ledger.schema import SCHEMA_VERSION

    path = cfg.ledger_path
    if not path.exists():
        return Check("ledger", NA, f"no ledger yet at {path} (gpud serve creates it)")
    owner = path.stat().st_uid
    if os.geteuid() not in (0, owner):
        # Not a damaged ledger: this user may not read it (nor make its -shm).
        return Check(
            "ledger",
            NA,
            f"{path} belongs to uid {owner}: only its owner or root can check it",
            "run `sudo gpud doctor` (as the daemon's user)",
        )
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=timeout)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            (version,) = conn.execute("PRAGMA user_version").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if "locked" in str(e) or "busy" in str(e):
            return Check("ledger", WARN, f"{path} is busy: {e}", "run gpud doctor again")
        return Check(
            "ledger",
            FAIL,
            f"{path} cannot be read: {e}",
            "stop gpud and restore the ledger from a backup "
            "(docs/operations.md, Back up and restore)",
        )
    if rows != ["ok"]:
        return Check(
            "ledger",
            FAIL,
            f"{path}: quick_check: {'; '.join(rows[:3])}",
            "stop gpud and restore the ledger from a backup "
            "(docs/operations.md, Back up and restore)",
        )
    if version > SCHEMA_VERSION:
        return Check(
            "ledger",
            FAIL,
            f"{path}: schema {version} is newer than this gpud's ({SCHEMA_VERSION})",
            "run the gpud that wrote it (or a newer one)",
        )
    note = (
        ""
        if version == SCHEMA_VERSION
        else f"; gpud serve migrates it to {SCHEMA_VERSION} (back it up first)"
    )
    return Check("ledger", OK, f"{path}: quick_check ok, schema {version}{note}")


#: In the order they print.
CHECKS: tuple[tuple[str, Callable[[Config], Check]], ...] = (
    ("nvidia driver", check_driver),
    ("nvml", check_nvml),
    ("cdi specs", check_cdi),
    ("cuda checkpoint", check_cuda_checkpoint),
    ("podman", check_podman),
    ("podman service", check_podman_service),
    ("criu", check_criu),
    ("oci runtime", check_runtime),
    ("cgroups", check_cgroups),
    ("limits", check_limits),
    ("data dir", check_data_dir),
    ("socket", check_socket),
    ("job interpreter", check_interpreter),
    ("user switch", check_user_switch),
    ("time sync", lambda cfg: check_time_sync()),
    ("ledger", check_ledger),
)


def _guarded(name: str, fn: Callable[[Config], Check], cfg: Config) -> Check:
    try:
        return fn(cfg)
    except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
        return Check(
            name,
            FAIL,
            f"the check itself failed: {type(e).__name__}: {e}",
            "report this as a gpud bug",
        )


def run_checks(cfg: Config) -> list[Check]:
    """Every check, run in threads (they mostly wait on commands and sockets), in order."""
    with ThreadPoolExecutor(max_workers=len(CHECKS)) as pool:
        futures = [pool.submit(_guarded, name, fn, cfg) for name, fn in CHECKS]
        return [f.result() for f in futures]
