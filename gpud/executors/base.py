"""The executor contract: how the daemon starts, watches, stops and re-adopts a job.

The service owns scheduling, the ledger and timeouts; an executor only knows how to run
the worker runtime for one prepared job directory somewhere (a process, a container)
and how to make it stop. Outcomes are read from the job directory by the service.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gpud.domain import Job, PythonEnv
from gpud.identity import JobIdentity

__all__ = [
    "Executor",
    "ExecutorRefusal",
    "Handle",
    "ImageInfo",
    "LaunchSpec",
    "Outcome",
    "container_of",
]


def container_of(pid: int, containers: Iterable[str]) -> str | None:
    """Which of these containers (by id) the process ``pid`` lives in: its cgroup path
    names the container. None if none of them, or no such process."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as fh:
            cgroup = fh.read()
    except OSError:
        return None
    return next((c for c in containers if c and c in cgroup), None)


class ExecutorRefusal(ValueError):
    """A job this executor cannot run (missing image, wrong Python); said at submit."""


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    job_id: int
    attempt: int
    job_dir: Path
    log_path: Path
    gpus: tuple[str, ...]  # UUIDs, in the order the job sees them
    gpu_indices: tuple[int, ...] = ()  # their NVML indices (device nodes without CDI)
    env: dict[str, str] = field(default_factory=dict)  # the user's env= (ours win on clash)
    image: str | None = None
    #: who the job runs as (its submitter, #5); None: the executor's default identity
    identity: JobIdentity | None = None
    memory: int | None = None  # bytes
    cpus: float | None = None
    #: (hub socket, token): start a warm worker that serves jobs sent through the hub
    #: instead of running this one job directory
    serve: tuple[str, str] | None = None
    #: the container will be checkpointed for a snapshot (issue #4) into this directory,
    #: which it gets mounted
    snapshot: Path | None = None
    #: the interpreter and environment to run the worker with (process executor, #11);
    #: None: the executor's default
    python_env: PythonEnv | None = None


@dataclass(slots=True)
class Handle:
    """A running job as the executor knows it."""

    job_id: int
    pid: int  # the leader; also the process group and session id for the process executor
    pid_start: int  # /proc/<pid>/stat starttime, to tell the process from a reused pid
    adopted: bool = False  # not our child: we were restarted while it ran
    container: str | None = None  # the container id, for the Podman executor


@dataclass(frozen=True, slots=True)
class Outcome:
    exit_code: int | None  # None when not knowable (an adopted process is not our child)
    signal: int | None = None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    name: str
    id: str
    size: int
    created: float
    python: str | None  # known once the image was inspected for a job


class Executor(Protocol):
    name: str

    async def start(self) -> None:
        """Get ready to run jobs (e.g. reach the container service); raise if impossible."""
        ...

    async def python_for(self, image: str | None) -> tuple[str, str]:
        """(the image jobs will use, or "" for none; the Python version they run).

        Raises ExecutorRefusal (missing image, no usable Python) before a job is queued."""
        ...

    async def images(self) -> list[ImageInfo]:
        ...

    def task_dir(self, job_dir: Path) -> str:
        """Where a warm worker of this executor sees a job directory."""
        ...

    def job_for_pid(self, pid: int, handles: Iterable[Handle]) -> int | None:
        """The job one of whose processes ``pid`` is (to tell our GPU users from others)."""
        ...

    def cleanup(self, active: set[int], pids: Collection[int] = ()) -> None:
        """At start-up: remove what jobs that are over left behind (``active``: the jobs
        that are not; ``pids``: their recorded processes, e.g. a warm container's)."""
        ...

    async def launch(self, spec: LaunchSpec) -> Handle:
        """Start the worker for a prepared job directory; return once it is running."""
        ...

    async def wait(self, handle: Handle) -> Outcome:
        """Wait until the job's leader process has exited."""
        ...

    async def stop(self, handle: Handle, grace: float) -> None:
        """TERM the whole job, wait up to ``grace`` s, then KILL whatever is left."""
        ...

    def reap(self, handle: Handle) -> None:
        """Kill anything of the job still alive (after its leader ended); never blocks."""
        ...

    def adopt(self, job: Job) -> Handle | None:
        """Find a job left running by a previous daemon; None if it is gone."""
        ...
