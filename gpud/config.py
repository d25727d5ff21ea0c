"""Daemon configuration: embedded defaults < TOML file < GPUD_* environment < CLI flags.

Every setting has a default that works with no file at all, so `gpud serve` runs on a
fresh machine. Bad values are reported as :class:`ConfigError` with the setting's name
and what a valid value looks like.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gpud_client.duration import parse_duration
from gpud_client.paths import default_data_dir, default_socket

__all__ = ["Config", "ConfigError", "is_loopback", "load_config", "parse_tcp"]

#: Used only where NVML finds no NVIDIA driver, and always reported as fake.
DEFAULT_FAKE_GPUS = ["h100", "h100"]


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and says what would work."""


@dataclass(frozen=True)
class Config:
    data_dir: Path = field(default_factory=default_data_dir)
    socket: Path = field(default_factory=default_socket)
    #: "HOST:PORT" to also listen on TCP; every TCP request needs a token (#5)
    tcp: str | None = None
    #: "process" (plain processes), "podman" (a container per job) or "slurm" (#15)
    executor: str = "process"
    #: Slurm executor (#15): the directory every node mounts, for job directories and the
    #: worker runtime; None: the data directory (a single-node cluster)
    slurm_shared_dir: Path | None = None
    #: gpud's GPU types -> the cluster's GRES types ({h100 = "h100", a100 = "a100_80g"});
    #: a type not listed keeps its name
    slurm_gpu_types: dict[str, str] = field(default_factory=dict)
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_qos: str | None = None
    #: more sbatch arguments for every job, e.g. ["--constraint=ib"]
    slurm_extra_args: list[str] = field(default_factory=list)
    #: how often one squeue asks Slurm about every job gpud waits on (at least 0.1 s)
    slurm_poll_interval: float = 0.5
    #: the image of a job without image= (Podman); None: localhost/gpud-python:X.Y for the
    #: daemon's own Python X.Y (what ../shared/ci/podman-host-setup.sh --image builds)
    default_image: str | None = None
    podman_url: str = "unix:///run/podman/podman.sock"
    #: start `podman system service` when nothing answers at podman_url
    podman_start_service: bool = False
    #: the network jobs' containers get: "none" (default: no network), "host", "bridge"...
    podman_network: str = "none"
    #: a read-only root filesystem for jobs (with a writable /tmp)
    podman_read_only: bool = True
    #: extra bind mounts for every job container, "SRC:DST[:ro]" (e.g. shared datasets)
    podman_volumes: list[str] = field(default_factory=list)
    #: /dev/shm of job containers (Podman's 64m is too small for PyTorch data loaders)
    podman_shm_size: str = "1g"
    #: "auto": real GPUs through NVML, or fake_gpus on a box with no NVIDIA driver;
    #: "fake": always fake_gpus (tests, demos); "none": hand out no GPUs at all
    gpus: str = "auto"
    fake_gpus: list[str] = field(default_factory=lambda: list(DEFAULT_FAKE_GPUS))
    max_timeout: float = 24 * 3600.0
    #: the timeout of a job that does not set one; None means max_timeout
    default_timeout: float | None = None
    cpu_slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: the user jobs run as when the daemon runs as root (until per-user identity)
    job_user: str = "nobody"
    #: the interpreter that runs jobs; None: the daemon's own, or /usr/bin/python3 when
    #: the job user cannot run the daemon's (e.g. a venv under /root)
    python: str | None = None
    #: which interpreters jobs may ask for (process executor; glob patterns matched against
    #: the interpreter's path, ``*`` crosses ``/``); empty: any the job's user can run.
    #: The admin's own ``python`` is always allowed (a job asks for it with python="daemon")
    allowed_pythons: list[str] = field(default_factory=list)
    #: seconds between SIGTERM and SIGKILL when a job is cancelled or times out
    kill_grace: float = 10.0
    #: the longest grace= a job may ask for (#14): its SIGTERM-to-SIGKILL seconds
    max_grace: float = 300.0
    #: a `gpud shell` session with no client attached and no input this long ends (#14)
    shell_idle_timeout: float = 3600.0
    #: first retry waits this long, doubling per attempt up to retry_backoff_max
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    max_body_bytes: int = 256 * 1024 * 1024
    #: the request bodies of all requests being received or handled together; more gets
    #: 503 with Retry-After (gpud's client waits and retries). At least max_body_bytes
    max_body_in_flight: int = 256 * 1024 * 1024
    #: connections waiting to be accepted (capped by the kernel's net.core.somaxconn)
    listen_backlog: int = 2048
    #: a request's head (method, path, headers) must arrive within this long
    header_timeout: float = 10.0
    #: a request body may not stall for longer than this between two reads
    body_timeout: float = 60.0
    #: keep_warm of a job that does not set one (0: its worker ends with it)
    keep_warm_default: float = 0.0
    #: the longest keep_warm a job may ask for
    keep_warm_max: float = 3600.0
    #: container snapshots (snapshot=True, Podman executor): the most bytes they may
    #: take together (under <data_dir>/snapshots); least recently used ones go first
    snapshot_max_bytes: int = 10 * 1024**3
    #: idle warm workers parked in host memory (#13): the most bytes of GPU state they may
    #: hold there together; least recently parked ones are ended first. None: half of
    #: the host's memory; 0: never park (an idle worker whose GPUs are needed is ended)
    park_max_bytes: int | None = None
    #: a snapshot that fails this many times in a row (to take or to restore) is not used
    #: again until `gpud snapshots rm`
    snapshot_max_failures: int = 3
    #: a restore not done in this long is killed (CRIU can hang on a damaged snapshot)
    #: and counted as a failure; the job then starts cold
    snapshot_restore_timeout: float = 30.0
    #: images built from gpud.Image definitions (#11, Podman executor): the most bytes
    #: they may take together; least recently used ones are removed first
    image_max_bytes: int = 50 * 1024**3
    #: the network of image builds' RUN steps; None: Podman's default. "host" reaches a
    #: package mirror on the host's loopback; "none" seals builds off (wheels sent along)
    image_build_network: str | None = None
    #: the package index pip uses in builds; None: PIP_INDEX_URL (PIP_EXTRA_INDEX_URL) of
    #: the daemon's environment, else pip's config files, else pip's default (PyPI)
    image_pip_index_url: str | None = None
    image_pip_extra_index_url: str | None = None
    #: a build not done in this long is stopped and fails
    image_build_timeout: float = 3600.0
    gpu_poll_interval: float = 2.0
    #: how many queued jobs (in scheduling order) a round triggered by an event looks at
    #: (Slurm's default_queue_depth); the jobs past them wait for the next full pass (#12)
    sched_queue_depth: int = 100
    #: a full scheduling pass over the whole queue at least this often while jobs are
    #: queued (Slurm's sched_interval)
    sched_interval: float = 5.0
    #: preemption (#13): a queued job that has waited this long may have running jobs of
    #: a lower priority suspended for it; None (the default) never preempts
    preempt_after: float | None = None
    log_level: str = "info"
    #: diagnostics (#12): log every event-loop step longer than this ("20ms"), with its
    #: task's name; while one runs, no request is read or answered. None: off
    loop_stall_log: float | None = None
    #: fair share (#5): usage counts half after this long (Slurm's PriorityDecayHalfLife)
    fairshare_half_life: float = 7 * 86400.0
    #: priority = job priority + fairshare_weight * F + age_weight * min(age / max_age, 1)
    fairshare_weight: float = 1000.0
    age_weight: float = 100.0
    max_age: float = 7 * 86400.0

    #: retention (#12): a finished job's directory (payload, log, result) is removed this
    #: long after it ended; None keeps them
    retention_job_dirs: float | None = 7 * 86400.0
    #: ... and its records in the ledger (its usage is rolled up first); None keeps them
    retention_jobs: float | None = 90 * 86400.0
    #: the most bytes the jobs directory may hold; over it, finished jobs' directories go
    #: oldest first (None: no cap; measuring walks every job directory)
    retention_max_bytes: int | None = None
    #: how often the daemon collects by itself; None: only `gpud gc` does
    retention_interval: float | None = 600.0

    #: webhooks (#14, notify=): "off" (the default: a daemon, often root on a shared box,
    #: must not be made to POST to internal services by whoever can submit), "any", or
    #: the hosts jobs may name, e.g. ["hooks.slack.com"]
    webhooks: str | list[str] = "off"
    #: a webhook that does not answer 2xx is tried again, the waits doubling from
    #: webhook_backoff up to 5 min, for at most this long after the job ended
    webhook_retry_for: float = 3600.0
    webhook_backoff: float = 2.0
    #: GET /metrics over TCP (#16): a bearer token of its own for a Prometheus scraper
    #: (at least 16 characters); admins' tokens work too. None: admins only. The Unix
    #: socket needs no token
    metrics_token: str | None = None

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.db"

    @property
    def jobs_dir(self) -> Path:
        return self._shared_root / "jobs"

    @property
    def runtime_dir(self) -> Path:
        return self._shared_root / "runtime"

    @property
    def _shared_root(self) -> Path:
        """Where job directories and the worker runtime live: on a Slurm cluster's
        shared directory, which every node mounts (#15), else in the data directory."""
        if self.executor == "slurm" and self.slurm_shared_dir is not None:
            return self.slurm_shared_dir
        return self.data_dir

    @property
    def effective_default_timeout(self) -> float:
        return self.default_timeout if self.default_timeout is not None else self.max_timeout


_ENV_PREFIX = "GPUD_"
_DURATIONS = {
    "max_timeout",
    "default_timeout",
    "kill_grace",
    "max_grace",
    "shell_idle_timeout",
    "retry_backoff",
    "retry_backoff_max",
    "gpu_poll_interval",
    "keep_warm_default",
    "keep_warm_max",
    "fairshare_half_life",
    "max_age",
    "snapshot_restore_timeout",
    "image_build_timeout",
    "header_timeout",
    "body_timeout",
    "retention_job_dirs",
    "retention_jobs",
    "retention_interval",
    "sched_interval",
    "webhook_retry_for",
    "webhook_backoff",
    "preempt_after",
    "slurm_poll_interval",
    "loop_stall_log",
}
#: Durations that "none" (or "") turns off.
_OPTIONAL = {
    "default_timeout",
    "retention_job_dirs",
    "retention_jobs",
    "retention_interval",
    "preempt_after",
    "loop_stall_log",
}
#: The shortest retention: a client fetches a job's result and log after it ends.
MIN_RETENTION = 60.0
_WEIGHTS = {"fairshare_weight", "age_weight"}


def parse_tcp(value: str) -> tuple[str, int]:
    """Parse "HOST:PORT". Any host is accepted since every TCP request needs a token (#5);
    the server warns about a non-loopback one (tokens then cross the network in clear)."""
    host, sep, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(f"tcp = {value!r}: write HOST:PORT, e.g. '127.0.0.1:7878'")
    return host, int(port_s)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or environment value into the field's type, with a clear error."""
    try:
        if name in _DURATIONS:
            if value is None or (name in _OPTIONAL and str(value).strip().lower() in ("", "none")):
                return None
            seconds = parse_duration(value)
            if name == "retention_interval" and seconds == 0:
                return None
            return seconds
        if name in ("data_dir", "socket"):
            return Path(os.path.expanduser(str(value)))
        if name == "slurm_shared_dir":
            return Path(os.path.expanduser(str(value))) if value else None
        if name == "slurm_gpu_types":
            return _gpu_type_map(value)
        if name == "slurm_extra_args":
            import shlex

            items = shlex.split(value) if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise ValueError('a list of sbatch arguments, e.g. ["--constraint=ib"]')
            return list(items)
        if name in ("slurm_partition", "slurm_account", "slurm_qos"):
            return str(value) if value else None
        if name in ("podman_start_service", "podman_read_only"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError("true or false")
            return text in ("1", "true", "yes")
        if name == "podman_volumes":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise ValueError('a list of "SRC:DST[:ro]" strings')
            vols = [v.strip() for v in items if v.strip()]
            for v in vols:
                if not v.startswith("/") or ":" in v and not v.split(":")[1].startswith("/"):
                    raise ValueError(f"{v!r}: write absolute paths, SRC:DST[:ro]")
            return vols
        if name == "allowed_pythons":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise ValueError('a list of glob patterns, e.g. ["/opt/conda/envs/*/bin/python"]')
            globs = [v.strip() for v in items if v.strip()]
            for g in globs:
                if not g.startswith("/"):
                    raise ValueError(f"{g!r}: write absolute paths (globs allowed)")
            return globs
        if name == "webhooks":
            from gpud.webhooks import parse_webhooks

            return parse_webhooks(value)
        if name == "fake_gpus":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError('a list of GPU types, e.g. ["h100", "h100"]')
            return list(value)
        if name in _WEIGHTS:
            w = float(value)
            if not 0 <= w < float("inf"):
                raise ValueError("a number >= 0")
            return w
        if name == "retention_max_bytes" and (
            value is None or str(value).strip().lower() in ("", "none")
        ):
            return None
        if name == "park_max_bytes":
            text = str(value).strip().lower() if value is not None else "auto"
            if text in ("", "auto"):
                return None
            from gpud_client.duration import parse_size

            n = int(text) if text.isdigit() else parse_size(text)
            if n < 0:
                raise ValueError('a size, e.g. "64GiB", 0 (never park) or "auto"')
            return n
        if (
            name
            in (
                "snapshot_max_bytes",
                "image_max_bytes",
                "max_body_bytes",
                "max_body_in_flight",
                "retention_max_bytes",
            )
            and isinstance(value, str)
            and not value.strip().isdigit()
        ):
            from gpud_client.duration import parse_size

            return parse_size(value)
        if name in (
            "cpu_slots",
            "max_body_bytes",
            "snapshot_max_bytes",
            "snapshot_max_failures",
            "image_max_bytes",
            "max_body_in_flight",
            "listen_backlog",
            "retention_max_bytes",
            "sched_queue_depth",
        ):
            n = int(value)
            if n < 1:
                raise ValueError("a whole number >= 1")
            return n
        if name == "tcp":
            return str(value) if value not in (None, "", "none") else None
        if name == "metrics_token":
            if value in (None, ""):
                return None
            if not isinstance(value, str) or len(value) < 16 or any(c.isspace() for c in value):
                raise ValueError(
                    "a token of at least 16 characters without spaces, e.g. "
                    "the output of `openssl rand -hex 16`"
                )
            return value
        if name in (
            "default_image",
            "image_build_network",
            "image_pip_index_url",
            "image_pip_extra_index_url",
        ):
            return str(value) if value else None
        if name == "python":
            return str(value) if value else None
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"setting {name} = {value!r} is not valid: {e}") from None


def _gpu_type_map(value: Any) -> dict[str, str]:
    """slurm_gpu_types: a TOML table, or "h100=h100,a100=a100_80g" from the environment."""
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError('"gpud_type=gres_type,...", e.g. "h100=h100,a100=a100_80g"')
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
    ):
        raise ValueError('a table of GPU types, e.g. {h100 = "h100", a100 = "a100_80g"}')
    return {k.lower(): v for k, v in value.items()}


def load_config(
    path: str | Path | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Build the configuration: defaults, then the TOML file, then GPUD_* env, then overrides."""
    env = dict(os.environ) if env is None else env
    known = {f.name for f in fields(Config)}
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"config file {p}: unknown setting(s) {', '.join(unknown)}; "
                f"known settings: {', '.join(sorted(known))}"
            )
        values.update({k: _coerce(k, v) for k, v in data.items()})
    for name in known:
        raw = env.get(_ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in known:
            raise ConfigError(f"unknown setting {k}")
        values[k] = _coerce(k, v)
    cfg = replace(Config(), **values)
    if cfg.executor not in ("process", "podman", "slurm"):
        raise ConfigError(
            f'executor = {cfg.executor!r} is not available: use "process", "podman" or "slurm"'
        )
    if cfg.gpus not in ("auto", "fake", "none"):
        raise ConfigError(f'gpus = {cfg.gpus!r}: use "auto", "fake" or "none"')
    if cfg.tcp:
        parse_tcp(cfg.tcp)
    if cfg.default_timeout is not None and cfg.default_timeout > cfg.max_timeout:
        raise ConfigError("default_timeout cannot be larger than max_timeout")
    if cfg.max_body_in_flight < cfg.max_body_bytes:
        raise ConfigError(
            f"max_body_in_flight ({cfg.max_body_in_flight}) is smaller than max_body_bytes "
            f"({cfg.max_body_bytes}): a request of the largest allowed size could never be "
            "taken; raise max_body_in_flight or lower max_body_bytes"
        )
    if cfg.header_timeout <= 0 or cfg.body_timeout <= 0:
        raise ConfigError('header_timeout and body_timeout must be positive, e.g. "10s"')
    if cfg.fairshare_half_life <= 0:
        raise ConfigError('fairshare_half_life must be positive, e.g. "7d"')
    if cfg.sched_interval <= 0:
        # 0 would make the scheduler loop spin; a tenth of a second is already eager.
        raise ConfigError('sched_interval must be positive, e.g. "5s"')
    if cfg.preempt_after is not None and cfg.preempt_after < 0:
        raise ConfigError('preempt_after must be a duration, e.g. "10m", or "none"')
    _check_retention(cfg)
    return cfg


def _check_retention(cfg: Config) -> None:
    from gpud_client.duration import format_duration

    for name in ("retention_job_dirs", "retention_jobs"):
        value = getattr(cfg, name)
        if value is not None and value < MIN_RETENTION:
            raise ConfigError(
                f"{name} = {format_duration(value)} is too short: clients fetch a job's "
                f"result and log after it ends; use at least {format_duration(MIN_RETENTION)}"
                f' (e.g. "7d"), or "none" to keep them'
            )
    dirs, jobs = cfg.retention_job_dirs, cfg.retention_jobs
    if jobs is not None and (dirs is None or dirs > jobs):
        raise ConfigError(
            f"retention_jobs ({format_duration(jobs)}) is shorter than retention_job_dirs "
            f"({'none' if dirs is None else format_duration(dirs)}): a job's record would go "
            "before its directory. Make retention_jobs at least as long, or set it to "
            '"none"'
        )
    if cfg.retention_interval is not None and cfg.retention_interval < 1:
        raise ConfigError(
            'retention_interval must be at least 1s (e.g. "10m"), or '
            '"none" to collect only on `gpud gc`'
        )
