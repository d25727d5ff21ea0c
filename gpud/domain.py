"""The core vocabulary of gpud: jobs, their one state machine, GPU requests, GPUs, decisions.

Everything here is plain data with no I/O, so the scheduler and the tests can use it
without a daemon. The ledger changes a job's state only through :func:`transition`.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "ACTIVE",
    "FINAL",
    "RETRYABLE",
    "SUSPENDABLE_FROM",
    "TRANSITIONS",
    "ClusterHolder",
    "Decision",
    "Gpu",
    "GpuProcess",
    "GpuRequest",
    "IdleWorker",
    "IllegalTransition",
    "Job",
    "JobState",
    "PythonEnv",
    "Quota",
    "Reason",
    "Start",
    "Wait",
    "WarmKey",
    "served",
    "transition",
    "warm_key",
]


class JobState(enum.StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    #: stopped in place (SIGSTOP of its process group, #13): its GPUs are free for others,
    #: its timeout clock is stopped and no GPU time is charged until it resumes
    SUSPENDED = "suspended"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LOST = "lost"


Q, ST, R, S = JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.SUSPENDED
OK, F, C, T, L = (
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
    JobState.TIMED_OUT,
    JobState.LOST,
)

#: Every legal move. FAILED -> QUEUED and LOST -> QUEUED are the retry edges: the ledger
#: takes them in the same transaction as the failure, so a job is never seen resting in
#: FAILED or LOST while a retry is still due.
#: RUNNING <-> SUSPENDED is suspend and resume (#13). A suspended job can also end where it
#: is: cancelled, lost (its process gone at a restart), or its process ended on its own
#: (killed while stopped, or continued by its owner's own SIGCONT), recorded as it ended.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    Q: frozenset({ST, C}),
    ST: frozenset({R, F, C, T, L}),
    R: frozenset({OK, F, C, T, L, S}),
    S: frozenset({R, OK, F, C, T, L}),
    F: frozenset({Q}),
    L: frozenset({Q}),
    OK: frozenset(),
    C: frozenset(),
    T: frozenset(),
}

#: States in which a job holds (or is about to hold) resources; a suspended job holds its
#: stopped processes (and gets its GPUs back when it resumes).
ACTIVE: frozenset[JobState] = frozenset({Q, ST, R, S})
#: States a job rests in once it is over (FAILED and LOST only when no retry is left).
FINAL: frozenset[JobState] = frozenset({OK, F, C, T, L})
#: Outcomes the retry policy applies to. Timeouts and cancels are never retried: a job
#: that ran out of time would most likely run out again, and a cancel is a user's word.
RETRYABLE: frozenset[JobState] = frozenset({F, L})


#: Only a running job can be suspended (a starting one has no process to stop yet).
SUSPENDABLE_FROM: frozenset[JobState] = frozenset({R})


class IllegalTransition(ValueError):
    """A state change the state machine does not allow."""

    def __init__(self, job_id: int | None, current: JobState, new: JobState) -> None:
        who = f"job {job_id}" if job_id is not None else "job"
        super().__init__(f"{who} cannot go from {current} to {new}")
        self.job_id = job_id
        self.current = current
        self.new = new


def transition(current: JobState, new: JobState, job_id: int | None = None) -> JobState:
    """Return ``new`` if ``current -> new`` is legal, else raise :class:`IllegalTransition`."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(job_id, current, new)
    return new


# ---------------------------------------------------------------------------------------
# GPU requests

_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class GpuRequest:
    """What a job asks for: ordered fallbacks of (type, count); type ``any`` matches all.

    ``"h100"`` -> ((h100, 1),); ``"h100:2"`` -> ((h100, 2),);
    ``["h100:2", "a100:4"]`` -> two options, the first one that fits is taken.
    """

    options: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not self.options or any(n < 1 for _, n in self.options):
            raise ValueError("a GPU request needs at least one option with a count >= 1")

    @classmethod
    def parse(cls, spec: str | Sequence[str] | None) -> GpuRequest | None:
        """Parse a user's ``gpu=`` value; ``None`` (or "", "none", "cpu") means CPU-only.

        Raises ValueError with a message that says what a valid value looks like.
        """
        if spec is None:
            return None
        items: list[str]
        if isinstance(spec, str):
            s = spec.strip().lower()
            if s in ("", "none", "cpu", "false"):
                return None
            items = [p for p in (x.strip() for x in s.split(",")) if p]
        else:
            items = [str(x).strip().lower() for x in spec]
            if not items:
                return None
        options: list[tuple[str, int]] = []
        for item in items:
            name, sep, count_s = item.partition(":")
            name = name.strip()
            if not name or not _TYPE_RE.match(name):
                raise ValueError(
                    f"invalid GPU request {item!r}: use a GPU type such as 'h100', "
                    "'h100:2', 'any' or 'any:2'"
                )
            count = 1
            if sep:
                try:
                    count = int(count_s)
                except ValueError:
                    raise ValueError(
                        f"invalid GPU count in {item!r}: write TYPE:COUNT, e.g. 'h100:2'"
                    ) from None
                if count < 1:
                    raise ValueError(f"invalid GPU count in {item!r}: the count must be >= 1")
                if count > 64:
                    raise ValueError(f"invalid GPU count in {item!r}: at most 64 GPUs per job")
            options.append((name, count))
        return cls(tuple(options))

    def __str__(self) -> str:
        return " or ".join(f"{n} x {t}" for t, n in self.options)

    def to_spec(self) -> list[str]:
        """The canonical list form, which :meth:`parse` reads back."""
        return [f"{t}:{n}" for t, n in self.options]

    @property
    def max_count(self) -> int:
        return max(n for _, n in self.options)


# ---------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory: int | None = None  # bytes


@dataclass(frozen=True, slots=True)
class ClusterHolder:
    """The cluster job holding a GPU, as a cluster's scheduler reports it (Slurm, #15)."""

    job: str  # the cluster's name for it: "17", or "16_3" for task 3 of array job 16
    user: str
    #: (job id, array task + 1) for a task of an array, else (job id, 0): the (pid,
    #: pid_start) under which the Slurm executor records a job it submitted
    key: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU as the inventory saw it at one moment."""

    index: int
    uuid: str
    name: str  # the marketing name NVML reports, e.g. "NVIDIA H100 80GB HBM3"
    type: str  # the short type, e.g. "h100"
    aliases: tuple[str, ...] = ()  # other types it answers to, e.g. ("a100",) for a100-80gb
    memory_total: int = 0  # bytes
    memory_used: int = 0  # bytes
    utilization: int | None = None  # percent
    memory_utilization: int | None = None  # percent
    temperature: int | None = None  # degrees C
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    fake: bool = False
    #: pids on this GPU that gpud did not start; filled in by the service, which knows
    #: its jobs' process trees. A GPU with foreign processes is never handed out.
    foreign_pids: tuple[int, ...] = ()
    #: on a cluster's GPU: the cluster job holding it (None: free, or not known)
    cluster_holder: ClusterHolder | None = None

    def matches(self, gpu_type: str) -> bool:
        return gpu_type == "any" or gpu_type == self.type or gpu_type in self.aliases


# ---------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True, slots=True)
class PythonEnv:
    """The interpreter a process-executor job runs with (issue #11), as checked at submit:
    by default the submitter's own (their venv or conda env), else one they named, or the
    admin's (``python="daemon"``)."""

    path: str  # as the caller gave it (a venv's bin/python, not what it links to)
    prefix: str  # its sys.prefix
    kind: str  # "venv", "conda", "system" (no environment to activate) or "daemon"
    version: str  # "3.11.7"
    #: changes when packages are installed into or removed from the environment (see
    #: gpud.interpreters.fingerprint): a warm worker of another fingerprint has stale
    #: imports and is not reused
    fingerprint: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "path": self.path,
            "prefix": self.prefix,
            "kind": self.kind,
            "version": self.version,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> PythonEnv:
        return cls(
            path=data["path"],
            prefix=data["prefix"],
            kind=data["kind"],
            version=data["version"],
            fingerprint=data.get("fingerprint", ""),
        )


@dataclass(slots=True)
class Job:
    """A job as the ledger holds it (the payload bytes stay in the ledger)."""

    id: int
    function: str
    state: JobState
    submitted_at: float
    owner: str = ""
    priority: int = 0
    gpu: GpuRequest | None = None
    timeout: float = 86400.0
    retries: int = 0  # how many retries are allowed after the first attempt
    attempt: int = 0  # attempts started so far
    not_before: float = 0.0  # retry backoff: not to be started before this time
    gpus: tuple[str, ...] = ()  # UUIDs held while starting/running
    batch_id: int | None = None
    python: str = ""
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    started_at: float | None = None
    ended_at: float | None = None
    pid: int | None = None
    pid_start: int | None = None  # the process's start time (clock ticks), to spot pid reuse
    exit_code: int | None = None
    error: str | None = None
    has_result: bool = False
    code_hash: str = ""
    memory: int | None = None  # bytes, a limit (enforced by the Podman executor)
    cpus: float | None = None  # CPUs, a limit (enforced by the Podman executor)
    keep_warm: float = 0.0  # seconds its worker stays alive for the next call
    snapshot: bool = False  # start it from a container snapshot where one can be had
    start_kind: str | None = None  # how it started: "cold" or "warm"
    startup: float | None = None  # seconds from dispatch to the first line of user code
    #: accounted over its finished attempts, at 100 ms granularity (issue #5)
    wall_seconds: float = 0.0
    gpu_seconds: float = 0.0
    #: the interpreter it runs with (process executor); None: the executor's default
    python_env: PythonEnv | None = None
    #: the jobs it starts after (#14): all of them succeeded (afterok), or with
    #: ``deps_any``, all of them ended however they ended (afterany); see gpud.deps
    deps: tuple[int, ...] = ()
    deps_any: bool = False
    #: a webhook URL told when the job ends in one of ``notify_on`` (#14, gpud.notify)
    notify: str | None = None
    notify_on: tuple[str, ...] = ()
    #: may the scheduler suspend it for a higher-priority job (preempt_after, #13)
    preemptible: bool = True
    #: while SUSPENDED: when this suspension began, why ("suspended by alice", "suspended
    #: for job 812 (priority 10 > 0)") and the job it was suspended for, if any
    suspended_at: float | None = None
    suspend_reason: str | None = None
    suspended_for: int | None = None
    #: seconds this attempt spent suspended in suspensions that ended (its deadline moves
    #: by them; no GPU time is charged for them)
    suspended_s: float = 0.0
    #: #14: send ``signal`` (None: SIGUSR1) this many seconds before the timeout
    signal_before: float | None = None
    signal: str | None = None
    grace: float | None = None  # TERM-to-KILL seconds on a stop; None: the daemon's


# ---------------------------------------------------------------------------------------
# Scheduler decisions


@dataclass(frozen=True, slots=True)
class Start:
    job_id: int
    gpus: tuple[str, ...]  # UUIDs, in the order the job will see them


class Reason(Protocol):
    """Why a job waits, kept as data: formatted only when someone reads it (#12).

    A scheduling round over 100,000 queued jobs would otherwise spend most of its time
    building strings nobody looks at; one reason object is shared by every job of a
    request shape that waits for the same thing."""

    def text(self, job_id: int) -> str: ...


@dataclass(frozen=True, slots=True)
class Wait:
    job_id: int
    why: str | Reason  # a ready string, or a structured reason formatted on reading
    position: int  # 1-based place among pending jobs, in scheduling order

    @property
    def reason(self) -> str:
        return self.why if isinstance(self.why, str) else self.why.text(self.job_id)


Decision = Start | Wait


# ---------------------------------------------------------------------------------------
# Per-user limits


@dataclass(frozen=True, slots=True)
class Quota:
    """A user's limits on a shared box; None means no limit (issue #5).

    ``max_gpus`` is enforced by the scheduler (a job that would exceed it waits, saying
    so); ``max_queued`` at submit; ``max_timeout`` at submit and, should the quota be
    lowered later, by the scheduler.
    """

    max_gpus: int | None = None
    max_queued: int | None = None
    max_timeout: float | None = None


# ---------------------------------------------------------------------------------------
# Warm workers, as the scheduler sees them

#: What a warm worker can run: jobs of the same code, image, GPU request, owner and
#: environment (see :func:`warm_key`).
WarmKey = tuple[str, str, str, str, str]


def served(job: Job) -> bool:
    """Does the job run in a warm worker (fed through the hub)?"""
    return job.keep_warm > 0 or job.snapshot


def warm_key(job: Job) -> WarmKey:
    gpu = ",".join(job.gpu.to_spec()) if job.gpu else ""
    # env= and the limits are the worker's (its process, its container) for good.
    # The interpreter, and its environment's fingerprint: after a `pip install` there the
    # next call gets a fresh worker rather than one with stale imports (#11).
    py = job.python_env
    rest = json.dumps(
        [sorted(job.env.items()), job.memory, job.cpus, [py.path, py.fingerprint] if py else None]
    )
    return (job.code_hash, job.image or "", gpu, job.owner, rest)


@dataclass(frozen=True, slots=True)
class IdleWorker:
    """An idle warm worker as plain data, for the pure scheduler."""

    id: int
    key: Hashable  # its WarmKey
    gpus: tuple[str, ...]
    last_job: int  # it holds its GPUs in this job's name
    owner: str
