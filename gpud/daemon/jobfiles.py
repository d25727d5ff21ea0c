"""A job's directory: laid out before each attempt, read (never unpickled) after it."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from gpud import longrun, statedir
from gpud.daemon.depfiles import link_results
from gpud.daemon.record import Finished
from gpud.domain import (
    Gpu,
    Job,
    JobState,
)
from gpud.executors.base import LaunchSpec, Outcome
from gpud.executors.process import JobIdentity
from gpud.safefs import open_append, read_file, write_new
from gpud.storage import RESERVE_BYTES, free_bytes
from gpud_client.jobdir import (
    EXIT_SETUP,
    RESULT_FILE,
    STARTED_FILE,
    STATUS_FILE,
    WorkerStatus,
    job_files,
    read_status,
)

log = logging.getLogger("gpud")


def prepare_job_dir(
    jobs_dir: Path,
    job: Job,
    function: bytes,
    args: bytes,
    ident: JobIdentity,
    gpus: Sequence[Gpu],
    *,
    payload_files: bool = True,
    stored: Mapping[int, bytes] | None = None,
) -> LaunchSpec:
    """Lay out jobs/<id>/ for this attempt: payload in, log and result out. The
    directory and its files belong to the user the job runs as, mode 0700/0600.
    Without ``payload_files`` (a warm worker gets the payload over the hub, #12) the
    function, arguments and job.json are not written."""
    d = jobs_dir / str(job.id)
    d.mkdir(mode=0o700, exist_ok=True)
    owner = (ident.uid, ident.gid)
    statedir.ensure(d, owner)  # kept across attempts (#14)
    for stale in (RESULT_FILE, STATUS_FILE, STARTED_FILE):
        (d / stale).unlink(missing_ok=True)
    if payload_files:
        files = job_files(
            job_id=job.id,
            name=job.function,
            python=job.python,
            function=function,
            args=args,
            attempt=job.attempt,
        )
        for name, data in files.items():
            write_new(d / name, data, owner)
    link_results(jobs_dir, d, job.deps, owner, stored)  # for gpud.result_of (#14)
    log_path = d / "output.log"
    fd = open_append(log_path, owner)
    try:
        if job.attempt > 1:
            os.write(fd, f"[gpud] attempt {job.attempt} of {job.retries + 1}\n".encode())
    finally:
        os.close(fd)
    if os.geteuid() == 0:
        os.chown(d, *owner, follow_symlinks=False)
    os.chmod(d, 0o700, follow_symlinks=False)
    index = {g.uuid: g.index for g in gpus}
    return LaunchSpec(
        job_id=job.id,
        attempt=job.attempt,
        job_dir=d,
        log_path=log_path,
        gpus=job.gpus,
        gpu_indices=tuple(index[u] for u in job.gpus if u in index),
        env={**job.env, **longrun.job_env(job, str(d / statedir.NAME))},
        image=job.image,
        identity=ident,
        memory=job.memory,
        cpus=job.cpus,
        python_env=job.python_env,
        timeout=job.timeout,
    )


def collect(jobs_dir: Path, data_dir: Path, job: Job, outcome: Outcome) -> Finished:
    """Read what the worker left (status.json, never the pickle) into an outcome."""
    d = jobs_dir / str(job.id)
    has_result = is_regular(d / RESULT_FILE)
    status = worker_status(jobs_dir, job.id)
    if status is not None and status.attempt is not None and status.attempt != job.attempt:
        status = None  # an earlier attempt's (stale files are removed at launch)
    return judge(data_dir, status, has_result, outcome)


def reap_and_collect(
    reap: Callable[[], None], jobs_dir: Path, data_dir: Path, job: Job, outcome: Outcome
) -> tuple[Finished, float | None]:
    """After a cold job's process ended: kill what it left (``reap``), read its outcome
    and when the user's code began. One trip to a worker thread where there were three,
    on the way from the process's exit to the caller's answer (#12)."""
    reap()
    return collect(jobs_dir, data_dir, job, outcome), user_start(jobs_dir, job.id)


def judge(
    data_dir: Path, status: WorkerStatus | None, has_result: bool, outcome: Outcome
) -> Finished:
    """How an attempt ended, from the worker's status (read from status.json, or sent
    inline by a warm worker once it had written and synced its result) and exit."""
    code = outcome.exit_code
    if status is not None and status.ok and has_result:
        return Finished(JobState.SUCCEEDED, None, code, True, False)
    if status is not None and not status.ok:
        msg = f"{(status.type or 'Error').rsplit('.', 1)[-1]}: {status.message or ''}".strip()
        setup = code == EXIT_SETUP
        return Finished(JobState.FAILED, msg, code, has_result, not setup)
    if outcome.lost is not None:
        return Finished(JobState.LOST, f"lost: {outcome.lost}", code, False, True)
    if outcome.oom_killed:
        why = "out of memory" + (
            f" (limit {_size(outcome.memory_limit)})" if outcome.memory_limit else ""
        )
        why += ": the kernel killed the job at its memory limit; ask for more with memory="
    elif outcome.signal is not None:
        hint = " (out of memory?)" if outcome.signal == 9 else ""
        why = (
            f"the job's process was killed by signal {outcome.signal}{hint} before it "
            "wrote a result"
        )
    elif code in (126, 127):
        # setpriv (a root daemon's user switch, #12) could not exec the interpreter: its
        # message is the first line of the job's log.
        why = f"the job's interpreter could not be started (exit code {code}); its log says why"
    elif code is not None:
        why = f"the job's process exited with code {code} without writing a result"
    else:
        why = "the job's process ended without writing a result"
    if low_space(data_dir):
        why += f" (the disk holding {data_dir} was full)"
    return Finished(JobState.FAILED, why, code, False, True)


def _size(n: int) -> str:
    """Bytes as the memory= a user wrote, in Podman's units: 67108864 -> "64m"."""
    for unit, mult in (("t", 1024**4), ("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}b" if n < 1024 else f"{n / 1024**2:.1f}m"


def user_start(jobs_dir: Path, job_id: int) -> float | None:
    """When the worker began the user's code (it writes the time down), if it did."""
    raw = read_file(jobs_dir / str(job_id) / STARTED_FILE, 64)
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def worker_status(jobs_dir: Path, job_id: int) -> WorkerStatus | None:
    """The worker's status.json (plain JSON, never a pickle); None if absent or not
    the worker's (a job could write anything there)."""
    try:
        return read_status(jobs_dir / str(job_id))
    except (OSError, ValueError):
        return None


def low_space(data_dir: Path) -> bool:
    try:
        return free_bytes(data_dir) < RESERVE_BYTES
    except OSError:
        return False


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
