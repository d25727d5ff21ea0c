"""Putting the daemon together: lock, ledger, GPUs, executor, recovery, then HTTP.

``serve(config, task_status=...)`` is what `gpud serve` runs and what tests start in a
nursery (``await nursery.start(serve, cfg)``): it reports where it listens once every
socket is bound and the ledger is recovered, and cleans up when cancelled.
"""

from __future__ import annotations

import contextlib
import gc
import grp
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve

from gpud import http_edge, peercred
from gpud.api import create_app
from gpud.clock import Clock
from gpud.config import Config, is_loopback, parse_tcp
from gpud.cudackpt import ckpt_text
from gpud.daemon import AlreadyRunning, Daemon, instance_id, lock_data_dir
from gpud.executors.base import Executor, ExecutorRefusal
from gpud.executors.podman import CDI_DIRS
from gpud.executors.process import (
    JobIdentity,
    ProcessExecutor,
    job_identity,
    resolve_worker_python,
)
from gpud.gpus import GpuInventory, NoGpuInventory
from gpud.inventory import open_checkpointer, open_inventory
from gpud.ledger import LedgerThread
from gpud.loopwatch import ServerTiming, StallWatch
from gpud.priority import QuickFirst
from gpud_client.jobdir import install_runtime

__all__ = ["Served", "serve"]

log = logging.getLogger("gpud")


@dataclass(frozen=True)
class Served:
    daemon: Daemon
    socket: Path
    tcp: str | None  # "http://127.0.0.1:7878" when listening on TCP

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"


def _socket_in_use(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def prepare_dirs(config: Config) -> None:
    """Create the data and jobs directories with the modes the daemon needs (also used by
    `gpud admin`, which may run before the daemon ever has)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if config.executor == "slurm":
        from gpud.executors.slurm import check_shared_dir

        check_shared_dir(config.jobs_dir.parent)  # a clear message if it is not writable
    config.jobs_dir.mkdir(exist_ok=True)
    # Job users must traverse into their own job directory (0700, theirs) but not list
    # others': 0711 on the way down.
    if os.geteuid() == 0:
        os.chmod(config.data_dir, 0o711)
        os.chmod(config.jobs_dir, 0o711)
    else:
        os.chmod(config.data_dir, 0o700)
        os.chmod(config.jobs_dir, 0o700)


def _open_inventory(config: Config) -> GpuInventory:
    from gpud.testing.fake_gpus import FakeGpuInventory

    if config.executor == "slurm" and config.gpus == "auto":
        from gpud.executors.slurm_gpus import SlurmGpuInventory

        return SlurmGpuInventory(config.slurm_gpu_types)  # the cluster's GPUs (#15)
    if config.gpus == "fake":
        return FakeGpuInventory(config.fake_gpus, note='gpus = "fake": these GPUs are FAKE')
    if config.gpus == "none":
        return NoGpuInventory(note='gpus = "none": only CPU-only jobs run')
    return open_inventory(config.fake_gpus)


async def _make_executor(
    config: Config, inventory: GpuInventory, ident: JobIdentity, runtime: Path, instance: str
) -> tuple[Executor, str, str]:
    """The configured executor, ready, with the Python its jobs run (version, where)."""
    if config.executor == "podman":
        from gpud.executors.podman import PodmanExecutor

        image = config.default_image or "localhost/gpud-python:{}.{}".format(*sys.version_info)
        podman = PodmanExecutor(
            url=config.podman_url,
            runtime_dir=runtime,
            identity=ident,
            instance=instance,
            default_image=image,
            network=config.podman_network,
            read_only=config.podman_read_only,
            start_service=config.podman_start_service,
            fake_gpus=inventory.source == "fake",
            volumes=config.podman_volumes,
            jobs_dir=config.jobs_dir,
            shm_size=config.podman_shm_size,
        )
        await podman.start()
        try:
            _, version = await podman.python_for(None)
        except ExecutorRefusal as e:
            raise ExecutorRefusal(f"default_image: {e}") from None
        if not podman.cdi and inventory.source == "nvml":
            log.warning(
                "no CDI spec for NVIDIA GPUs in %s: GPU containers get the device "
                "nodes only; run `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`",
                " or ".join(CDI_DIRS),
            )
        return podman, version, image
    python, version = await trio.to_thread.run_sync(
        resolve_worker_python, config.python, ident, runtime
    )
    if config.executor == "slurm":
        from gpud.executors.slurm import slurm_executor

        ex = slurm_executor(config, python, version, runtime, ident, instance)
        await ex.start()
        return ex, version, python
    process = ProcessExecutor(
        python=python,
        version=version,
        runtime_dir=runtime,
        identity=ident,
        instance=instance,
        configured_python=config.python,
        allowed_pythons=config.allowed_pythons,
    )
    return process, version, python


def _check_backlog(backlog: int) -> None:
    """The kernel silently caps a listen backlog at net.core.somaxconn: say so."""
    try:
        cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return
    if cap < backlog:
        log.warning(
            "listen_backlog = %d but the kernel caps it at net.core.somaxconn = %d: "
            "raise that (sysctl -w net.core.somaxconn=%d) for bursts of connections",
            backlog,
            cap,
            backlog,
        )


def _raise_fd_limit() -> None:
    """Every connection is a file descriptor; a soft limit of 1024 (the usual default)
    would refuse a burst that the backlog lets in. Raise it to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(
    config: Config,
    *,
    inventory: GpuInventory | None = None,
    executor: Executor | None = None,
    kill_jobs_on_exit: bool = False,
    clock: Clock | None = None,
    task_status: trio.TaskStatus[Served] = trio.TASK_STATUS_IGNORED,
) -> None:
    lock_fd = lock_data_dir(config.data_dir)
    ledger: LedgerThread | None = None
    stalls: StallWatch | None = None
    own_inventory = inventory is None
    sock_path = config.socket
    try:
        if _socket_in_use(sock_path):
            raise AlreadyRunning(
                f"another gpud already answers on {sock_path}: stop it, or set another socket"
            )
        prepare_dirs(config)
        ident = job_identity(config.job_user)
        # Where any job user can read it, whoever installed gpud where.
        runtime = install_runtime(config.runtime_dir)
        os.chmod(config.runtime_dir, 0o755)
        if inventory is None:
            inventory = _open_inventory(config)
        if inventory.note:
            log.log(
                logging.INFO if inventory.source == "nvml" else logging.WARNING,
                "%s",
                inventory.note,
            )
        checkpointer, ckpt_support = open_checkpointer(inventory)
        log.info("GPU checkpointing: %s", ckpt_text(ckpt_support))
        ledger = LedgerThread(config.ledger_path)
        instance = instance_id(config.data_dir)
        if executor is None:
            executor, version, python = await _make_executor(
                config, inventory, ident, runtime, instance
            )
        else:  # given (tests: gpud.testing.FakeExecutor), ready
            python = executor.name
            _, version = await executor.python_for(None)
        daemon = Daemon(
            config,
            ledger=ledger,
            inventory=inventory,
            executor=executor,
            identity=ident,
            worker_python=version,
            instance=instance,
            clock=clock,
            checkpointer=checkpointer,
            checkpoint_support=ckpt_support,
        )
        daemon.kill_jobs_on_exit = kill_jobs_on_exit

        hc = HyperConfig()
        sock_path.parent.mkdir(parents=True, exist_ok=True)
        hc.bind = [f"unix:{sock_path}"]
        tcp_url = None
        if config.tcp:
            host, port = parse_tcp(config.tcp)
            hc.bind.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            if not is_loopback(host):
                log.warning(
                    "tcp = %s is reachable from other machines: every request there "
                    "needs a token, and tokens cross the network in clear text; put "
                    "a TLS proxy in front, or use an SSH tunnel",
                    config.tcp,
                )
        if not peercred.install():
            log.warning(
                "cannot read peer credentials with this hypercorn: clients on the "
                "Unix socket need tokens too"
            )
        if not http_edge.install():
            raise RuntimeError(
                "this hypercorn lacks what gpud.http_edge needs to keep one "
                "connection's failure from ending the daemon: install the "
                "hypercorn version pyproject.toml names"
            )
        hc.accesslog = None
        hc.errorlog = logging.getLogger("gpud.http")
        hc.graceful_timeout = 2.0
        hc.keep_alive_timeout = 75.0
        # The limits at the edge (#10): backlog, read timeouts (gpud.http_edge).
        hc.backlog = config.listen_backlog
        hc.gpud_edge = http_edge.EdgeSettings(  # type: ignore[attr-defined]  # our own, for http_edge
            header_timeout=config.header_timeout, body_timeout=config.body_timeout
        )
        _check_backlog(config.listen_backlog)
        _raise_fd_limit()
        budget = http_edge.BodyBudget(config.max_body_in_flight)
        app = http_edge.BodyBudgetMiddleware(create_app(daemon), budget, config.max_body_bytes)
        # Quick reads go before new job starts; each answer says how long it took (#12).
        timed = ServerTiming(QuickFirst(app, daemon.interactive))
        if config.loop_stall_log is not None:
            stalls = StallWatch(config.loop_stall_log)
            trio.lowlevel.add_instrument(stalls)
            gc.callbacks.append(stalls.gc_callback)
        # Only the owner (and, for a root daemon, the gpud group) may connect; who it is
        # exactly comes from the peer credentials (gpud.auth).
        hc.umask = 0o177 if os.geteuid() != 0 else 0o117

        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            binds = await nursery.start(hypercorn_serve, timed, hc)
            if os.geteuid() == 0:
                with contextlib.suppress(KeyError):
                    os.chown(sock_path, 0, grp.getgrnam("gpud").gr_gid)
            for b in binds:
                if not b.startswith("http://unix") and "://" in b and "/" not in b[7:]:
                    tcp_url = b
            log.info(
                "gpud serving on %s%s; executor %s, worker Python %s (%s) as %s; GPUs: %s",
                sock_path,
                f" and {tcp_url}" if tcp_url else "",
                executor.name,
                version,
                python,
                ident.user,
                inventory.source,
            )
            task_status.started(Served(daemon=daemon, socket=sock_path, tcp=tcp_url))
    finally:
        if stalls is not None:
            trio.lowlevel.remove_instrument(stalls)
            gc.callbacks.remove(stalls.gc_callback)
        if ledger is not None:
            ledger.close()
        if own_inventory and inventory is not None:
            inventory.close()
        with contextlib.suppress(FileNotFoundError):
            if not _socket_in_use(sock_path):
                sock_path.unlink()
        os.close(lock_fd)
