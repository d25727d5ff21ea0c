"""The Podman executor: every job in a fresh container, with exactly its GPUs.

The container runs the same worker runtime as a process job, bind-mounted read-only
with its own copy of cloudpickle, so any image with a matching ``python3`` works and
users never install gpud into their images. The job directory is the only other mount
(plus volumes the admin configures); the worker writes its log there itself
(GPUD_LOG_FILE), so logs stream exactly as for process jobs.

podman-py is synchronous (requests): every call goes through a worker thread. Waiting
for a container uses a pidfd on its init process, so a wait is cancellable and works
the same for a container adopted after a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import subprocess
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import trio

from gpud.domain import Job, JobState
from gpud.executors import oom
from gpud.executors.base import (
    ExecutorRefusal,
    Handle,
    ImageInfo,
    LaunchSpec,
    Outcome,
    container_of,
)
from gpud.executors.process import job_environment, proc_start_time
from gpud.identity import JobIdentity
from gpud.safefs import open_append
from gpud_client.jobdir import WORKER_NAME
from snapshots import podman as snap

__all__ = [
    "CDI_DIRS",
    "PodmanExecutor",
    "PodmanUnavailable",
    "cdi_has_nvidia",
    "container_spec",
]

log = logging.getLogger("gpud.podman")

#: Where the runtime and the job directory appear inside every container.
RUNTIME_MOUNT = "/gpud/runtime"
JOB_MOUNT = "/gpud/job"
JOBS_MOUNT = "/gpud/jobs"  # warm containers: every job directory, by id
HUB_MOUNT = "/gpud/hub"
STATE_MOUNT = "/gpud/state"
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
LABEL_JOB = "gpud.job"
LABEL_DAEMON = "gpud.daemon"


class PodmanUnavailable(RuntimeError):
    """The Podman service cannot be reached; the message says how to start it."""


def cdi_has_nvidia(dirs: Iterable[str] = CDI_DIRS) -> bool:
    """Is there a CDI spec for NVIDIA GPUs (from `nvidia-ctk cdi generate`)?"""
    for d in dirs:
        for path in glob.glob(os.path.join(d, "*")):
            with contextlib.suppress(OSError), open(path, errors="replace") as fh:
                if "nvidia.com/gpu" in fh.read(1 << 20):
                    return True
    return False


def gpu_devices(
    uuids: tuple[str, ...], indices: tuple[int, ...], *, fake: bool, cdi: bool
) -> list[str]:
    """The --device values that give a container exactly these GPUs.

    With CDI, by UUID (the toolkit then also mounts the driver libraries). Without it,
    the device nodes only: CUDA needs the driver's user-space libraries too, which an
    image must then bring itself (`gpud gpus` says so). Fake GPUs have no devices.
    """
    if fake or not uuids:
        return []
    if cdi:
        return [f"nvidia.com/gpu={u}" for u in uuids]
    nodes = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    # NVML's index is the device minor number on every box we know of.
    nodes += [f"/dev/nvidia{i}" for i in indices]
    return [f"{n}:{n}:rwm" for n in nodes if os.path.exists(n)]


def container_spec(
    spec: LaunchSpec,
    *,
    image: str,
    identity: JobIdentity,
    env: dict[str, str],
    runtime_dir: Path,
    instance: str,
    devices: list[str],
    network: str,
    read_only: bool,
    volumes: list[str],
    shm_size: str = "1g",
) -> dict[str, Any]:
    """The podman-py ``containers.create`` arguments for one job (pure, for tests)."""
    mounts: list[dict[str, Any]] = [
        {"type": "bind", "source": str(runtime_dir), "target": RUNTIME_MOUNT, "read_only": True},
        # A writable /tmp (HOME) even on a read-only root: through the API, Podman 4.3
        # does not add one by itself.
        {"type": "tmpfs", "source": "tmpfs", "target": "/tmp"},
    ]
    command = ["python3", "-u", f"{RUNTIME_MOUNT}/{WORKER_NAME}", JOB_MOUNT]
    extra_env = {"GPUD_LOG_FILE": f"{JOB_MOUNT}/output.log"}
    workdir = JOB_MOUNT
    if spec.serve is None:
        mounts.append({"type": "bind", "source": str(spec.job_dir), "target": JOB_MOUNT})
        # The job's state directory (#14), at one fixed path; a warm container finds
        # each job's under /gpud/jobs (its task's GPUD_STATE_DIR says where). The daemon
        # always lays one out; a job directory made by other means may have none.
        if (spec.job_dir / "state").is_dir():
            mounts.append(
                {"type": "bind", "source": str(spec.job_dir / "state"), "target": STATE_MOUNT}
            )
            extra_env["GPUD_STATE_DIR"] = STATE_MOUNT
    else:
        # A warm container takes job after job: it sees the jobs directory (whose other
        # users' entries are 0700, closed to it) and the daemon's hub socket.
        hub, token = spec.serve
        mounts += [
            {
                "type": "bind",
                "source": str(Path(hub).parent),
                "target": HUB_MOUNT,
                "read_only": True,
            },
            {"type": "bind", "source": str(spec.job_dir.parent), "target": JOBS_MOUNT},
        ]
        command = [*command[:-1], "--serve"]
        extra_env = {"GPUD_HUB": f"{HUB_MOUNT}/{Path(hub).name}", "GPUD_WORKER_TOKEN": token}
        workdir = "/tmp"
    if spec.snapshot is not None:
        mounts.append(
            {
                "type": "bind",
                "source": str(spec.snapshot),
                "target": snap.SNAPSHOT_MOUNT,
                "read_only": True,
            }
        )
    for v in volumes:
        src, _, rest = v.partition(":")
        dst, _, opts = rest.partition(":")
        mounts.append(
            {"type": "bind", "source": src, "target": dst or src, "read_only": opts == "ro"}
        )
    args: dict[str, Any] = {
        "image": image,
        "command": command,
        "name": f"gpud-{instance}-{spec.job_id}-{spec.attempt}",  # = _container_name
        "labels": {
            LABEL_JOB: str(spec.job_id),
            LABEL_DAEMON: instance,
            "gpud.attempt": str(spec.attempt),
        },
        # The image's own PATH (where its python3 is), not the host's.
        "environment": {
            **{k: v for k, v in env.items() if k != "PATH"},
            "HOME": "/tmp",
            **extra_env,
        },
        "working_dir": workdir,
        # Never root, never more privileges than it started with: the submitter's uid and
        # gid on a root daemon (#5), with their supplementary groups below.
        "user": f"{identity.uid}:{identity.gid}",
        # (podman-py turns security_opt into SELinux labels: this flag is the real one.)
        "no_new_privileges": True,
        "cap_drop": ["ALL"],
        "read_only": read_only,
        "shm_size": shm_size,
        "mounts": mounts,
        "devices": devices,
        "network_mode": network,
        "stdin_open": False,
    }
    if identity.groups:
        # Exactly the groups a login of this user has (as for a process job), so that
        # group-shared datasets mounted with podman_volumes work as in the user's shell.
        args["group_add"] = [str(g) for g in identity.groups]
    if spec.snapshot is not None:
        # CRIU can dump it only in a user namespace of root's; its restores read their
        # memory pages from the snapshot's directory, mounted (see snapshots.podman).
        args["userns_mode"] = "private"
        args["idmappings"] = snap.SNAPSHOT_IDMAPPINGS
    if spec.memory is not None:
        args["mem_limit"] = spec.memory
    if spec.cpus is not None:
        # podman-py drops nano_cpus on the libpod API; period/quota is what Podman keeps
        # (and reports back as NanoCpus).
        args["cpu_period"] = 100_000
        args["cpu_quota"] = max(1000, round(spec.cpus * 100_000))
    return args


class PodmanExecutor:
    name = "podman"
    #: warm containers (keep_warm) and container snapshots (snapshot=True)
    supports_warm = True
    supports_snapshots = True
    supports_image_builds = True  # gpud.Image definitions (#11), into its image store

    def __init__(
        self,
        *,
        url: str,
        runtime_dir: Path,
        identity: JobIdentity,
        instance: str,
        default_image: str,
        network: str = "none",
        read_only: bool = True,
        start_service: bool = False,
        fake_gpus: bool = False,
        volumes: list[str] | None = None,
        jobs_dir: Path,
        shm_size: str = "1g",
    ) -> None:
        self.url = url
        self.runtime_dir = runtime_dir
        self.identity = identity
        self.instance = instance
        self.default_image = default_image
        self.network = network
        self.read_only = read_only
        self.start_service = start_service
        self.fake_gpus = fake_gpus
        self.volumes = list(volumes or [])
        self.jobs_dir = jobs_dir
        self.shm_size = shm_size
        self._client: Any = None
        self._service: subprocess.Popen[bytes] | None = None
        self._pythons: dict[str, str] = {}  # image id -> "3.11.2"
        self.cdi = cdi_has_nvidia()

    # -- the service ------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The podman-py client (synchronous: call it from a worker thread)."""
        return self._client

    @property
    def socket_path(self) -> str:
        return self.url.removeprefix("unix://")

    async def start(self) -> None:
        await trio.to_thread.run_sync(self._connect)

    def _connect(self) -> None:
        import podman

        self._client = podman.PodmanClient(base_url=self.url)
        if self._ping():
            return
        if not self.start_service:
            raise PodmanUnavailable(
                f"the Podman service does not answer at {self.url}: start it with "
                "`systemctl enable --now podman.socket` (or `podman system service --time=0 "
                f"{self.url} &`), or set podman_start_service = true to let gpud start it"
            )
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        log.info("starting the Podman service on %s", self.url)
        self._service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # it outlives us, like the containers it serves
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._ping():
                return
            time.sleep(0.1)
        raise PodmanUnavailable(f"started `podman system service` but {self.url} never answered")

    def _ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False

    # -- images -------------------------------------------------------------------------

    async def python_for(self, image: str | None) -> tuple[str, str]:
        name = image or self.default_image
        return name, await trio.to_thread.run_sync(self._python_of, name)

    def _python_of(self, name: str) -> str:
        import podman.errors

        try:
            img = self._client.images.get(name)
        except podman.errors.ImageNotFound:
            raise ExecutorRefusal(
                f"image {name!r} is not in this machine's Podman store: build or load it "
                "there first (gpud never pulls), or pick one of `gpud images`"
            ) from None
        cached = self._pythons.get(img.id)
        if cached is not None:
            return cached
        # One throwaway container tells us the image's Python and proves the mounted
        # runtime (and its cloudpickle) imports there. It runs as the executor's default
        # identity (job_user on a root daemon: unprivileged, no extra groups, never root),
        # not as the submitter: the answer is cached per image for everyone, and what
        # that least-privileged user can run, any submitter's uid can run too.
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import cloudpickle; "
            "print('%d.%d.%d' % sys.version_info[:3])"
        )
        ctr = self._client.containers.create(
            image=name,
            command=["python3", "-c", code, RUNTIME_MOUNT],
            mounts=[
                {
                    "type": "bind",
                    "source": str(self.runtime_dir),
                    "target": RUNTIME_MOUNT,
                    "read_only": True,
                }
            ],
            user=f"{self.identity.uid}:{self.identity.gid}",
            network_mode="none",
            labels={LABEL_DAEMON: self.instance, "gpud.probe": "1"},
        )
        try:
            ctr.start()
            code_ = ctr.wait(timeout=120)
            out = b"".join(ctr.logs(stdout=True, stderr=True)).decode(errors="replace").strip()
        except podman.errors.APIError as e:
            # e.g. "executable file `python3` not found in $PATH"
            code_, out = -1, str(getattr(e, "explanation", None) or e)
        finally:
            with contextlib.suppress(Exception):
                ctr.remove(force=True)
        if code_ != 0 or not out[:1].isdigit():
            last = out.splitlines()[-1] if out else f"exit code {code_}"
            raise ExecutorRefusal(
                f"image {name!r} cannot run gpud jobs: `python3` there failed ({last}); use an "
                "image with python3 on its PATH"
            )
        version = out.splitlines()[-1]
        self._pythons[img.id] = version
        return version

    async def images(self) -> list[ImageInfo]:
        return await trio.to_thread.run_sync(self._images)

    def _images(self) -> list[ImageInfo]:
        out = []
        for img in self._client.images.list():
            for tag in img.tags or []:
                if "<none>" in tag:
                    continue
                created = img.attrs.get("Created", 0)
                out.append(
                    ImageInfo(
                        name=tag,
                        id=img.id,
                        size=int(img.attrs.get("Size", 0)),
                        created=float(created) if isinstance(created, int | float) else 0.0,
                        python=self._pythons.get(img.id),
                    )
                )
        return sorted(out, key=lambda i: i.name)

    # -- running ------------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> Handle:
        return await trio.to_thread.run_sync(self._launch, spec)

    def _launch(self, spec: LaunchSpec) -> Handle:
        # Its submitter on a root daemon (#5); the executor's default identity otherwise.
        ident = spec.identity or self.identity
        env = job_environment(spec, ident, self.instance)
        devices = gpu_devices(spec.gpus, spec.gpu_indices, fake=self.fake_gpus, cdi=self.cdi)
        args = container_spec(
            spec,
            image=spec.image or self.default_image,
            identity=ident,
            env=env,
            runtime_dir=self.runtime_dir,
            instance=self.instance,
            devices=devices,
            network=self.network,
            read_only=self.read_only,
            volumes=self.volumes,
            shm_size=self.shm_size,
        )
        # A container of an earlier attempt of this job may still exist (daemon killed
        # between its end and its removal): its name would clash.
        with contextlib.suppress(Exception):
            self._client.containers.get(args["name"]).remove(force=True)
        ctr = self._client.containers.create(**args)
        try:
            ctr.start()
            ctr.reload()
        except Exception:
            with contextlib.suppress(Exception):
                ctr.remove(force=True)
            raise
        pid = int(ctr.attrs.get("State", {}).get("Pid") or 0)
        return Handle(
            job_id=spec.job_id,
            pid=pid,
            pid_start=proc_start_time(pid) or 0 if pid else 0,
            container=ctr.id,
        )

    def _container_name(self, job_id: int, attempt: int) -> str:
        return f"gpud-{self.instance}-{job_id}-{attempt}"

    # -- snapshots (issue #4) -------------------------------------------------------------

    hub_mount = HUB_MOUNT

    async def image_id(self, name: str) -> str:
        """The image's id (content digest), for snapshot keys."""
        return await trio.to_thread.run_sync(lambda: str(self._client.images.get(name).id))

    async def checkpoint(self, handle: Handle, dest: Path) -> int:
        """Checkpoint a running (warm, idle) container into ``dest`` (the snapshot
        directory it has mounted); it runs on. Returns the snapshot's size in bytes."""
        return await trio.to_thread.run_sync(
            snap.checkpoint_to_dir, self._client, str(handle.container), dest
        )

    async def restore(
        self, location: Path, job_id: int, attempt: int, hang_limit: float = 30.0
    ) -> Handle:
        """A new container for this job, restored from a snapshot directory. CRIU can
        hang for good on a damaged checkpoint: after ``hang_limit`` seconds the restore
        is killed and SnapshotError raised."""
        name = self._container_name(job_id, attempt)

        def work() -> Handle:
            with contextlib.suppress(Exception):
                self._client.containers.get(name).remove(force=True)
            cid = snap.restore_from_dir(self._client, location, name)
            ctr = self._client.containers.get(cid)
            pid = int(ctr.attrs.get("State", {}).get("Pid") or 0)
            return Handle(
                job_id=job_id,
                pid=pid,
                pid_start=proc_start_time(pid) or 0 if pid else 0,
                container=cid,
            )

        done = trio.Event()
        outcome: list[Any] = []

        async def attempt_() -> None:
            try:
                outcome.append(await trio.to_thread.run_sync(work))
            except Exception as e:  # noqa: BLE001 - handed to the caller below
                outcome.append(e)
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(attempt_)
            with trio.move_on_after(hang_limit):
                await done.wait()
            if not done.is_set():
                # Kill CRIU; the restore call then fails and the thread ends. (Waited
                # for: its clean-up removes the container by name, which the job's
                # cold start reuses.)
                killed = await trio.to_thread.run_sync(snap.kill_restore, name)
                log.warning(
                    "restore of %s hung for %g s: killed %d processes", name, hang_limit, killed
                )
                await done.wait()
                with contextlib.suppress(Exception):
                    await trio.to_thread.run_sync(
                        lambda: self._client.containers.get(name).remove(force=True)
                    )
                outcome[:] = [
                    snap.SnapshotError(
                        f"restore failed: it hung for {hang_limit:g} s (CRIU could not read the "
                        "checkpoint: damaged?)"
                    )
                ]
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        handle: Handle = outcome[0]
        return handle

    async def wait(self, handle: Handle) -> Outcome:
        counter, before, after = None, None, None  # the cgroup's OOM kills (gpud.executors.oom)
        if handle.pid:
            try:
                fd = os.pidfd_open(handle.pid)
            except ProcessLookupError:
                fd = -1
            if fd >= 0:
                try:
                    if proc_start_time(handle.pid) == handle.pid_start:
                        counter = oom.counter_file(handle.pid)
                        before = oom.kills(counter)
                        await trio.lowlevel.wait_readable(fd)
                        after = oom.kills(counter)  # now: Podman's cleanup removes it
                finally:
                    os.close(fd)
        outcome = await trio.to_thread.run_sync(self._outcome, handle, abandon_on_cancel=True)
        # A fresh container's cgroup starts at 0 kills (its process may be killed before
        # this wait begins); an adopted one's count may hold kills of earlier children.
        base = before if handle.adopted else 0
        if not outcome.oom_killed and base is not None and after is not None and after > base:
            outcome = dataclasses.replace(outcome, oom_killed=True)
        return outcome

    def _outcome(self, handle: Handle) -> Outcome:
        import podman.errors

        try:
            ctr = self._client.containers.get(handle.container)
            code = ctr.wait(condition=["exited", "stopped"], timeout=3600 * 24 * 365)
        except podman.errors.NotFound:
            return Outcome(exit_code=None)
        except podman.errors.APIError as e:
            # Its conmon was killed: Podman has no exit code to give ("no such exit code
            # (container in state running)") although the process is gone. The worker's
            # status.json says how the job ended; without it the job failed, as any whose
            # process died before writing its result. Not an internal error.
            log.warning("container %s: no exit code from Podman: %s", handle.container, e)
            return Outcome(exit_code=None)
        code = int(code) if isinstance(code, int) else None
        # An OOM kill shows as exit 137, like any SIGKILL: only the container's state
        # tells them apart (#16). Read after the wait, when Podman has recorded it.
        try:
            ctr.reload()
            state, host = ctr.attrs.get("State") or {}, ctr.attrs.get("HostConfig") or {}
        except podman.errors.NotFound:
            return Outcome(exit_code=code)
        limit = host.get("Memory")
        return Outcome(
            exit_code=code,
            oom_killed=bool(state.get("OOMKilled")),
            memory_limit=int(limit) if isinstance(limit, int) and limit > 0 else None,
        )

    async def stop(self, handle: Handle, grace: float) -> bool | None:
        return await trio.to_thread.run_sync(self._stop, handle, grace)

    def _stop(self, handle: Handle, grace: float) -> bool | None:
        killed: bool | None = None
        with contextlib.suppress(Exception):
            # podman stop: SIGTERM to the container's processes, SIGKILL after `timeout`.
            ctr = self._client.containers.get(handle.container)
            ctr.stop(timeout=max(1, round(grace)))
            ctr.reload()
            # 137 = 128 + SIGKILL: the grace ran out (#14: the job's events say which).
            killed = int(ctr.attrs.get("State", {}).get("ExitCode", -1)) == 137
        self.reap(handle)
        return killed

    async def send_signal(self, handle: Handle, sig: int) -> bool:
        """Signal the container's first process, the worker (#14's early warning)."""

        def send() -> bool:
            try:
                self._client.containers.get(handle.container).kill(signal=int(sig))
            except Exception:  # noqa: BLE001 - gone, or stopping: no warning to give
                return False
            return True

        return await trio.to_thread.run_sync(send)

    def reap(self, handle: Handle) -> None:
        """Remove the container (killing anything left in it); outputs are in the job dir."""
        import podman.errors

        try:
            ctr = self._client.containers.get(handle.container)
        except podman.errors.NotFound:
            return
        self._keep_early_output(ctr, handle)
        try:
            ctr.remove(force=True)
        except podman.errors.NotFound:
            pass
        except podman.errors.APIError:
            # A container restored from a checkpoint cannot be removed while it runs
            # (Podman 4.3: "unlinkat .../userdata/shm: device or resource busy"): kill it,
            # let it end, then remove it.
            with contextlib.suppress(podman.errors.APIError):
                ctr.kill()
                ctr.wait(condition=["exited", "stopped"], timeout=30)
            for delay in (0.0, 0.2, 1.0):
                time.sleep(delay)
                try:
                    ctr.remove(force=True)
                    return
                except podman.errors.NotFound:
                    return
                except podman.errors.APIError as e:
                    error = e
            log.warning("could not remove container %s: %s", handle.container, error)

    def _keep_early_output(self, ctr: Any, handle: Handle) -> None:
        """What the container printed before the worker took over its output (an image
        whose python3 crashed at start, say) would vanish with it: append it to the
        job's log."""
        with contextlib.suppress(Exception):
            early = b"".join(ctr.logs(stdout=True, stderr=True))
            if early:
                fd = open_append(self.jobs_dir / str(handle.job_id) / "output.log")
                try:
                    os.write(fd, early)
                finally:
                    os.close(fd)

    # -- restart ------------------------------------------------------------------------

    def _ours(self) -> list[Any]:
        return list(
            self._client.containers.list(
                all=True, filters={"label": f"{LABEL_DAEMON}={self.instance}"}
            )
        )

    def adopt(self, job: Job) -> Handle | None:
        if job.state not in (JobState.STARTING, JobState.RUNNING):
            return None
        for ctr in self._ours():
            # A warm or restored container is labelled with the job it was started for,
            # not the one it runs now: that one is known by the container's init pid.
            if ctr.labels.get(LABEL_JOB) != str(job.id) and not self._runs(ctr, job):
                continue
            ctr.reload()
            state = ctr.attrs.get("State", {})
            # A suspended job's container is paused (#13), and Podman says paused, not
            # running: it is there to adopt, and to unpause on resume, not to remove.
            if state.get("Running") or state.get("Paused"):
                pid = int(state.get("Pid") or 0)
                return Handle(
                    job_id=job.id,
                    pid=pid,
                    pid_start=proc_start_time(pid) or 0,
                    adopted=True,
                    container=ctr.id,
                )
            # It ended while no daemon watched: its outputs are in the job directory.
            with contextlib.suppress(Exception):
                ctr.remove(force=True)
        return None

    @staticmethod
    def _pid(ctr: Any) -> int:
        """The container's init pid (0: not running), from a listing or an inspect."""
        state = ctr.attrs.get("State")
        return int((state.get("Pid") if isinstance(state, dict) else ctr.attrs.get("Pid")) or 0)

    def _runs(self, ctr: Any, job: Job) -> bool:
        """Is this container's init process the job's recorded pid (a warm job)?"""
        pid = self._pid(ctr)
        return bool(job.pid) and pid == job.pid and proc_start_time(pid) == job.pid_start

    def cleanup(self, active: set[int], pids: Collection[int] = ()) -> None:
        for ctr in self._ours():
            job = ctr.labels.get(LABEL_JOB)
            pid = self._pid(ctr)
            if pid and pid in pids:
                continue  # a warm container running an active job
            if job is None or int(job) not in active:
                log.info("removing container %s left by a job that is over", ctr.name)
                with contextlib.suppress(Exception):
                    ctr.remove(force=True)

    def task_dir(self, job_dir: Path) -> str:
        return f"{JOBS_MOUNT}/{job_dir.name}"

    def job_for_pid(self, pid: int, handles: Iterable[Handle]) -> int | None:
        """A process is a job's when it lives in that job's container."""
        by_container = {h.container: h.job_id for h in handles if h.container}
        cid = container_of(pid, by_container)
        return None if cid is None else by_container[cid]

    def kill_all(self) -> None:
        for ctr in self._ours():
            with contextlib.suppress(Exception):
                ctr.remove(force=True)
