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
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from gpud.batches import BatchLimits
from gpud.config import Config
from gpud.crashpoint import crash_point
from gpud.domain import (
    FINAL,
    RETRYABLE,
    Gpu,
    GpuRequest,
    IllegalTransition,
    Job,
    JobState,
    PythonEnv,
    Quota,
    Start,
    Wait,
)
from gpud.executors.base import Executor, ExecutorRefusal, Handle, LaunchSpec, Outcome
from gpud.executors.process import JobIdentity, ProcessExecutor
from gpud.fairshare import DecayedTotals, Policy, interval_usage
from gpud.gpus import GpuInventory
from gpud.images import ImageBuilder, pip_index_args
from gpud.ledger import IdempotencyKey, LedgerThread, NewJob, Replay, Step
from gpud.ledger.store import Ledger
from gpud.ledger.usage import finished_gpu_intervals
from gpud.metrics import HistoryBuffer
from gpud.safefs import open_append, read_file, write_new
from gpud.scheduler import decide, infeasible, order_key, scheduling_key
from gpud.snapshotter import Snapshotter
from gpud.storage import RESERVE_BYTES, free_bytes, is_busy, is_full, persist
from gpud.users import Directory, NoUnixAccount, run_as
from gpud.warm import WarmPool, WarmWorker, first_of, warm_key
from gpud_client.jobdir import (
    EXIT_SETUP,
    RESULT_FILE,
    STARTED_FILE,
    STATUS_FILE,
    WorkerStatus,
    job_files,
    read_status,
)

__all__ = ["AlreadyRunning", "Daemon", "ExecutorDown", "SubmitError"]

log = logging.getLogger("gpud")



class SubmitError(ValueError):
    """A submit the daemon refuses; the message says why and what to do."""


class ExecutorDown(RuntimeError):
    """The executor cannot be reached now (503): not the request's fault."""


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
        #: the last minutes of GPU readings, for the TUI's sparklines
        self.gpu_history = HistoryBuffer(interval=config.gpu_poll_interval)
        self.handles: dict[int, Handle] = {}
        self._scopes: dict[int, trio.CancelScope] = {}
        self._stop_reason: dict[int, JobState] = {}
        self._changed: dict[int, trio.Event] = {}
        self._seq: dict[int, int] = {}  # commit order of each job's latest advance
        #: warm workers (executors that can keep a worker between calls)
        self.warm: WarmPool | None = (WarmPool(config.data_dir / "hub" / "hub.sock")
                                      if getattr(executor, "supports_warm", False) else None)
        self._assigned: dict[int, WarmWorker] = {}  # job -> the warm worker it will run in
        #: container snapshots (issue #4), where the executor can take them
        self.snapshots: Snapshotter | None = None
        if self.warm is not None and getattr(executor, "supports_snapshots", False):
            self.snapshots = Snapshotter(
                ledger=ledger, executor=executor, pool=self.warm,
                hub_dir=self.warm.path.parent, root=config.data_dir / "snapshots",
                max_bytes=config.snapshot_max_bytes,
                max_failures=config.snapshot_max_failures,
                restore_timeout=config.snapshot_restore_timeout,
                driver=lambda: inventory.driver_version() or "none",
                gpu_part=self._snapshot_gpus)
        #: images built from gpud.Image definitions (#11), where the executor is Podman
        self.images: ImageBuilder | None = None
        if config.executor == "podman" and hasattr(executor, "client"):
            self.images = ImageBuilder(
                ledger=ledger, executor=executor, work_dir=config.data_dir / "image-builds",
                max_bytes=config.image_max_bytes, network=config.image_build_network,
                build_args=pip_index_args(config.image_pip_index_url,
                                          config.image_pip_extra_index_url, os.environ),
                timeout=config.image_build_timeout,
                in_use=lambda: {j.image for j in self.active.values()
                                if j.image and j.state not in FINAL})
        self._dispatched: dict[int, float] = {}  # job -> when it was handed to be started
        self._write_blocked = False  # a start could not be recorded (disk full, lock held)
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.kill_jobs_on_exit = False
        # Shared box (#5): the users table, the fair-share policy and decayed usage.
        self.users = Directory(ledger, on_change=self._reschedule)
        self.policy = Policy(half_life=config.fairshare_half_life,
                             fairshare_weight=config.fairshare_weight,
                             age_weight=config.age_weight, max_age=config.max_age)
        self.usage = DecayedTotals(config.fairshare_half_life, now=time.time())
        self.batches = BatchLimits(ledger)  # max_concurrency of .map batches (#12)

    # -- public operations (called by the API) ------------------------------------------

    async def check_submittable(
        self, gpu: GpuRequest | None, python: str, job_timeout: float, image: str | None,
        *, python_path: str | None = None,
    ) -> str | None:
        """Refuse, with the reason and the fix, what could never run here; return the image
        the job will run in (None for the process executor). A job with its own
        interpreter (``python_path``, #11) has it checked by :meth:`resolve_python`."""
        why = infeasible(gpu, self.gpus)
        if why is not None:
            raise SubmitError(why)
        try:
            resolved, worker = await self.executor.python_for(image)
        except ExecutorRefusal as e:
            raise SubmitError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - e.g. the Podman service went away
            log.exception("the %s executor could not check image %r", self.executor.name, image)
            raise ExecutorDown(
                f"the {self.executor.name} executor cannot check this job's image right now "
                f"({type(e).__name__}: {e}); try again, or ask the admin to check it"
            ) from None
        mine = worker.rsplit(".", 1)[0]
        theirs = python.rsplit(".", 1)[0] if python.count(".") >= 2 else python
        own = python_path not in (None, "daemon") and isinstance(self.executor,
                                                                 ProcessExecutor)
        if theirs != mine and not own:
            where = f"image {resolved} has" if resolved else "this daemon's workers run"
            fix = (f"use an image with Python {theirs}" if resolved else
                   f"have the admin set `python` in the daemon's config to a Python {theirs} "
                   "interpreter")
            raise SubmitError(
                f"this job was pickled by Python {python}, but {where} Python {worker}: "
                f"submit from Python {mine}, or {fix}"
            )
        if job_timeout > self.config.max_timeout:
            raise SubmitError(
                f"timeout {_fmt_seconds(job_timeout)} is longer than this daemon's max_timeout "
                f"({_fmt_seconds(self.config.max_timeout)}): ask for less"
            )
        if job_timeout <= 0:
            raise SubmitError("timeout must be positive")
        return resolved or None

    async def resolve_python(self, owner: str, python: str, python_path: str | None,
                             python_prefix: str | None) -> PythonEnv | None:
        """The interpreter a job of ``owner`` runs with (process executor, #11), checked
        as the user it runs as; None where the executor picks it (a container's)."""
        if not isinstance(self.executor, ProcessExecutor):
            return None
        try:
            ident = run_as(owner, self.identity)
        except NoUnixAccount as e:
            raise SubmitError(str(e)) from None
        try:
            return await self.executor.resolve_python(
                python_path, version=python, prefix=python_prefix, ident=ident, owner=owner)
        except ExecutorRefusal as e:
            raise SubmitError(str(e)) from None

    async def submit(
        self, jobs: Sequence[NewJob], function: bytes, *, batch: bool = False,
        idempotency: IdempotencyKey | None = None, max_concurrency: int | None = None,
    ) -> tuple[int | None, list[Job]]:
        """Store and queue jobs; with a key its owner used before, return the jobs that
        key's first submit made instead (nothing new is queued). Raises KeyReused."""
        now = time.time()
        try:
            batch_id, ids = await self.ledger.call(Ledger.submit, jobs, function, now,
                                                   batch=batch, idempotency=idempotency,
                                                   max_concurrency=max_concurrency)
        except Replay as r:
            return r.batch_id, await self.ledger.call(_get_many, r.ids)
        crash_point("after_submit")
        # Durable now: only after the COMMIT do they exist for anyone else.
        made = await self.ledger.call(_get_many, ids)
        for j in made:
            self.active[j.id] = j
        self._reschedule()
        return batch_id, made

    async def replay(self, key: IdempotencyKey) -> tuple[int | None, list[Job]] | None:
        """The jobs an earlier submit with this key made, or None if it is new."""
        try:
            await self.ledger.call(Ledger.replay, key, time.time())
        except Replay as r:
            return r.batch_id, await self.ledger.call(_get_many, r.ids)
        return None

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
                                           expect=JobState.QUEUED, retry=False)
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
        """GPU UUID -> the job holding it; an idle warm worker holds its GPUs in the name
        of the last job it ran (`gpud gpus` shows that job and its owner)."""
        held: dict[str, Job] = {}
        for w in self.warm.workers.values() if self.warm is not None else ():
            if w.idle and w.gpus:
                last = Job(id=w.last_job, function="(warm worker)", state=JobState.RUNNING,
                           submitted_at=0.0, owner=w.key[3], gpus=w.gpus)
                held.update((u, last) for u in w.gpus)
        held.update((u, j) for j in self.active.values() if j.state is not JobState.QUEUED
                    for u in j.gpus)
        return held

    # -- the loops ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._refresh_gpus()
                await self.users.refresh()
                await self._load_usage()
                if self.warm is not None:
                    await nursery.start(self.warm.serve)
                    nursery.start_soon(self._warm_loop)
                if self.snapshots is not None:
                    await self.snapshots.reconcile()
                if self.images is not None:
                    await trio.to_thread.run_sync(self.images.reconcile)
                await self._recover()
                nursery.start_soon(self.users.run)
                nursery.start_soon(self._gpu_loop)
                nursery.start_soon(self._schedule_loop)
                task_status.started()
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    # Idle warm workers end with the daemon (busy ones finish their job,
                    # which the next daemon collects); a warm container is removed. Chosen
                    # before the first await: the hub's connections are closing meanwhile.
                    ending = [w.handle for w in (list(self.warm.workers.values())
                                                 if self.warm else [])
                              if w.handle is not None and (w.idle or self.kill_jobs_on_exit)]
                    ending += self.warm.take_lost() if self.warm else []
                    for h in ending:
                        with trio.move_on_after(10):
                            await trio.to_thread.run_sync(self.executor.reap, h)
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
        pending = await self.batches.admit(pending, running)  # max_concurrency (#12)
        if pending and _low_space(self.config.data_dir):
            # A job could not even lay out its directory: keep what space is left for the
            # running jobs' state changes, and look again in a while.
            why = (f"the disk holding {self.config.data_dir} is full: no job starts until "
                   "space is freed there")
            self.waits = {j.id: Wait(j.id, why, i) for i, j in enumerate(pending, 1)}
            return now + 2.0
        usage = self._usage_now(running, now)
        quotas = self.users.quotas()
        # Warm workers are matched in the same (fair-share) order the scheduler uses.
        key = scheduling_key(pending, running, now=now, usage=usage, policy=self.policy)
        assigned, held, evictable = self._match_warm(pending, now, key, quotas)
        cold = [j for j in pending if j.id not in assigned]
        decisions = decide(cold, running + held, self.gpus, cpu_slots=self.config.cpu_slots,
                           now=now, usage=usage, policy=self.policy, quotas=quotas)
        waits: dict[int, Wait] = {}
        for job_id, w in assigned.items():
            w.busy = job_id  # reserved now: the next round must not hand it out again
            self._assigned[job_id] = w
            await self._start(Start(job_id, w.gpus))
        for d in decisions:
            if isinstance(d, Start):
                # Idle warm workers on these GPUs give way to the job (eviction).
                for w in [w for w in evictable if set(w.gpus) & set(d.gpus)]:
                    evictable.remove(w)
                    await self._end_warm(w, f"its GPUs are needed by job {d.job_id}")
                await self._start(d)
            else:
                waits[d.job_id] = d
        self.waits = waits
        backoffs = [j.not_before for j in pending if j.not_before > now and j.id in waits]
        if self._write_blocked:
            self._write_blocked = False
            backoffs.append(now + 1.0)
        return min(backoffs) if backoffs else None

    def _match_warm(
        self, pending: list[Job], now: float,
        key: Callable[[Job], tuple[float, float, int]] = order_key,
        quotas: Mapping[str, Quota] | None = None,
    ) -> tuple[dict[int, WarmWorker], list[Job], list[WarmWorker]]:
        """Which queued jobs run in an idle warm worker of theirs, in scheduling order.

        Returns (job -> worker; the idle workers that keep their GPUs this round, as
        pseudo running jobs for the scheduler, owned by their user, so they count
        against that user's GPU quota; the idle workers a job ahead in the queue may
        evict). A job that cannot use a warm worker claims the idle workers on GPUs of
        its type, so a stream of warm calls cannot starve it. A job over its owner's
        max_timeout quota is left to the scheduler, which says so.
        """
        if self.warm is None:
            return {}, [], []
        idle = self.warm.idle()
        if not idle:
            return {}, [], []
        assigned: dict[int, WarmWorker] = {}
        claimed: set[int] = set()
        for job in sorted(pending, key=key):
            if job.not_before > now:
                continue
            quota = (quotas or {}).get(job.owner)
            over_quota = (quota is not None and quota.max_timeout is not None
                          and job.timeout > quota.max_timeout)
            if _served(job) and not over_quota:
                wanted = warm_key(job)
                w = next((w for w in idle if w.key == wanted and w.id not in claimed
                          and w not in assigned.values()), None)
                if w is not None:
                    assigned[job.id] = w
                    continue
            if job.gpu is not None:
                index = {g.uuid: g for g in self.gpus}
                for w in idle:
                    if w.gpus and w not in assigned.values() and any(
                            index[u].matches(t) for u in w.gpus if u in index
                            for t, _ in job.gpu.options):
                        claimed.add(w.id)
        held, evictable = [], []
        for w in idle:
            if w in assigned.values() or not w.gpus:
                continue
            if w.id in claimed:
                evictable.append(w)
            else:
                held.append(Job(id=w.last_job, function="(warm worker)",
                                state=JobState.RUNNING, submitted_at=0.0, owner=w.key[3],
                                gpus=w.gpus))
        return assigned, held, evictable

    def _release_warm(self, job_id: int) -> None:
        """A job matched to a warm worker did not start after all: the worker is free."""
        w = self._assigned.pop(job_id, None)
        if w is not None and w.busy == job_id:
            w.busy = None
            w.idle_since = time.monotonic()

    async def _end_warm(self, w: WarmWorker, why: str) -> None:
        assert self.warm is not None
        log.info("ending warm worker %s (last job %s): %s", w.id, w.last_job, why)
        await self.warm.close(w)
        if w.handle is not None:
            await trio.to_thread.run_sync(self.executor.reap, w.handle)
            with trio.move_on_after(5):
                await self.executor.wait(w.handle)  # collect it: no zombie left behind

    async def _warm_loop(self) -> None:
        """End warm workers whose keep_warm ran out."""
        assert self.warm is not None
        while True:
            await trio.sleep(0.5)
            for h in self.warm.take_lost():  # idle workers that died on their own
                await trio.to_thread.run_sync(self.executor.reap, h)
            expired = self.warm.expired(time.monotonic())
            for w in expired:
                await self._end_warm(w, f"idle for {w.keep_warm:g} s")
            if expired:
                self._reschedule()

    async def _start(self, d: Start) -> None:
        if d.job_id in self._stop_reason:
            self._release_warm(d.job_id)
            return  # cancelled while this round was deciding
        types = {g.uuid: g.type for g in self.gpus}
        fields = {"gpus": d.gpus, "gpu_types": tuple(types.get(u, "unknown") for u in d.gpus)}
        try:
            job = await self._advance(d.job_id, Step(JobState.STARTING, fields=fields),
                                      expect=JobState.QUEUED, retry=False)
        except IllegalTransition as e:  # e.g. cancelled in the meantime
            log.info("job %s not started: %s", d.job_id, e)
            self._release_warm(d.job_id)
            return
        except sqlite3.Error as e:
            if not (is_full(e) or is_busy(e)):
                raise
            # It stays queued; the next round (in 1 s) tries again.
            if not self._write_blocked:
                log.warning("job %s not started: the ledger cannot be written (%s)",
                            d.job_id, e)
            self._write_blocked = True
            self._release_warm(d.job_id)
            return
        assert self._nursery is not None
        self._dispatched[job.id] = time.time()
        self._nursery.start_soon(self._supervise, job, None)

    async def _advance(self, job_id: int, *steps: Step, expect: JobState | None = None,
                       retry: bool = True) -> Job:
        """Record state changes, then update memory. With ``retry`` (a job's own life),
        a full disk or a held write lock is waited out: the change is never dropped."""
        def write() -> Awaitable[tuple[Job, int]]:
            return self.ledger.call(_advance_in_order, job_id, steps, time.time(), expect)

        if retry:
            what = f"job {job_id} going {' then '.join(s.state.value for s in steps)}"
            job, seq = await persist(write, what)
        else:
            job, seq = await write()
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
                await trio.to_thread.run_sync(self.executor.reap, live)
            try:
                current = await self.get(job.id)
                if current.state not in FINAL and current.state is not JobState.QUEUED:
                    await self._finish(current, Finished(
                        JobState.FAILED, "gpud hit an internal error while running this job; "
                        "see the daemon's log", None, False, False))
            except Exception:  # noqa: BLE001
                log.exception("could not record the failure of job %s", job.id)
        finally:
            self._release_warm(job.id)  # matched to a warm worker but never ran in it
            self._scopes.pop(job.id, None)
            self.handles.pop(job.id, None)
            self._stop_reason.pop(job.id, None)

    async def _run_job(self, job: Job, handle: Handle | None) -> None:
        job_id = job.id
        scope = trio.CancelScope()
        self._scopes[job_id] = scope
        if handle is None and _served(job) and self.warm is not None \
                and job_id not in self._stop_reason:
            await self._run_warm(job, scope)
            return
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
                "start_kind": "cold",
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
            await self._stop_and_finish(job, handle)
        else:
            crash_point("before_finish")
            await trio.to_thread.run_sync(self.executor.reap, handle)
            await self._finish(job, await trio.to_thread.run_sync(self._collect, job, outcome))

    async def _stop_and_finish(self, job: Job, handle: Handle) -> None:
        """The job's cancel scope fired: stop it (TERM, grace, KILL) and record why."""
        stop_as = self._stop_reason.get(job.id, JobState.TIMED_OUT)
        await self.executor.stop(handle, self.config.kill_grace)
        why = ("cancelled" if stop_as is JobState.CANCELLED
               else f"timed out after {_fmt_seconds(job.timeout)}")
        await self._finish(job, Finished(stop_as, why, None, False, False))

    async def _run_warm(self, job: Job, scope: trio.CancelScope) -> None:
        """Run a keep_warm (or snapshot) job in a warm worker: the one the scheduler
        matched, one restored from its snapshot, or a new one that then stays for the
        next call."""
        assert self.warm is not None
        w = self._assigned.pop(job.id, None)
        kind, note, take = "warm" if w is not None else "cold", "", None
        try:
            function, args = await self.ledger.call(Ledger.payload, job.id)
            # As for a cold job: its submitter's Unix user on a root daemon; the warm
            # worker is launched with this spec, so it runs as them too.
            ident = run_as(job.owner, self.identity)
            spec = await trio.to_thread.run_sync(self._prepare_job_dir, job, function, args,
                                                 ident)
            if w is None and job.snapshot and self.snapshots is not None:
                plan = await self.snapshots.plan(job, spec, self._new_warm_worker)
                w, kind, note, take = plan.worker, plan.kind, plan.note, plan.take
            elif w is None:
                if job.snapshot:
                    note = f"snapshots need the Podman executor, not {self.executor.name}"
                w = await self._new_warm_worker(job, spec)
        except Exception as e:  # noqa: BLE001 - any start-up failure is the job's failure
            log.exception("job %s could not start", job.id)
            if w is not None and kind == "warm":  # a matched worker stays for the next job
                w.busy, w.idle_since = None, time.monotonic()
            await self._finish(job, Finished(JobState.FAILED, f"could not start the job: {e}",
                                             None, False, True))
            return
        assert w.handle is not None
        crash_point("warm_worker_ready")
        self.handles[job.id] = w.handle
        why = f"running ({kind}{': ' + note if note else ''})"
        job = await self._advance(job.id, Step(JobState.RUNNING, why, fields={
            "pid": w.handle.pid, "pid_start": w.handle.pid_start, "started_at": time.time(),
            "start_kind": kind,
        }))
        started = job.started_at or time.time()
        scope.deadline = trio.current_time() + max(0.0, started + job.timeout - time.time())
        code: int | None = None
        finished = False
        task_dir = self.executor.task_dir(spec.job_dir)
        try:
            with scope:
                if take is not None and self.snapshots is not None:
                    await self.snapshots.take(w, job, take, task_dir)
                code = await self.warm.run(w, job.id, task_dir, keep_warm=job.keep_warm,
                                           env=_task_env(job))
                finished = True
                crash_point("before_finish")
        finally:
            if take is not None and self.snapshots is not None:
                await self.snapshots.settle(take, job.id)
        if not finished:
            # Cancelled or out of time: the worker goes with the job.
            self.warm.forget(w)
            await self._stop_and_finish(job, w.handle)
            return
        if code is None:  # the worker died during the job
            self.warm.forget(w)
            await trio.to_thread.run_sync(self.executor.reap, w.handle)
        outcome = Outcome(exit_code=code)
        await self._finish(job, await trio.to_thread.run_sync(self._collect, job, outcome))
        if code is not None and code != 0 and code != 1:
            await self._end_warm(w, f"job {job.id} ended with exit code {code}")
        elif code is not None and job.keep_warm <= 0:
            await self._end_warm(w, f"job {job.id} is over and keep_warm is 0")

    async def _new_warm_worker(self, job: Job, spec: LaunchSpec,
                               snapshot: Path | None = None) -> WarmWorker:
        """Launch a new warm worker for the job (``snapshot``: its container is to be
        checkpointed into this directory) and wait for its hello."""
        assert self.warm is not None
        w = self.warm.new_worker(warm_key(job), job.gpus, job.keep_warm, busy=job.id)
        spec = dataclasses.replace(spec, serve=(str(self.warm.path), w.token),
                                   snapshot=snapshot)
        with trio.CancelScope(shield=True):
            handle = await self.executor.launch(spec)
        w.handle = handle
        with trio.move_on_after(60):
            await first_of(w.hello.wait, lambda: self.executor.wait(handle))
        if not w.hello.is_set():
            self.warm.forget(w)
            await trio.to_thread.run_sync(self.executor.reap, handle)
            raise RuntimeError("the worker did not start (its output is in the job's log)")
        return w

    def _snapshot_gpus(self, job: Job) -> str:
        """The GPU part of a snapshot key: type and count; the UUIDs themselves where real
        devices go into the container (they are part of what a restore brings back)."""
        types = {g.uuid: g for g in self.gpus}
        if job.gpus and not all(types[u].fake for u in job.gpus if u in types):
            return ",".join(job.gpus)
        return ",".join(sorted(types[u].type for u in job.gpus if u in types))

    async def _launch(self, job: Job) -> Handle:
        function, args = await self.ledger.call(Ledger.payload, job.id)
        # Its submitter's Unix user on a root daemon (never root); a job whose owner lost
        # their account since submitting fails here, saying so.
        ident = run_as(job.owner, self.identity)
        spec = await trio.to_thread.run_sync(self._prepare_job_dir, job, function, args, ident)
        crash_point("before_launch")
        # Durable before anything starts: after a crash, an attempt without this record
        # never ran (start it), one with it may have (look for its process and outcome).
        await persist(lambda: self.ledger.call(Ledger.mark_launched, job.id, job.attempt,
                                               time.time()), f"the launch of job {job.id}")
        crash_point("after_mark_launched")
        with trio.CancelScope(shield=True):
            handle = await self.executor.launch(spec)
        crash_point("after_launch")
        return handle

    def _prepare_job_dir(self, job: Job, function: bytes, args: bytes,
                         ident: JobIdentity) -> LaunchSpec:
        """Lay out jobs/<id>/ for this attempt: payload in, log and result out. The
        directory and its files belong to the user the job runs as, mode 0700/0600."""
        d = self.config.jobs_dir / str(job.id)
        d.mkdir(mode=0o700, exist_ok=True)
        owner = (ident.uid, ident.gid)
        for stale in (RESULT_FILE, STATUS_FILE, STARTED_FILE):
            (d / stale).unlink(missing_ok=True)
        files = job_files(job_id=job.id, name=job.function, python=job.python,
                          function=function, args=args, attempt=job.attempt)
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
        index = {g.uuid: g.index for g in self.gpus}
        return LaunchSpec(job_id=job.id, attempt=job.attempt, job_dir=d, log_path=log_path,
                          gpus=job.gpus, gpu_indices=tuple(index[u] for u in job.gpus
                                                           if u in index),
                          env=dict(job.env), image=job.image, identity=ident,
                          memory=job.memory, cpus=job.cpus, python_env=job.python_env)

    def _collect(self, job: Job, outcome: Outcome) -> Finished:
        """Read what the worker left (status.json, never the pickle) into an outcome."""
        d = self.config.jobs_dir / str(job.id)
        has_result = _is_regular(d / RESULT_FILE)
        status = self._read_status(job.id)
        if status is not None and status.attempt is not None and status.attempt != job.attempt:
            status = None  # an earlier attempt's (stale files are removed at launch)
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
        if _low_space(self.config.data_dir):
            why += f" (the disk holding {self.config.data_dir} was full)"
        return Finished(JobState.FAILED, why, code, False, True)

    def _user_start(self, job_id: int) -> float | None:
        """When the worker began the user's code (it writes the time down), if it did."""
        raw = read_file(self.config.jobs_dir / str(job_id) / STARTED_FILE, 64)
        try:
            return float(raw) if raw else None
        except ValueError:
            return None

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
        fields: dict[str, object] = {
            "ended_at": now, "exit_code": f.exit_code, "error": f.error,
            "has_result": f.has_result,
        }
        dispatched = self._dispatched.pop(job.id, None)
        user_start = await trio.to_thread.run_sync(self._user_start, job.id)
        if dispatched is not None and user_start is not None:
            fields["startup"] = round(max(0.0, user_start - dispatched), 6)
        steps = [Step(f.state, f.error or f.state.value, fields=fields)]
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
        handles = list(self.handles.values())
        out = []
        for g in snap:
            foreign = tuple(p.pid for p in g.processes
                            if self.executor.job_for_pid(p.pid, handles) is None)
            out.append(dataclasses.replace(g, foreign_pids=foreign))
        before = [g.foreign_pids for g in self.gpus]
        self.gpus = out
        self.gpu_history.record(out, time.time())
        if before != [g.foreign_pids for g in out]:
            self._reschedule()

    # -- restart --------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Re-adopt what a previous daemon left running, collect what finished while it was
        away, start what it never launched; mark the rest lost (then retry).

        Whatever the ledger last recorded (STARTING or RUNNING), the attempt's process or
        outcome is looked for: its launch is recorded before the executor starts anything
        (attempts.launched_at), and the worker's status.json names its attempt."""
        jobs = await self.ledger.call(Ledger.active)
        assert self._nursery is not None
        await trio.to_thread.run_sync(self.executor.cleanup, {j.id for j in jobs},
                                      {j.pid for j in jobs if j.pid})
        for job in jobs:
            self.active[job.id] = job
            if job.state is not JobState.QUEUED:
                await self._recover_job(job)

    async def _recover_job(self, job: Job) -> None:
        assert self._nursery is not None
        launched = job.state is JobState.RUNNING or await self.ledger.call(
            Ledger.launched, job.id, job.attempt)
        handle = await trio.to_thread.run_sync(self.executor.adopt, job)
        if not launched:
            # Never handed to the executor, so none of the user's code ran. A process
            # with the job's mark is a warm worker started for it that never got the
            # job: end it, and start the attempt over.
            if handle is not None:
                await trio.to_thread.run_sync(self.executor.reap, handle)
                with trio.move_on_after(5):
                    await self.executor.wait(handle)
            log.info("job %s had not been launched before the restart: starting it", job.id)
            self._resume_start(job)
            return
        if handle is not None:
            if job.state is JobState.STARTING:
                job = await self._advance(job.id, Step(JobState.RUNNING, "adopted", fields={
                    "pid": handle.pid, "pid_start": handle.pid_start,
                    "started_at": time.time()}))
            log.info("job %s adopted after restart (pid %s)", job.id, handle.pid)
            self._nursery.start_soon(self._supervise, job, handle)
            return
        status = await trio.to_thread.run_sync(self._read_status, job.id)
        if status is not None and status.attempt == job.attempt:
            # It finished while no daemon watched: collect its outcome as usual.
            if job.state is JobState.STARTING:
                began = await trio.to_thread.run_sync(self._user_start, job.id)
                job = await self._advance(job.id, Step(
                    JobState.RUNNING, "ran while the daemon was down",
                    fields={"started_at": began or time.time(), "start_kind": "cold"}))
            done = await trio.to_thread.run_sync(self._collect, job, Outcome(exit_code=None))
            log.info("job %s finished while the daemon was down: collected", job.id)
            await self._finish(job, done)
            return
        if job.state is JobState.STARTING and await trio.to_thread.run_sync(
                self._user_start, job.id) is None:
            # Launched, gone, and the user's code never began (the worker writes
            # `started` first thing; the launch removed an earlier attempt's): start again.
            log.info("job %s was launched but never began before the restart: starting it",
                     job.id)
            self._resume_start(job)
            return
        await self._finish(job, Finished(
            JobState.LOST, "the daemon restarted and the job's process was gone",
            None, False, True))

    def _resume_start(self, job: Job) -> None:
        """Carry on starting a STARTING job (its GPUs are still its own) from the launch."""
        assert self._nursery is not None
        self._dispatched[job.id] = time.time()
        self._nursery.start_soon(self._supervise, job, None)


def _low_space(data_dir: Path) -> bool:
    try:
        return free_bytes(data_dir) < RESERVE_BYTES
    except OSError:
        return False


def _served(job: Job) -> bool:
    """Does the job run in a warm worker (fed through the hub)?"""
    return job.keep_warm > 0 or job.snapshot


def _task_env(job: Job) -> dict[str, str]:
    """What differs per job in a warm worker's environment: the job, and its GPUs (a
    restored worker's environment is the snapshot taker's)."""
    visible = ",".join(job.gpus)
    return {"GPUD_JOB_ID": str(job.id), "GPUD_ATTEMPT": str(job.attempt),
            "CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible or "void"}


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

