"""The wire models of gpud's HTTP API, shared by the daemon and the client.

msgspec Structs: request bodies forbid unknown fields, so a typo in a field name is a
422 rather than a silently ignored option. ``bytes`` fields travel as base64 in JSON.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "API_PREFIX",
    "BatchCounts",
    "BatchInfo",
    "BatchResult",
    "BatchSubmitRequest",
    "CheckpointInfo",
    "BatchSubmitResponse",
    "ErrorBody",
    "EventInfo",
    "EventList",
    "FileRef",
    "GcReport",
    "GcRequest",
    "GpuHistory",
    "GpuInfo",
    "GpuList",
    "GpuProcessInfo",
    "GpuSeries",
    "Health",
    "ImageBuildEvent",
    "ImageBuildRequest",
    "ImageInfo",
    "ImageList",
    "ImageSpec",
    "ImageStep",
    "JobEvent",
    "JobInfo",
    "JobList",
    "JobOutcome",
    "INLINE_RESULT_MAX",
    "MAX_BATCH",
    "MAX_ID",
    "MAX_SECONDS",
    "ParkedWorkerInfo",
    "QueuePage",
    "QuotaInfo",
    "StateFileInfo",
    "StateList",
    "SubmitRequest",
    "UsageLine",
    "UsageReport",
    "WhoAmI",
]

API_PREFIX = "/v1"

#: A client-made key for one submit (docs/api.md): 8 to 128 letters, digits, "-", "_",
#: "." or ":", e.g. a random UUID. A retry with the same key gets the first try's jobs.
IdempotencyKey = Annotated[
    str,
    msgspec.Meta(
        min_length=8,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="a key the client makes up for this submit (e.g. a random UUID); a retry "
        "with the same key, by the same user, within 24 h gets the jobs of the "
        "first try instead of new ones",
    ),
]

# The ranges the daemon accepts, declared once here: msgspec enforces them while it decodes
# a body, the OpenAPI document (gpud.api.openapi) is generated from them, and the daemon's
# error messages quote them. Limits that depend on the daemon's configuration (max_timeout,
# keep_warm_max, the box's CPU count) are checked by the daemon on top, and its served
# /openapi.json narrows these ranges to its own.

#: Ids are SQLite INTEGERs: 1 to 2**63 - 1.
MAX_ID = 2**63 - 1
#: Inputs in one batch (``.map``).
MAX_BATCH = 100_000
#: No duration in the API may be longer than ten years.
MAX_SECONDS = 10 * 365 * 86400.0
MAX_RETRIES = 20

Name = Annotated[str, Meta(min_length=1, max_length=512, description="display name")]
PythonVersion = Annotated[
    str, Meta(min_length=1, max_length=64, description='the caller\'s Python, e.g. "3.11.7"')
]
Timeout = Annotated[float, Meta(gt=0, le=MAX_SECONDS, description="seconds")]
Retries = Annotated[int, Meta(ge=0, le=MAX_RETRIES)]
Priority = Annotated[int, Meta(ge=-1000, le=1000, description="higher runs first")]
EnvName = Annotated[str, Meta(min_length=1, max_length=4096, pattern="^[^=\x00]+$")]
EnvValue = Annotated[str, Meta(pattern="^[^\x00]*$")]
ImageName = Annotated[str, Meta(max_length=1024)]
Memory = Annotated[int, Meta(ge=16 * 1024 * 1024, le=2**53, description="bytes")]
Cpus = Annotated[float, Meta(ge=0.01, le=4096, description="CPUs")]
KeepWarm = Annotated[float, Meta(ge=0, le=MAX_SECONDS, description="seconds")]
#: Early warning and stop grace (#14): seconds; the signal by name ("SIGUSR1", "USR2").
SignalBefore = Annotated[float, Meta(gt=0, le=MAX_SECONDS, description="seconds")]
Grace = Annotated[float, Meta(ge=0, le=MAX_SECONDS, description="seconds")]
SignalName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=16,
        pattern="^[A-Za-z0-9+-]+$",
        description="a signal name, e.g. SIGUSR1",
    ),
]
Inputs = Annotated[list[bytes], Meta(min_length=1, max_length=MAX_BATCH)]
MaxConcurrency = Annotated[
    int, Meta(ge=1, le=MAX_BATCH, description="at most this many of the batch's jobs run at once")
]
JobId = Annotated[int, Meta(ge=1, le=MAX_ID)]
After = Annotated[
    list[JobId],
    Meta(
        max_length=1000,
        description=(
            "ids of your own jobs this one starts after (#14): when all have succeeded, or "
            "with after_any when all have ended"
        ),
    ),
]
NotifyUrl = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=2048,
        description=(
            "a webhook URL POSTed to when the job ends (if the daemon's admin allows its host)"
        ),
    ),
]
NotifyState = Literal["succeeded", "failed", "cancelled", "timed_out", "lost"]

#: Results up to this size travel inline in ``/v1/jobs/run``, ``/v1/jobs/{id}/stream`` and
#: ``/v1/batches/{id}/results`` (#12); a larger one is fetched from ``/v1/jobs/{id}/result``.
INLINE_RESULT_MAX = 1 << 20


class _Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SubmitRequest(_Request):
    """One job. ``function`` is the cloudpickled function (by value), ``args`` the
    cloudpickled ``(args, kwargs)``; the daemon stores both and never unpickles them."""

    name: Name  # display name, e.g. "hello.square"
    function: bytes
    args: bytes
    python: PythonVersion  # the caller's Python, "3.11.7"; workers must match major.minor
    gpu: str | list[str] | None = None
    timeout: Timeout | None = None  # seconds; None: the daemon's default
    retries: Retries = 0
    env: dict[EnvName, EnvValue] = {}
    priority: Priority = 0
    image: ImageName | None = None
    memory: Memory | None = None  # bytes (a container limit with the Podman executor)
    cpu: Cpus | None = None  # CPUs (a container limit with the Podman executor)
    #: seconds the job's worker stays alive afterwards for the next call of the same
    #: function (None: the daemon's default; capped by its keep_warm_max)
    keep_warm: KeepWarm | None = None
    #: start from a container snapshot taken after the function's setup (Podman
    #: executor; elsewhere it runs as without)
    snapshot: bool = False
    #: may the daemon suspend it for a higher-priority job (its preempt_after, #13); a
    #: suspended job continues where it stopped, so only time is lost
    preemptible: bool = True
    #: the interpreter to run the job with (process executor, #11): the caller's own
    #: ``sys.executable`` (as the venv sees it, not resolved), another absolute path, or
    #: "daemon" for the admin's configured interpreter; None (older clients): "daemon"
    python_path: str | None = None
    #: the caller's ``sys.prefix`` when ``python_path`` is its own interpreter: the daemon
    #: then checks the path is that same environment, full version included
    python_prefix: str | None = None
    #: makes a retried submit exactly-once (docs/api.md, "Idempotent submits")
    idempotency_key: IdempotencyKey | None = None
    #: dependencies (#14): start only after these jobs of yours have succeeded (or,
    #: with ``after_any``, ended however); one that fails cancels this job
    after: After = []
    after_any: bool = False
    #: a webhook told when the job ends in one of ``notify_on`` (None: any final state)
    notify: NotifyUrl | None = None
    notify_on: list[NotifyState] | None = None
    #: send ``signal`` this many seconds before the job's timeout (#14); None: no warning
    signal_before: SignalBefore | None = None
    #: the early-warning signal's name; None: SIGUSR1
    signal: SignalName | None = None
    #: seconds between SIGTERM and SIGKILL on cancel and timeout; None: the daemon's
    #: kill_grace (capped by its max_grace)
    grace: Grace | None = None


class BatchSubmitRequest(_Request):
    """Many jobs of one function (``.map``): the function travels once, one ``args``
    payload per input. Acknowledged in one durable transaction."""

    name: Name
    function: bytes
    inputs: Inputs
    python: PythonVersion
    gpu: str | list[str] | None = None
    timeout: Timeout | None = None
    retries: Retries = 0
    env: dict[EnvName, EnvValue] = {}
    priority: Priority = 0
    image: ImageName | None = None
    memory: Memory | None = None  # bytes (a container limit with the Podman executor)
    cpu: Cpus | None = None  # CPUs (a container limit with the Podman executor)
    #: seconds the job's worker stays alive afterwards for the next call of the same
    #: function (None: the daemon's default; capped by its keep_warm_max)
    keep_warm: KeepWarm | None = None
    #: start from a container snapshot taken after the function's setup (Podman
    #: executor; elsewhere it runs as without)
    snapshot: bool = False
    #: may the daemon suspend it for a higher-priority job (its preempt_after, #13); a
    #: suspended job continues where it stopped, so only time is lost
    preemptible: bool = True
    #: the interpreter to run the job with (process executor, #11): the caller's own
    #: ``sys.executable`` (as the venv sees it, not resolved), another absolute path, or
    #: "daemon" for the admin's configured interpreter; None (older clients): "daemon"
    python_path: str | None = None
    #: the caller's ``sys.prefix`` when ``python_path`` is its own interpreter: the daemon
    #: then checks the path is that same environment, full version included
    python_prefix: str | None = None
    #: makes a retried submit exactly-once (docs/api.md, "Idempotent submits")
    idempotency_key: IdempotencyKey | None = None
    #: at most this many of the batch's jobs run at once (Slurm's ``%N``); None: no limit
    max_concurrency: MaxConcurrency | None = None
    #: dependencies (#14): start only after these jobs of yours have succeeded (or,
    #: with ``after_any``, ended however); one that fails cancels this job
    after: After = []
    after_any: bool = False
    #: a webhook told when the job ends in one of ``notify_on`` (None: any final state)
    notify: NotifyUrl | None = None
    notify_on: list[NotifyState] | None = None
    #: send ``signal`` this many seconds before the job's timeout (#14); None: no warning
    signal_before: SignalBefore | None = None
    #: the early-warning signal's name; None: SIGUSR1
    signal: SignalName | None = None
    #: seconds between SIGTERM and SIGKILL on cancel and timeout; None: the daemon's
    #: kill_grace (capped by its max_grace)
    grace: Grace | None = None


class BatchSubmitResponse(msgspec.Struct, kw_only=True):
    batch_id: int
    job_ids: list[int]


class JobInfo(msgspec.Struct, kw_only=True):
    id: int
    name: str
    state: str
    owner: str
    priority: int
    gpu: list[str] | None  # the request, canonical ("h100:2"); None for CPU-only
    gpus: list[str]  # UUIDs held now (starting/running) or last held
    gpu_indices: list[int]
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    timeout: float
    retries: int
    attempt: int
    batch_id: int | None
    exit_code: int | None
    error: str | None
    has_result: bool
    #: for a queued job: why it waits and its place in the queue
    reason: str | None = None
    position: int | None = None
    python: str = ""
    image: str | None = None
    memory: int | None = None
    cpu: float | None = None
    keep_warm: float = 0.0
    snapshot: bool = False
    #: "cold" (a new worker), "warm" (a kept one) or "restored" (from a snapshot)
    start_kind: str | None = None
    startup: float | None = None  # seconds from dispatch to the first line of user code
    #: accounted over its finished attempts, at 100 ms granularity: wall time, and GPU
    #: time (each GPU held counts, from when it was handed out until it was freed)
    wall_seconds: float = 0.0
    gpu_seconds: float = 0.0
    #: the interpreter it runs with and its environment (process executor, #11); None
    #: with the Podman executor (the image's python runs)
    python_path: str | None = None
    python_prefix: str | None = None
    #: may the scheduler suspend it for a higher-priority job (#13)
    preemptible: bool = True
    #: seconds its current attempt has spent suspended (its timeout moves by them; no GPU
    #: time is charged for them); for a suspended job, ``reason`` says why it is
    suspended_seconds: float = 0.0
    #: True for another user's job in ``/v1/queue``: its id, owner, state, GPU request,
    #: priority, timeout, times and place in the queue are shown, and the fields private to
    #: its owner (name, Python, image, limits, errors, results) are left out (#10)
    private: bool = False
    #: the jobs it starts after (#14), and whether any end of theirs will do
    after: list[int] = []
    after_any: bool = False
    #: the early warning (#14): seconds before the timeout, and the signal's name
    signal_before: float | None = None
    signal: str | None = None
    #: seconds between SIGTERM and SIGKILL when it is stopped
    grace: float | None = None


class ParkedWorkerInfo(msgspec.Struct, kw_only=True):
    """An idle warm worker whose GPU state is parked in host memory (#13): its process
    lives on, its GPUs are free, and the next call of its function unparks it."""

    worker_id: int
    job_id: int  # the last job it ran
    function: str  # that job's function name
    owner: str
    gpus: list[int]  # the indices of the GPUs it was parked from
    bytes: int  # GPU state held in host memory (the driver's estimate)
    parked_at: float


class JobList(msgspec.Struct, kw_only=True):
    jobs: list[JobInfo]
    #: pass as ``cursor`` to get the next (older) page; None when there is none
    next_cursor: int | None
    #: the caller's parked warm workers (an admin's: everyone's), #13
    parked: list[ParkedWorkerInfo] = []


class GpuProcessInfo(msgspec.Struct, kw_only=True):
    pid: int
    used_memory: int | None
    job_id: int | None  # the gpud job it belongs to, None for a foreign process


class GpuInfo(msgspec.Struct, kw_only=True):
    index: int
    uuid: str
    name: str
    type: str
    aliases: list[str]
    memory_total: int
    memory_used: int
    utilization: int | None
    memory_utilization: int | None
    temperature: int | None
    power_w: float | None
    power_limit_w: float | None
    processes: list[GpuProcessInfo]
    fake: bool
    busy_foreign: bool  # processes gpud did not start are on it: not handed out
    job_id: int | None  # the gpud job holding it
    owner: str | None
    #: a cluster's GPU (Slurm, #15): the cluster job holding it ("17", "16_3" for an array
    #: task) and its user, as the cluster says; a gpud job's also has job_id and owner
    cluster_job: str | None = None
    cluster_user: str | None = None


class CheckpointInfo(msgspec.Struct, kw_only=True):
    """GPU checkpointing (#13): can a process's GPU state be parked in host memory here?"""

    available: bool
    kind: str  # "cuda" (the driver's API), "fake" (fake GPUs: nothing moves) or "none"
    reason: str  # what works, or why not and what to do
    driver_version: str | None = None  # the display driver's, e.g. "580.159.04"
    cuda_version: str | None = None  # the CUDA version the driver implements, e.g. "13.0"
    remap: bool = False  # restore onto another GPU of the same type


class GpuList(msgspec.Struct, kw_only=True):
    gpus: list[GpuInfo]
    source: str  # "nvml", "fake" or "none"
    note: str | None = None
    checkpoint: CheckpointInfo | None = None  # None from daemons older than #13
    #: idle warm workers parked in host memory (#13), and the budget they share
    parked: list[ParkedWorkerInfo] = []
    park_max_bytes: int | None = None


class ImageInfo(msgspec.Struct, kw_only=True):
    name: str
    id: str
    size: int
    created: float
    python: str | None  # the image's Python, once gpud has inspected it
    #: built by gpud from a gpud.Image (#11): its definition's sha256, who built it first,
    #: and when a job or build last used it (garbage collection goes by that)
    definition: str | None = None
    creator: str | None = None
    last_used: float | None = None


class SnapshotInfo(msgspec.Struct, kw_only=True):
    """A container snapshot of one function (issue #4)."""

    id: int
    function: str
    owner: str
    image: str  # the image the function runs in
    #: taking | ready | retry (the next cold start takes it again) | failed (not used)
    state: str
    size: int  # bytes of its checkpoint image
    created_at: float
    last_used: float | None
    restores: int
    failures: int  # in a row, takes and restores alike
    last_error: str | None
    taken_by: int | None  # the job whose container was checkpointed


class SnapshotList(msgspec.Struct, kw_only=True):
    snapshots: list[SnapshotInfo]
    executor: str
    max_bytes: int  # snapshot_max_bytes: checkpoint images together take at most this
    used_bytes: int
    note: str | None = None


class ImageList(msgspec.Struct, kw_only=True):
    images: list[ImageInfo]
    executor: str
    default: str | None  # the image a job without image= runs in
    note: str | None = None
    #: image_max_bytes: gpud-built images together take at most this (0: not Podman)
    max_bytes: int = 0


class FileRef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A local file an image definition carries, by content (#11)."""

    path: str  # relative, with "/"
    sha256: str
    executable: bool = False


class ImageStep(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One step of an image definition. ``op``: pip (``packages``, wheels in ``files``,
    ``index``), requirements (``file``), run (``command``), env (``name``, ``value``),
    copy (``files`` to ``dest``)."""

    op: str
    packages: list[str] = []
    file: str | None = None  # sha256 of a requirements file
    files: list[FileRef] | None = None
    index: bool = True  # pip may use the package index (else only the given files)
    command: str | None = None
    name: str | None = None
    value: str | None = None
    dest: str | None = None


class ImageSpec(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A canonical image definition: its sha256 names the image (#11)."""

    v: int = 1
    base: str = ""  # an image in the Podman store; "" with containerfile, or the default
    containerfile: str | None = None  # sha256 of the Containerfile's text
    context: list[FileRef] = []  # the Containerfile's build context
    steps: list[ImageStep] = []


class ImageBuildRequest(_Request):
    """``POST /v1/images/build``: build (or find) the image of a definition. ``files``
    may be left empty at first: the daemon answers ``missing_files`` (409) when it must
    build and lacks them."""

    spec: ImageSpec
    files: dict[str, bytes] = {}
    python: str | None = None  # the caller's Python, checked against the image's


class ImageBuildEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of the build stream (NDJSON): ``log`` lines, then ``done`` or ``error``."""

    kind: str  # log | done | error
    line: str | None = None
    name: str | None = None  # done: the image to run in
    key: str | None = None  # done: the definition's hash
    cached: bool = False  # done: built before, nothing was built now
    python: str | None = None  # done: the image's Python
    detail: str | None = None  # error: what went wrong and what to do
    tail: list[str] = []  # error: the last lines of the build log


class GpuSeries(msgspec.Struct, kw_only=True):
    """One GPU's recent readings, oldest first, as three columns of equal length."""

    index: int
    uuid: str
    memory_total: int
    at: list[float]
    utilization: list[int | None]
    memory_used: list[int]


class GpuHistory(msgspec.Struct, kw_only=True):
    interval: float  # seconds between readings (the daemon's gpu_poll_interval)
    window: float  # seconds of history the daemon keeps
    gpus: list[GpuSeries]


class EventInfo(msgspec.Struct, kw_only=True):
    """One entry of the ledger's append-only event log: a job's move between states."""

    id: int
    job_id: int
    at: float
    from_state: str | None  # None for the submit
    to_state: str
    reason: str | None


class EventList(msgspec.Struct, kw_only=True):
    events: list[EventInfo]
    #: pass as ``after`` to get the events that follow (the last id here, else ``after``)
    cursor: int
    #: the newest event id in the ledger; below ``after`` when the ledger was replaced
    latest: int


class QueuePage(msgspec.Struct, kw_only=True):
    """Queued jobs in scheduling order (position 1 first)."""

    jobs: list[JobInfo]
    total: int  # queued jobs in all
    offset: int


class JobOutcome(msgspec.Struct, kw_only=True):
    """How a finished job's function ended, from the worker's plain-JSON status (never
    from the pickle): its exception's type, message and remote traceback if it raised."""

    job_id: int
    state: str
    ok: bool
    type: str | None
    message: str | None
    traceback: str | None
    python: str


class Health(msgspec.Struct, kw_only=True):
    status: str
    version: str
    executor: str
    worker_python: str
    gpu_source: str
    pid: int
    started_at: float
    #: seconds a `gpud shell` session may sit with no client and no input (#14)
    shell_idle_timeout: float | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str  # a short machine-readable code, e.g. "not_found"
    detail: str  # people-talk: what went wrong and what to do


class QuotaInfo(msgspec.Struct, kw_only=True):
    """A user's limits; null means no limit."""

    max_gpus: int | None = None
    max_queued: int | None = None
    max_timeout: float | None = None  # seconds


class WhoAmI(msgspec.Struct, kw_only=True):
    """Who the daemon takes the caller to be (``GET /v1/whoami``)."""

    name: str
    admin: bool
    #: "peer" (the Unix socket's peer credentials), "token", or "owner" (a daemon run by
    #: a user, whose 0600 socket only that user can reach)
    via: str
    uid: int | None
    quota: QuotaInfo
    #: the Unix user this daemon runs the caller's jobs as
    runs_as: str | None = None


class UsageLine(msgspec.Struct, kw_only=True):
    key: str  # a user, a day (YYYY-MM-DD, the daemon's local time) or a GPU type
    jobs: int
    attempts: int
    gpu_seconds: float  # 100 ms granularity
    wall_seconds: float


class UsageReport(msgspec.Struct, kw_only=True):
    """GPU-seconds and wall time of the attempts that overlap [since, until)."""

    since: float
    until: float
    by: str  # "user", "day" or "gpu-type"
    user: str | None  # only this user's jobs, when set
    lines: list[UsageLine]
    total: UsageLine


class JobEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of the NDJSON stream of ``POST /v1/jobs/run`` and ``GET
    /v1/jobs/{id}/stream`` (#12): ``job`` first (the job as submitted), then ``log``
    chunks of its combined output, then ``end`` once it is final, with its result inline
    when it has one of at most :data:`INLINE_RESULT_MAX` bytes (the worker's pickle,
    passed through as bytes: the daemon never unpickles it)."""

    kind: str  # job | log | end
    job: JobInfo | None = None  # job, end
    data: bytes = b""  # log: raw bytes of the job's output (base64 in JSON)
    result: bytes | None = None  # end: the result pickle, when inline
    result_size: int = 0  # end: its size in bytes (0: none); > 0 with result null: fetch it


class BatchResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of ``GET /v1/batches/{id}/results`` (NDJSON): a finished job of the batch,
    by its input index, with its result inline as in :class:`JobEvent`."""

    index: int  # the input's place in the batch, from 0
    job: JobInfo
    result: bytes | None = None
    result_size: int = 0


class BatchCounts(msgspec.Struct, kw_only=True):
    """How many of a batch's jobs are in each state."""

    queued: int = 0
    starting: int = 0
    running: int = 0
    suspended: int = 0  # #13
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    lost: int = 0


class BatchInfo(msgspec.Struct, kw_only=True):
    """A batch (one ``.map``): its size, owner, limit and progress (#12)."""

    id: int
    owner: str
    name: str
    size: int
    submitted_at: float
    max_concurrency: int | None
    counts: BatchCounts
    done: int  # jobs that are final
    #: the jobs' ids in input order, with ``?jobs=true``
    job_ids: list[int] | None = None


class GcRequest(_Request):
    """``POST /v1/admin/gc``: apply the daemon's retention settings now."""

    dry_run: bool = False  # only say what would be removed


class GcReport(msgspec.Struct, kw_only=True):
    """What a collection removed (or, dry, would remove), under which settings (#12)."""

    dry_run: bool
    #: the settings applied, in seconds and bytes; null: that kind is kept
    retention_job_dirs: float | None
    retention_jobs: float | None
    retention_max_bytes: int | None
    job_dirs: int  # finished jobs' directories removed
    job_dir_bytes: int  # disk space they took (allocated blocks, as du counts)
    over_cap_dirs: int  # of those, removed to get under retention_max_bytes
    jobs_dir_bytes: int | None  # what the jobs directory holds after (measured with a cap)
    jobs: int  # jobs whose records were removed, their usage rolled up
    attempts: int
    events: int
    payloads: int  # function payloads no remaining job refers to
    ledger_bytes: int  # the ledger's used pages after (freed pages are reused by new jobs)
    seconds: float
    errors: list[str]  # what could not be removed (logged too); gc carries on past them


class StateFileInfo(msgspec.Struct, kw_only=True):
    """One file in a job's state directory (#14)."""

    path: str  # relative to the state directory, "/"-separated
    size: int
    mtime: float


class StateList(msgspec.Struct, kw_only=True):
    """``GET /v1/jobs/{id}/state``: the files a job saved in its state directory."""

    job_id: int
    files: list[StateFileInfo]
    total_bytes: int
    #: the listing stopped at 10,000 files
    truncated: bool = False
