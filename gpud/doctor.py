"""`gpud doctor`: check what gpud needs on this machine, one small function per thing (#16).

Each check returns a :class:`Check`: ``ok``, ``warn`` (works, but something is off),
``fail`` (gpud, or a part of it that is configured, cannot work) or ``n/a`` (does not apply
here, with the reason), and for anything but ``ok`` what to do. The checks read the
settings the way the daemon does (:func:`gpud.config.load_config`) and work whether the
daemon runs or not: they only read, except the ledger check, which opens the ledger
read-only *through SQLite* (never with open()/close() of our own, which would drop a live
daemon's POSIX locks on it; see docs/architecture.md). Every external command has a
timeout, and the checks run in threads, so the whole run takes a few seconds at most.

The Podman-side checks (service, CRIU, runtime, cgroups) matter only to the Podman
executor: with ``executor = "process"`` what they find is reported as ``n/a``.
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
import tomllib
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from gpud.config import Config

__all__ = ["CHECKS", "Check", "run_checks"]

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"
#: The timeout of each external command (criu check is the slowest: ~0.5 s).
COMMAND_TIMEOUT = 10.0
#: Below this much free space in the data dir's filesystem: a warning (fail below the
#: daemon's own reserve, under which it refuses submits: gpud.storage.RESERVE_BYTES).
LOW_FREE_BYTES = 1024**3
NVIDIA_PROC_VERSION = Path("/proc/driver/nvidia/version")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
#: What job containers' limits (memory=, cpu=) and process counts need (Podman executor).
NEEDED_CONTROLLERS = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | n/a
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _run(
    argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a command; a missing binary raises FileNotFoundError, a hang TimeoutExpired."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )  # type: ignore[call-overload]


def _last_line(cp: subprocess.CompletedProcess[str]) -> str:
    lines = (cp.stderr or cp.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit code {cp.returncode}"


# -- GPUs --------------------------------------------------------------------------------


def driver_version(proc_version: Path = NVIDIA_PROC_VERSION) -> str | None:
    """The NVIDIA kernel module's version, or None on a box without the driver."""
    try:
        text = proc_version.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else "unknown"


def _gpus_not_applicable(cfg: Config, driver: str | None, proc_version: Path) -> str | None:
    if cfg.gpus != "auto":
        return f'gpus = "{cfg.gpus}": the daemon does not use real GPUs'
    if driver is None:
        return (
            f"no NVIDIA driver on this machine ({proc_version} does not exist); "
            "the daemon offers fake GPUs here"
        )
    return None


def check_driver(cfg: Config, proc_version: Path = NVIDIA_PROC_VERSION) -> Check:
    driver = driver_version(proc_version)
    reason = _gpus_not_applicable(cfg, driver, proc_version)
    if reason:
        return Check("nvidia driver", NA, reason)
    if driver == "unknown":
        return Check(
            "nvidia driver", WARN, f"{proc_version} names no version", "reinstall the NVIDIA driver"
        )
    return Check("nvidia driver", OK, f"kernel module {driver}")


def check_nvml(cfg: Config, proc_version: Path = NVIDIA_PROC_VERSION) -> Check:
    reason = _gpus_not_applicable(cfg, driver_version(proc_version), proc_version)
    if reason:
        return Check("nvml", NA, reason)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - NVMLError and a missing libnvidia-ml alike
        return Check(
            "nvml",
            FAIL,
            f"NVML does not answer: {e}",
            "install the driver's NVML library (libnvidia-ml.so.1) matching the "
            "kernel module, or reboot after a driver upgrade; `nvidia-smi` shows it",
        )
    version = version.decode() if isinstance(version, bytes) else str(version)
    if count == 0:
        return Check("nvml", WARN, f"NVML {version} sees no GPU", "check `nvidia-smi`")
    return Check("nvml", OK, f"{count} GPU(s), driver {version}")


def check_cdi(
    cfg: Config,
    dirs: Sequence[str] = ("/etc/cdi", "/var/run/cdi"),
    proc_version: Path = NVIDIA_PROC_VERSION,
) -> Check:
    reason = _gpus_not_applicable(cfg, driver_version(proc_version), proc_version)
    if reason:
        return Check("cdi specs", NA, reason)
    if cfg.executor != "podman":
        return Check("cdi specs", NA, "executor = process: CDI is used by Podman only")
    for d in dirs:
        for p in sorted(Path(d).glob("*")) if Path(d).is_dir() else []:
            if p.suffix in (".yaml", ".yml", ".json"):
                try:
                    if "nvidia.com/gpu" in p.read_text(errors="replace"):
                        return Check("cdi specs", OK, f"NVIDIA GPUs in {p}")
                except OSError:
                    continue
    return Check(
        "cdi specs",
        WARN,
        f"no CDI spec for NVIDIA GPUs in {' or '.join(dirs)}: "
        "GPU containers get the device nodes only",
        "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",
    )


def check_cuda_checkpoint(
    cfg: Config, proc_version: Path = NVIDIA_PROC_VERSION, libcuda: str = "libcuda.so.1"
) -> Check:
    """The driver's CUDA checkpoint API (#13), as the daemon finds it (gpud.cudackpt):
    libcuda loads, and its CUDA version has cuCheckpointProcess*. No cuInit is made."""
    driver = driver_version(proc_version)
    reason = _gpus_not_applicable(cfg, driver, proc_version)
    if reason:
        return Check("cuda checkpoint", NA, reason)
    from gpud.cudackpt import MIN_DRIVER, open_cuda_checkpointer

    _, support = open_cuda_checkpointer(driver, path=libcuda)
    if support.ok:
        return Check("cuda checkpoint", OK, support.reason)
    return Check(
        "cuda checkpoint",
        WARN,
        support.reason,
        f"install or upgrade the NVIDIA driver to >= {MIN_DRIVER} with its libcuda.so.1; "
        "without it idle GPU workers cannot be parked, nor GPU jobs suspended",
    )


# -- Podman, CRIU, runtime, cgroups -------------------------------------------------------


def _podman_only(cfg: Config, check: Check) -> Check:
    """What the Podman-side checks find matters only to the Podman executor."""
    if cfg.executor == "podman" or check.status in (OK, NA):
        return check
    return Check(check.name, NA, f"executor = {cfg.executor} (not needed); {check.message}")


def check_podman(cfg: Config) -> Check:
    try:
        cp = _run(["podman", "--version"])
    except FileNotFoundError:
        return _podman_only(
            cfg,
            Check(
                "podman",
                FAIL,
                "podman is not installed",
                "apt-get install podman (docs/operations.md)",
            ),
        )
    except subprocess.TimeoutExpired:
        return _podman_only(
            cfg, Check("podman", FAIL, "`podman --version` hangs", "check the Podman installation")
        )
    if cp.returncode != 0:
        return _podman_only(
            cfg, Check("podman", FAIL, f"podman: {_last_line(cp)}", "check the Podman installation")
        )
    return Check("podman", OK, cp.stdout.strip())


def _ping(url: str, timeout: float) -> str:
    """GET /_ping at a Podman API URL (unix:// or tcp://); its body, or raise OSError."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: object = parsed.path
    elif parsed.scheme in ("tcp", "http"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
    else:
        raise OSError(f"podman_url {url!r} is neither unix:// nor tcp://")
    with s:
        s.settimeout(timeout)
        s.connect(address)  # type: ignore[arg-type]
        s.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in status + " ":
        raise OSError(f"answered {status!r}")
    return body.decode(errors="replace").strip()


def check_podman_service(cfg: Config, timeout: float = 3.0) -> Check:
    url = cfg.podman_url
    try:
        body = _ping(url, timeout)
    except OSError as e:
        why = e.strerror or str(e)
        if cfg.podman_start_service:
            return _podman_only(
                cfg,
                Check(
                    "podman service",
                    WARN,
                    f"nothing answers at {url} ({why}); "
                    "podman_start_service = true: gpud serve starts it",
                    "prefer `systemctl enable --now podman.socket`",
                ),
            )
        return _podman_only(
            cfg,
            Check(
                "podman service",
                FAIL,
                f"the Podman service does not answer at {url} ({why})",
                f"start it: `systemctl enable --now podman.socket` (or `podman system service "
                f"--time=0 {url} &`), or set podman_start_service = true; if it is stuck, "
                "`systemctl restart podman.socket podman.service`",
            ),
        )
    return Check("podman service", OK, f"{url} answers /_ping ({body or 'empty'})")


def check_criu(cfg: Config) -> Check:
    if os.geteuid() != 0:
        return _podman_only(
            cfg,
            Check(
                "criu",
                NA,
                "`criu check` needs root; run `sudo gpud doctor` to check snapshots' CRIU",
            ),
        )
    try:
        cp = _run(["criu", "check"])
    except FileNotFoundError:
        return _podman_only(
            cfg,
            Check(
                "criu",
                WARN,
                "criu is not installed: snapshots (snapshot=True) are off",
                "install CRIU 4 or newer (docs/operations.md)",
            ),
        )
    except subprocess.TimeoutExpired:
        return _podman_only(
            cfg, Check("criu", WARN, "`criu check` hangs", "reinstall CRIU 4 or newer")
        )
    if cp.returncode != 0:
        return _podman_only(
            cfg,
            Check(
                "criu",
                WARN,
                f"`criu check` fails: {_last_line(cp)}; snapshots will fail",
                "on a 6.x kernel use CRIU 4 or newer (Debian 12's 3.17 fails)",
            ),
        )
    return Check("criu", OK, "`criu check`: " + (_last_line(cp) or "ok"))


def _configured_runtime(conf: Path) -> str | None:
    try:
        with conf.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    runtime = data.get("engine", {}).get("runtime")
    return str(runtime) if runtime else None


def check_runtime(cfg: Config, conf: Path = CONTAINERS_CONF) -> Check:
    found = {n: p for n in ("runc", "crun") if (p := shutil.which(n))}
    if not found:
        return _podman_only(
            cfg,
            Check(
                "oci runtime", FAIL, "neither runc nor crun is installed", "apt-get install runc"
            ),
        )
    configured = _configured_runtime(conf)
    names = ", ".join(f"{n} ({p})" for n, p in found.items())
    if configured == "crun" or (configured is None and "runc" not in found):
        return _podman_only(
            cfg,
            Check(
                "oci runtime",
                WARN,
                f"{names}; Podman uses crun, which on Debian 12 cannot checkpoint: snapshots fail",
                f'set runtime = "runc" under [engine] in {conf}',
            ),
        )
    if configured and configured not in found and not os.path.isabs(configured):
        return _podman_only(
            cfg,
            Check(
                "oci runtime",
                FAIL,
                f"{conf} names runtime {configured!r}, which is not installed",
                f'install it, or set runtime = "runc" in {conf}',
            ),
        )
    return Check("oci runtime", OK, f"{names}; Podman uses {configured or 'its default'}")


def check_cgroups(cfg: Config, root: Path = CGROUP_ROOT) -> Check:
    if (root / "cgroup.controllers").is_file():
        have = set((root / "cgroup.controllers").read_text().split())
        version = "v2"
    else:
        have = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
        have |= {c for p in list(have) for c in p.split(",")}
        version = "v1 (hybrid)" if (root / "unified").is_dir() else "v1"
        unified = root / "unified" / "cgroup.controllers"
        if unified.is_file() and "hugetlb" in unified.read_text().split():
            return _podman_only(
                cfg,
                Check(
                    "cgroups",
                    FAIL,
                    "hybrid cgroups with hugetlb on the v2 hierarchy: runc and "
                    "crun refuse to start containers",
                    "give hugetlb its own v1 mount (../shared/ci/podman-host-setup.sh does)",
                ),
            )
    missing = [c for c in NEEDED_CONTROLLERS if c not in have]
    if missing:
        return _podman_only(
            cfg,
            Check(
                "cgroups",
                FAIL,
                f"cgroup {version} lacks the controller(s) {', '.join(missing)}:"
                " job containers' memory=/cpu= limits cannot be enforced",
                "boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2), or mount them",
            ),
        )
    return _podman_only(
        cfg, Check("cgroups", OK, f"cgroup {version}: " + ", ".join(NEEDED_CONTROLLERS))
    )


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
            cp = _run(
                [python, "-c", _PROBE],
                cwd="/",
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": ident.home},
                **ident.popen_kwargs(),
            )
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{python}: {e}")
            continue
        if cp.returncode != 0:
            errors.append(f"{python}: {_last_line(cp)}")
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


def check_time_sync(timesync_dir: Path = Path("/run/systemd/timesync")) -> Check:
    """Job times, timeouts shown and the fair share's decay use the wall clock."""
    try:
        cp = _run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], timeout=3)
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
        cp = _run(["chronyc", "-n", "tracking"], timeout=3)
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
