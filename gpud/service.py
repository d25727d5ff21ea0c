"""The trio shell around the pure core: load state -> decide -> apply, and supervise jobs.

One :class:`Daemon` per data directory (a file lock makes sure of it). The ledger is the
truth; ``Daemon.active`` is a cache of its queued/starting/running jobs, changed only
after the ledger committed the change. Every job that starts gets a supervisor task in
the daemon's nursery, whose cancel scope carries the job's deadline; cancelling that
scope is how cancel and timeout reach a running job.

When the daemon stops, running jobs are left running (their processes are in their own
sessions and write their own logs), and the next daemon re-adopts them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import logging
import os
import secrets
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from gpud.config import Config
from gpud.domain import (
    FINAL,
    RETRYABLE,
    Gpu,
    GpuRequest,
    IllegalTransition,
    Job,
    JobState,
    Start,
    Wait,
)
from gpud.executors.base import Executor, Handle, LaunchSpec, Outcome
from gpud.executors.process import JobIdentity, proc_session
from gpud.fairshare import DecayedTotals, Policy, interval_usage
from gpud.gpus import GpuInventory
from gpud.ledger import LedgerThread, NewJob, Step
from gpud.ledger.store import Ledger
from gpud.ledger.usage import finished_gpu_intervals
from gpud.safefs import open_append, write_new
from gpud.scheduler import decide, infeasible
from gpud.users import Directory, run_as
from gpud_client.jobdir import (
    EXIT_SETUP,
    RESULT_FILE,
    STATUS_FILE,
    WorkerStatus,
    job_files,
    read_status,
)

__all__ = ["AlreadyRunning", "Daemon", "SubmitError"]

log = logging.getLogger("gpud")



class SubmitError(ValueError):
    """A submit the daemon refuses; the message says why and what to do."""


class AlreadyRunning(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Finished:
    state: JobState
    error: str | None
    exit_code: int | None
    has_result: bool
    retryable: bool


def _fmt_seconds(s: float) -> str:
    if s >= 3600 and s % 3600 == 0:
        return f"{int(s // 3600)} h"
    if s >= 60 and s % 60 == 0:
        return f"{int(s // 60)} min"
    return f"{s:g} s"


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        ledger: LedgerThread,
        inventory: GpuInventory,
        executor: Executor,
        identity: JobIdentity,
        worker_python: str,
        instance: str,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.inventory = inventory
        self.executor = executor
        self.identity = identity
        self.worker_python = worker_python
        self.instance = instance
        self.started_at = time.time()
        self.active: dict[int, Job] = {}
        self.waits: dict[int, Wait] = {}
        self.gpus: list[Gpu] = []
        self.handles: dict[int, Handle] = {}
        self._scopes: dict[int, trio.CancelScope] = {}
        self._stop_reason: dict[int, JobState] = {}
        self._changed: dict[int, trio.Event] = {}
        self._seq: dict[int, int] = {}  # commit order of each job's latest advance
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.kill_jobs_on_exit = False
        # Shared box (#5): the users table, the fair-share policy and decayed usage.
        self.users = Directory(ledger, on_change=self._reschedule)
        self.policy = Policy(half_life=config.fairshare_half_life,
                             fairshare_weight=config.fairshare_weight,
                             age_weight=config.age_weight, max_age=config.max_age)
        self.usage = DecayedTotals(config.fairshare_half_life, now=time.time())

    # -- public operations (called by the API) ------------------------------------------

    def check_submittable(self, gpu: GpuRequest | None, python: str, timeout: float) -> None:
        mine = self.worker_python.rsplit(".", 1)[0]
        theirs = python.rsplit(".", 1)[0] if python.count(".") >= 2 else python
        if theirs != mine:
            raise SubmitError(
                f"this job was pickled by Python {python}, but this daemon's workers run "
                f"Python {self.worker_python}: submit from Python {mine}, or have the admin "
                f"set `python` in the daemon's config to a Python {theirs} interpreter"
            )
        why = infeasible(gpu, self.gpus)
        if why is not None:
            raise SubmitError(why)
        if timeout > self.config.max_timeout:
            raise SubmitError(
                f"timeout {_fmt_seconds(timeout)} is longer than this daemon's max_timeout "
                f"({_fmt_seconds(self.config.max_timeout)}): ask for less"
            )
        if timeout <= 0:
            raise SubmitError("timeout must be positive")

    async def submit(
        self, jobs: Sequence[NewJob], function: bytes, *, batch: bool = False
    ) -> tuple[int | None, list[Job]]:
        now = time.time()
        batch_id, ids = await self.ledger.call(Ledger.submit, jobs, function, now, batch=batch)
        # Durable now: only after the COMMIT do they exist for anyone else.
        made = await self.ledger.call(_get_many, ids)
        for j in made:
            self.active[j.id] = j
        self._reschedule()
        return batch_id, made

    async def get(self, job_id: int) -> Job:
        job = self.active.get(job_id)
        if job is not None:
            return job
        return await self.ledger.call(Ledger.get, job_id)

    async def cancel(self, job_id: int) -> Job:
        job = await self.get(job_id)
        if job.state in FINAL:
            return job
        if job.state is JobState.QUEUED:
            try:
                return await self._advance(job_id, Step(JobState.CANCELLED, "cancelled"),
                                           expect=JobState.QUEUED)
            except IllegalTransition:
                pass  # it started in the meantime: stop it instead
        self._stop_reason[job_id] = JobState.CANCELLED
        scope = self._scopes.get(job_id)
        if scope is not None:
            scope.cancel()
        return await self.wait_final(job_id, self.config.kill_grace + 15)

    async def wait_final(self, job_id: int, within: float) -> Job:
        deadline = trio.current_time() + within
        while True:
            job = await self.get(job_id)
            if job.state in FINAL:
                return job
            ev = self._changed.setdefault(job_id, trio.Event())
            with trio.move_on_at(deadline) as cs:
                await ev.wait()
            if cs.cancelled_caught:
                return await self.get(job_id)

    def log_path(self, job_id: int) -> Path:
        return self.config.jobs_dir / str(job_id) / "output.log"

    def result_path(self, job_id: int) -> Path:
        return self.config.jobs_dir / str(job_id) / RESULT_FILE

    def reason(self, job_id: int) -> tuple[str | None, int | None]:
        w = self.waits.get(job_id)
        if w is None:
            return None, None
        return w.reason, w.position

    def gpu_holders(self) -> dict[str, Job]:
        return {u: j for j in self.active.values() if j.state is not JobState.QUEUED
                for u in j.gpus}

    # -- the loops ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._refresh_gpus()
                await self.users.refresh()
                await self._load_usage()
                await self._recover()
                nursery.start_soon(self.users.run)
                nursery.start_soon(self._gpu_loop)
                nursery.start_soon(self._schedule_loop)
                task_status.started()
                await trio.sleep_forever()
            finally:
                if self.kill_jobs_on_exit:
                    for h in list(self.handles.values()):
                        self.executor.reap(h)

    def _reschedule(self) -> None:
        self._wake.set()

    async def _schedule_loop(self) -> None:
        while True:
            self._wake = trio.Event()
            try:
                next_due = await self._schedule_once()
            except Exception:  # noqa: BLE001 - a bug in one round must not stop the daemon
                log.exception("a scheduling round failed; retrying in 1 s")
                next_due = time.time() + 1.0
            if next_due is None:
                await self._wake.wait()
            else:
                with trio.move_on_after(max(0.0, next_due - time.time())):
                    await self._wake.wait()

    async def _schedule_once(self) -> float | None:
        """One round of decide -> apply. Returns when a backoff next expires, if any."""
        now = time.time()
        pending = [j for j in self.active.values() if j.state is JobState.QUEUED]
        running = [j for j in self.active.values() if j.state is not JobState.QUEUED]
        decisions = decide(pending, running, self.gpus, cpu_slots=self.config.cpu_slots, now=now,
                           usage=self._usage_now(running, now), policy=self.policy,
                           quotas=self.users.quotas())
        waits: dict[int, Wait] = {}
        for d in decisions:
            if isinstance(d, Start):
                await self._start(d)
            else:
                waits[d.job_id] = d
        self.waits = waits
        backoffs = [j.not_before for j in pending if j.not_before > now and j.id in waits]
        return min(backoffs) if backoffs else None

    async def _start(self, d: Start) -> None:
        if d.job_id in self._stop_reason:
            return  # cancelled while this round was deciding
        types = {g.uuid: g.type for g in self.gpus}
        fields = {"gpus": d.gpus, "gpu_types": tuple(types.get(u, "unknown") for u in d.gpus)}
        try:
            job = await self._advance(d.job_id, Step(JobState.STARTING, fields=fields),
                                      expect=JobState.QUEUED)
        except IllegalTransition as e:  # e.g. cancelled in the meantime
            log.info("job %s not started: %s", d.job_id, e)
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._supervise, job, None)

    async def _advance(self, job_id: int, *steps: Step, expect: JobState | None = None) -> Job:
        job, seq = await self.ledger.call(_advance_in_order, job_id, steps, time.time(), expect)
        # Two advances of one job can resume here in either order; only the later commit
        # may update memory, or a stale STARTING could outlive the job's end.
        if seq < self._seq.get(job_id, -1):
            return job
        self._seq[job_id] = seq
        if job.state in FINAL:
            self.active.pop(job_id, None)
            self.waits.pop(job_id, None)
        else:
            self.active[job_id] = job
        ev = self._changed.pop(job_id, None)
        if ev is not None:
            ev.set()
        self._reschedule()
        return job

    # -- supervising one job --------------------------------------------------------------

    async def _supervise(self, job: Job, handle: Handle | None) -> None:
        """Run one job to its end; an unexpected error fails the job, never the daemon."""
        try:
            await self._run_job(job, handle)
        except Exception:  # noqa: BLE001
            log.exception("internal error while supervising job %s", job.id)
            live = self.handles.get(job.id) or handle
            if live is not None:
                self.executor.reap(live)
            try:
                current = await self.get(job.id)
                if current.state not in FINAL and current.state is not JobState.QUEUED:
                    await self._finish(current, Finished(
                        JobState.FAILED, "gpud hit an internal error while running this job; "
                        "see the daemon's log", None, False, False))
            except Exception:  # noqa: BLE001
                log.exception("could not record the failure of job %s", job.id)
        finally:
            self._scopes.pop(job.id, None)
            self.handles.pop(job.id, None)
            self._stop_reason.pop(job.id, None)

    async def _run_job(self, job: Job, handle: Handle | None) -> None:
        job_id = job.id
        scope = trio.CancelScope()
        self._scopes[job_id] = scope
        if handle is None:
            if job_id in self._stop_reason:
                await self._finish(job, Finished(JobState.CANCELLED, "cancelled", None,
                                                 False, False))
                return
            try:
                handle = await self._launch(job)
            except Exception as e:  # noqa: BLE001 - any launch failure is the job's failure
                log.exception("job %s could not start", job_id)
                await self._finish(job, Finished(JobState.FAILED,
                                                 f"could not start the job: {e}", None,
                                                 False, True))
                return
            self.handles[job_id] = handle
            job = await self._advance(job_id, Step(JobState.RUNNING, "running", fields={
                "pid": handle.pid, "pid_start": handle.pid_start, "started_at": time.time(),
            }))
            log.info("job %s started: pid %s, gpus %s", job_id, handle.pid,
                     ",".join(job.gpus) or "none")
        self.handles[job_id] = handle
        started = job.started_at or time.time()
        scope.deadline = trio.current_time() + max(0.0, started + job.timeout - time.time())
        outcome: Outcome | None = None
        with scope:
            outcome = await self.executor.wait(handle)
        if outcome is None:
            stop_as = self._stop_reason.get(job_id, JobState.TIMED_OUT)
            await self.executor.stop(handle, self.config.kill_grace)
            why = ("cancelled" if stop_as is JobState.CANCELLED
                   else f"timed out after {_fmt_seconds(job.timeout)}")
            await self._finish(job, Finished(stop_as, why, None, False, False))
        else:
            self.executor.reap(handle)
            await self._finish(job, await trio.to_thread.run_sync(self._collect, job, outcome))

    async def _launch(self, job: Job) -> Handle:
        function, args = await self.ledger.call(Ledger.payload, job.id)
        # Its submitter's Unix user on a root daemon (never root); a job whose owner lost
        # their account since submitting fails here, saying so.
        ident = run_as(job.owner, self.identity)
        spec = await trio.to_thread.run_sync(self._prepare_job_dir, job, function, args, ident)
        with trio.CancelScope(shield=True):
            handle = await self.executor.launch(spec)
        return handle

    def _prepare_job_dir(self, job: Job, function: bytes, args: bytes,
                         ident: JobIdentity) -> LaunchSpec:
        """Lay out jobs/<id>/ for this attempt: payload in, log and result out. The
        directory and its files belong to the user the job runs as, mode 0700/0600."""
        d = self.config.jobs_dir / str(job.id)
        d.mkdir(mode=0o700, exist_ok=True)
        owner = (ident.uid, ident.gid)
        for stale in (RESULT_FILE, STATUS_FILE):
            (d / stale).unlink(missing_ok=True)
        files = job_files(job_id=job.id, name=job.function, python=job.python,
                          function=function, args=args)
        for name, data in files.items():
            write_new(d / name, data, owner)
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
        return LaunchSpec(job_id=job.id, attempt=job.attempt, job_dir=d, log_path=log_path,
                          gpus=job.gpus, env=dict(job.env), image=job.image, identity=ident)

    def _collect(self, job: Job, outcome: Outcome) -> Finished:
        """Read what the worker left (status.json, never the pickle) into an outcome."""
        d = self.config.jobs_dir / str(job.id)
        has_result = _is_regular(d / RESULT_FILE)
        status = self._read_status(job.id)
        code = outcome.exit_code
        if status is not None and status.ok and has_result:
            return Finished(JobState.SUCCEEDED, None, code, True, False)
        if status is not None and not status.ok:
            msg = f"{(status.type or 'Error').rsplit('.', 1)[-1]}: {status.message or ''}".strip()
            setup = code == EXIT_SETUP
            return Finished(JobState.FAILED, msg, code, has_result, not setup)
        if outcome.signal is not None:
            hint = " (out of memory?)" if outcome.signal == 9 else ""
            why = f"the job's process was killed by signal {outcome.signal}{hint} before it " \
                  "wrote a result"
        elif code is not None:
            why = f"the job's process exited with code {code} without writing a result"
        else:
            why = "the job's process ended without writing a result"
        return Finished(JobState.FAILED, why, code, False, True)

    def _read_status(self, job_id: int) -> WorkerStatus | None:
        """The worker's status.json (plain JSON, never a pickle); None if absent or not
        the worker's (a job could write anything there)."""
        try:
            return read_status(self.config.jobs_dir / str(job_id))
        except (OSError, ValueError):
            return None

    async def _finish(self, job: Job, f: Finished) -> Job:
        now = time.time()
        current = await self.get(job.id)
        if current.gpus and current.state is JobState.RUNNING and current.started_at:
            # Fair share counts from when the process started, within milliseconds of when
            # the GPUs were handed out (the ledger's accounting has the exact figure).
            self.usage.add(current.owner, current.started_at, now, len(current.gpus), now=now)
        steps = [Step(f.state, f.error or f.state.value, fields={
            "ended_at": now, "exit_code": f.exit_code, "error": f.error,
            "has_result": f.has_result,
        })]
        if f.state in RETRYABLE and f.retryable and current.attempt <= current.retries:
            delay = min(self.config.retry_backoff * 2 ** max(0, current.attempt - 1),
                        self.config.retry_backoff_max)
            steps.append(Step(JobState.QUEUED,
                              f"retry {current.attempt + 1} of {current.retries + 1} in "
                              f"{delay:g} s after: {f.error}",
                              fields={"not_before": now + delay, "gpus": ()}))
        new = await self._advance(job.id, *steps)
        log.info("job %s %s%s", job.id, f.state.value,
                 f": {f.error}" if f.error else "")
        return new

    # -- fair share -----------------------------------------------------------------------

    async def _load_usage(self) -> None:
        """Decayed GPU-seconds per user from the ledger (what ended in the last 30
        half-lives; older usage has decayed below a billionth)."""
        now = time.time()
        since = now - 30 * self.config.fairshare_half_life
        for span in await self.ledger.call(finished_gpu_intervals, since):
            self.usage.add(span.owner, span.started_at, span.ended_at, 1, now=now)

    def _usage_now(self, running: Sequence[Job], now: float) -> dict[str, float]:
        """Decayed GPU-seconds per user now: what ended, plus what runs so far."""
        usage = self.usage.at(now)
        for j in running:
            if j.gpus and j.state is JobState.RUNNING and j.started_at is not None:
                usage[j.owner] = usage.get(j.owner, 0.0) + interval_usage(
                    j.started_at, now, len(j.gpus), now=now,
                    half_life=self.config.fairshare_half_life)
        return usage

    # -- GPUs -----------------------------------------------------------------------------

    async def _gpu_loop(self) -> None:
        while True:
            await trio.sleep(self.config.gpu_poll_interval)
            try:
                await self._refresh_gpus()
            except Exception:  # noqa: BLE001 - a bad NVML read must not stop scheduling
                log.exception("reading the GPU inventory failed")

    async def _refresh_gpus(self) -> None:
        snap = await trio.to_thread.run_sync(self.inventory.snapshot)
        ours = {h.pid for h in self.handles.values()}
        out = []
        for g in snap:
            foreign = tuple(p.pid for p in g.processes if proc_session(p.pid) not in ours
                            and p.pid not in ours)
            out.append(dataclasses.replace(g, foreign_pids=foreign))
        before = [g.foreign_pids for g in self.gpus]
        self.gpus = out
        if before != [g.foreign_pids for g in out]:
            self._reschedule()

    # -- restart --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Re-adopt what a previous daemon left running; mark the rest lost (then retry)."""
        jobs = await self.ledger.call(Ledger.active)
        assert self._nursery is not None
        for job in jobs:
            self.active[job.id] = job
            if job.state is JobState.QUEUED:
                continue
            pid = job.pid if job.state is JobState.RUNNING else None
            handle = self.executor.adopt(job.id, pid, job.pid_start)
            if handle is not None:
                if job.state is JobState.STARTING:
                    job = await self._advance(job.id, Step(JobState.RUNNING, "adopted", fields={
                        "pid": handle.pid, "pid_start": handle.pid_start,
                        "started_at": time.time()}))
                log.info("job %s adopted after restart (pid %s)", job.id, handle.pid)
                self._nursery.start_soon(self._supervise, job, handle)
                continue
            status = await trio.to_thread.run_sync(self._read_status, job.id)
            if job.state is JobState.RUNNING and status is not None:
                # It finished while we were away: collect its result as usual.
                done = await trio.to_thread.run_sync(self._collect, job, Outcome(exit_code=None))
                await self._finish(job, done)
            else:
                await self._finish(job, Finished(
                    JobState.LOST, "the daemon restarted and the job's process was gone",
                    None, False, True))



def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


_commits = itertools.count()


def _advance_in_order(ledger: Ledger, job_id: int, steps: Sequence[Step], now: float,
                      expect: JobState | None) -> tuple[Job, int]:
    """Ledger.advance plus a sequence number taken on the ledger thread, i.e. in commit
    order."""
    return ledger.advance(job_id, steps, now, expect=expect), next(_commits)


def _get_many(ledger: Ledger, ids: list[int]) -> list[Job]:
    return [ledger.get(i) for i in ids]


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock for the daemon's life: two daemons on one ledger could run
    one job twice."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(
            f"another gpud is already running on {data_dir} (it holds {data_dir / 'lock'}): "
            "stop it first, or give this one another data_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def instance_id(data_dir: Path) -> str:
    """A stable id for this data directory, written once; it marks our jobs' processes."""
    p = data_dir / "instance"
    try:
        return p.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_hex(8)
        p.write_text(value + "\n")
        return value

