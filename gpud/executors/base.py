"""The executor contract: how the daemon starts, watches, stops and re-adopts a job.

The service owns scheduling, the ledger and timeouts; an executor only knows how to run
the worker runtime for one prepared job directory somewhere (a process, a container)
and how to make it stop. Outcomes are read from the job directory by the service.

What an executor can do beyond that is declared, not guessed (#12): :class:`Executor` is
what every one has; :class:`WarmCapable` ones keep a worker between calls, and
:class:`CheckpointCapable` ones can snapshot and restore it; :class:`ImageBuildCapable`
ones build gpud.Image definitions; :class:`InterpreterCapable` ones run each job with an
interpreter of its own. :func:`capabilities` checks an executor against them
once, when the daemon is built, and fails there (not in the middle of a job) when a class
declares a capability it does not implement. tests/test_executor_contract.py holds every
executor, gpud.testing.FakeExecutor included, to the behaviour the daemon relies on.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from gpud.domain import Job, PythonEnv
from gpud.identity import JobIdentity

__all__ = [
    "ArrayCapable",
    "Caps",
    "CheckpointCapable",
    "Executor",
    "ImageBuildCapable",
    "InterpreterCapable",
    "WarmCapable",
    "capabilities",
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
    #: the job's timeout in seconds (the Slurm executor's --time backstop, #15)
    timeout: float | None = None


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
    #: the kernel's OOM killer ended it at its memory limit (a container's OOMKilled, #16)
    oom_killed: bool = False
    memory_limit: int | None = None  # that limit, in bytes, where known
    #: the job was lost through no fault of its own, and why ("NODE_FAIL" from Slurm, #15):
    #: without a result it ends LOST, and is retried by its policy
    lost: str | None = None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    name: str
    id: str
    size: int
    created: float
    python: str | None  # known once the image was inspected for a job


@runtime_checkable
class Executor(Protocol):
    """What the daemon needs of every executor."""

    name: str

    async def start(self) -> None:
        """Get ready to run jobs (e.g. reach the container service); raise if impossible."""
        ...

    async def python_for(self, image: str | None) -> tuple[str, str]:
        """(the image jobs will use, or "" for none; the Python version they run).

        Raises ExecutorRefusal (missing image, no usable Python) before a job is queued."""
        ...

    async def images(self) -> list[ImageInfo]: ...

    def task_dir(self, job_dir: Path) -> str:
        """Where a worker of this executor sees a job directory (a warm worker is told
        each of its jobs by it)."""
        ...

    def job_for_pid(self, pid: int, handles: Iterable[Handle]) -> int | None:
        """The job one of whose processes ``pid`` is (to tell our GPU users from others)."""
        ...

    def cleanup(self, active: set[int], pids: Collection[int] = ()) -> None:
        """At start-up: remove what jobs that are over left behind (``active``: the jobs
        that are not; ``pids``: their recorded processes, e.g. a warm container's)."""
        ...

    async def launch(self, spec: LaunchSpec) -> Handle:
        """Start the worker for a prepared job directory; return once it is running.
        Raises if it cannot (the job then fails, saying why)."""
        ...

    async def wait(self, handle: Handle) -> Outcome:
        """Wait until the job's leader process has exited: its exit code, or the signal
        that ended it (a container reports that as exit code 128 + N); exit_code None
        where it cannot be known (an adopted process is not our child). Cancellable."""
        ...

    async def stop(self, handle: Handle, grace: float) -> bool | None:
        """TERM the whole job, wait up to ``grace`` s, then KILL whatever is left.
        True if it took the KILL, False if it ended on the TERM, None if not known."""
        ...

    def reap(self, handle: Handle) -> None:
        """Kill anything of the job still alive (after its leader ended); never blocks."""
        ...

    def adopt(self, job: Job) -> Handle | None:
        """Find a job left running by a previous daemon (this object may be new: nothing
        but the ledger's record and the machine is known); None if it is gone."""
        ...


@runtime_checkable
class WarmCapable(Executor, Protocol):
    """Keeps a worker between calls (keep_warm): :meth:`Executor.launch` of a spec with
    ``serve`` set starts a worker that takes job after job through the daemon's hub, and
    :meth:`Executor.task_dir` says where that worker sees each job's directory. Nothing
    in the shape of the class shows that it honours ``serve``: the class declares it."""

    supports_warm: ClassVar[bool]


@runtime_checkable
class ArrayCapable(Executor, Protocol):
    """Submits a batch's jobs started in one round as one unit (a Slurm job array, #15) and
    enforces the batch's max_concurrency itself (Slurm's ``%N``): the round tells it which
    jobs it starts (:meth:`expect`) before their launches, and does not hold a batch's
    jobs back for its limit. :meth:`until_started` returns once the job really runs (its
    timeout counts from then)."""

    supports_arrays: ClassVar[bool]

    def expect(self, jobs: dict[int, tuple[int, int | None]]) -> None: ...

    async def until_started(self, handle: Handle) -> bool: ...


@runtime_checkable
class CheckpointCapable(WarmCapable, Protocol):
    """Checkpoints an idle warm worker and restores new ones from it (snapshot=True, #4)."""

    supports_snapshots: ClassVar[bool]
    #: the image a job without image= runs in (part of a snapshot's key)
    default_image: str
    #: where a worker sees the hub's directory (snapshot hand-over files go there)
    hub_mount: str

    async def image_id(self, name: str) -> str:
        """The image's id (content digest), for snapshot keys."""
        ...

    async def checkpoint(self, handle: Handle, dest: Path) -> int:
        """Checkpoint the running worker into ``dest``; it runs on. Its size in bytes."""
        ...

    async def restore(
        self, location: Path, job_id: int, attempt: int, hang_limit: float = 30.0
    ) -> Handle:
        """A new worker for this job, restored from a checkpoint directory."""
        ...


@runtime_checkable
class ImageBuildCapable(Executor, Protocol):
    """Builds gpud.Image definitions into its image store (#11): gpud.images.ImageBuilder
    drives the store through ``client`` and ``podman --remote --url``."""

    supports_image_builds: ClassVar[bool]
    url: str
    default_image: str

    @property
    def client(self) -> Any:
        """The image store's (synchronous) client."""
        ...


@runtime_checkable
class InterpreterCapable(Executor, Protocol):
    """Runs each job with an interpreter of its own, checked as the job's user at submit
    (the caller's venv or conda environment, #11), where a container's image decides it
    for the others."""

    supports_job_python: ClassVar[bool]

    async def resolve_python(
        self,
        requested: str | None,
        *,
        version: str,
        prefix: str | None,
        ident: JobIdentity,
        owner: str,
    ) -> PythonEnv:
        """The interpreter a job of ``owner`` (run as ``ident``) asking for ``requested``
        runs with ("daemon" or None: the admin's); ExecutorRefusal if none."""
        ...


@dataclass(frozen=True, slots=True)
class Caps:
    """What one executor can do, found once (:func:`capabilities`)."""

    warm: bool = False
    snapshots: bool = False
    image_builds: bool = False
    job_python: bool = False
    arrays: bool = False
    #: ``reap`` is a signal (no I/O to wait on): the daemon calls it, and reads the
    #: job's outcome after it, on its event loop rather than in a thread (#12)
    quick_reap: bool = False


#: declaration -> the Protocol whose members it promises
_DECLARED = (
    ("supports_warm", WarmCapable),
    ("supports_snapshots", CheckpointCapable),
    ("supports_image_builds", ImageBuildCapable),
    ("supports_job_python", InterpreterCapable),
    ("supports_arrays", ArrayCapable),
)


def capabilities(executor: object) -> Caps:
    """What ``executor`` can do: each capability its class declares (``supports_warm =
    True`` and so on), checked against the Protocol that says what it takes. Raises
    TypeError, naming what is missing, for an executor that is not one at all or that
    declares a capability without its methods: a daemon must not start on a promise
    that would break at a job's first use of it."""
    missing = _missing(executor, Executor)
    if missing:
        raise TypeError(
            f"{type(executor).__name__} is not an executor: it lacks " + ", ".join(missing)
        )
    found: dict[str, bool] = {}
    for flag, proto in _DECLARED:
        declared = getattr(type(executor), flag, False)
        if declared is not True and declared is not False:
            raise TypeError(
                f"{type(executor).__name__}.{flag} must be True or False, not {declared!r}"
            )
        if declared:
            missing = _missing(executor, proto)
            if missing:
                raise TypeError(
                    f"{type(executor).__name__} declares {flag} but lacks " + ", ".join(missing)
                )
        found[flag] = declared
    quick_reap = getattr(type(executor), "reap_is_a_signal", False)
    if quick_reap is not True and quick_reap is not False:
        raise TypeError(
            f"{type(executor).__name__}.reap_is_a_signal must be True or False, not {quick_reap!r}"
        )
    if found["supports_snapshots"] and not found["supports_warm"]:
        # A snapshot is of a warm worker: there is nothing to checkpoint without one.
        raise TypeError(
            f"{type(executor).__name__} declares supports_snapshots but not supports_warm"
        )
    return Caps(
        warm=found["supports_warm"],
        snapshots=found["supports_snapshots"],
        image_builds=found["supports_image_builds"],
        job_python=found["supports_job_python"],
        arrays=found["supports_arrays"],
        quick_reap=quick_reap,
    )


def _missing(obj: object, proto: type) -> list[str]:
    """The members of ``proto`` (and the Protocols it extends) ``obj`` does not have."""
    names: set[str] = set()
    for klass in proto.__mro__:
        if klass is object or klass is Protocol or not getattr(klass, "_is_protocol", False):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
        names |= set(getattr(klass, "__annotations__", {}))
    return sorted(n for n in names if not hasattr(obj, n))
