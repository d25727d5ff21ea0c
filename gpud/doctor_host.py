"""The host's side of `gpud doctor` (#16): the NVIDIA driver, NVML, CDI and CUDA checkpoint
support, and what the Podman executor needs (Podman and its service, CRIU, the OCI
runtime, cgroups). Each check is one function returning a :class:`Check`; gpud.doctor
runs them with the checks of the daemon's own files.

The Podman-side checks matter only to the Podman executor: with ``executor = "process"``
what they find is reported as ``n/a``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tomllib
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gpud.config import Config

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"
#: The timeout of each external command (criu check is the slowest: ~0.5 s).
COMMAND_TIMEOUT = 10.0
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


def run_command(
    argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a command; a missing binary raises FileNotFoundError, a hang TimeoutExpired."""
    # **kw is passed through unchecked (env=, cwd=): subprocess.run's overloads cannot be
    # matched against an open mapping.
    out: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]  # see above
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )
    return out


def last_line(cp: subprocess.CompletedProcess[str]) -> str:
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
        import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no type hints

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
        cp = run_command(["podman", "--version"])
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
            cfg, Check("podman", FAIL, f"podman: {last_line(cp)}", "check the Podman installation")
        )
    return Check("podman", OK, cp.stdout.strip())


def _ping(url: str, timeout: float) -> str:
    """GET /_ping at a Podman API URL (unix:// or tcp://); its body, or raise OSError."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[str, int] = parsed.path
    elif parsed.scheme in ("tcp", "http"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
    else:
        raise OSError(f"podman_url {url!r} is neither unix:// nor tcp://")
    with s:
        s.settimeout(timeout)
        s.connect(address)
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
        cp = run_command(["criu", "check"])
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
                f"`criu check` fails: {last_line(cp)}; snapshots will fail",
                "on a 6.x kernel use CRIU 4 or newer (Debian 12's 3.17 fails)",
            ),
        )
    return Check("criu", OK, "`criu check`: " + (last_line(cp) or "ok"))


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
