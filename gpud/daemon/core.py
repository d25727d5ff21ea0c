"""The daemon's state and the steps every role shares: one record per active job,
recording a change (ledger first, then memory), finishing an attempt, fair share."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Mapping, Sequence

import trio

from gpud.batches import BatchLimits
from gpud.clock import Clock, SystemClock
from gpud.config import Config
from gpud.cudackpt import Checkpointer, Support
from gpud.daemon import dependencies, jobfiles
from gpud.daemon.gpustate import CheckpointParker, GpuStateParker
from gpud.daemon.hotcache import FrozenHeap, RecentFinal, RecentPayloads
from gpud.daemon.parking import ParkingLot
from gpud.daemon.record import (
    Finished,
    JobRecord,
    _advance_in_order,
)
from gpud.daemon.results import RecentResults, deps_results
from gpud.daemon.stats import JobStats
from gpud.deps import DepIndex
from gpud.domain import (
    FINAL,
    Gpu,
    Job,
    JobState,
    Wait,
)
from gpud.executors.base import Executor, Handle, LaunchSpec, Outcome, capabilities
from gpud.executors.process import JobIdentity
from gpud.fairshare import DecayedTotals, Policy, interval_usage
from gpud.gpus import GpuInventory
from gpud.images import ImageBuilder, pip_index_args
from gpud.ledger import LedgerThread, Step
from gpud.ledger.store import Ledger
from gpud.ledger.usage import finished_gpu_intervals
from gpud.metrics import HistoryBuffer
from gpud.notify import Notifier
from gpud.pending import ActiveJobs
from gpud.priority import Interactive
from gpud.retry import RetryPolicy, after
from gpud.scheduler import Plan, Waits
from gpud.snapgpu import SnapshotGpuState
from gpud.snapshotter import Snapshotter
from gpud.storage import persist
from gpud.users import Directory
from gpud.warm import WarmPool, WarmWorker

log = logging.getLogger("gpud")

#: A cold job's directory is laid out on the event loop when its payload is at most this
#: big (a few small writes into the page cache); a larger one, or one with dependencies'
#: results to link, in a worker thread (#12).
INLINE_LAYOUT_BYTES = 256 * 1024


class HandOffGate:
    """Rounds and warm hand-offs (#12, gpud.daemon.loop), never at once. A hand-off gives
    the slot of the call that ended to the next one: until that start is in memory, a
    round would see the slot free (the end in first) and the next call still queued. So a
    round waits for the hand-offs in flight (each a ledger trip), and none begins while a
    round runs or waits. ``moves`` lets a hand-off's decision count the slots as they are
    while others are in flight."""

    def __init__(self) -> None:
        self.handing = 0
        self.round = False  # a round runs, or waits for the hand-offs in flight
        self._drained = trio.Event()
        self._opened = trio.Event()
        #: hand-offs in flight: the call that ended -> the call its slot went to
        self.moves: dict[int, Job] = {}

    def enter(self, ended: int, taker: Job) -> None:
        assert not self.round
        self.handing += 1
        self.moves[ended] = taker

    def leave(self) -> None:
        self.handing -= 1
        if self.handing == 0:
            self._drained.set()

    async def close(self) -> None:
        self.round = True
        self._opened = trio.Event()
        while self.handing:
            self._drained = trio.Event()
            await self._drained.wait()

    def open(self) -> None:
        self.round = False
        self._opened.set()

    async def opened(self) -> None:
        """Return once no round runs (at once when none does)."""
        while self.round:
            await self._opened.wait()


class DaemonCore:
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
        clock: Clock | None = None,
        checkpointer: Checkpointer | None = None,
        checkpoint_support: Support | None = None,
    ) -> None:
        self.config = config
        #: the one source of time (gpud.clock); tests pass a gpud.testing.FakeClock
        self.clock: Clock = clock or SystemClock()
        self.ledger = ledger
        self.inventory = inventory
        self.executor = executor
        self.identity = identity
        self.worker_python = worker_python
        self.instance = instance
        self.started_at = self.clock.time()
        #: one record per active job (queued, starting, running)
        #: ... with the queued ones indexed for the scheduler (gpud.pending, #12)
        self.jobs: ActiveJobs[JobRecord] = ActiveJobs(lambda r: r.job, JobRecord)
        #: the last round's waits, each read on its own (gpud.queue_view, #12)
        self.waits: Mapping[int, Wait] | Waits = {}
        self.plan: Plan | None = None  # the last round's, for the next bounded one
        #: quick API requests being answered: rounds let them go first (gpud.priority)
        self.interactive = Interactive()
        self.gpus: list[Gpu] = []
        #: the last minutes of GPU readings, for the TUI's sparklines
        self.gpu_history = HistoryBuffer(interval=config.gpu_poll_interval)
        #: what the executor can do, checked once (#12)
        self.caps = capabilities(executor)
        #: warm workers (executors that can keep a worker between calls)
        self.warm: WarmPool | None = (
            WarmPool(config.data_dir / "hub" / "hub.sock", self.clock) if self.caps.warm else None
        )
        #: GPU checkpointing (#13): what `gpud gpus` reports, what suspend and parking use
        self.checkpointer = checkpointer
        self.checkpoint_support = checkpoint_support
        #: suspend parks a job's GPU state through this (tests may set another)
        self.gpu_parker: GpuStateParker | None = None
        if checkpointer is not None and checkpoint_support is not None and checkpoint_support.ok:
            self.gpu_parker = CheckpointParker(checkpointer)
        #: idle warm workers parked in host memory (#13 item 2)
        self.parking = ParkingLot(
            checkpointer if self.warm is not None else None,
            checkpoint_support,
            config.park_max_bytes,
            config.data_dir / "hub" / "parked.json",
        )
        #: container snapshots (issue #4), where the executor can take them
        self.snapshots: Snapshotter | None = None
        if self.warm is not None and self.caps.snapshots:
            self.snapshots = Snapshotter(
                ledger=ledger,
                executor=executor,
                pool=self.warm,
                hub_dir=self.warm.path.parent,
                root=config.data_dir / "snapshots",
                max_bytes=config.snapshot_max_bytes,
                max_failures=config.snapshot_max_failures,
                restore_timeout=config.snapshot_restore_timeout,
                driver=lambda: inventory.driver_version() or "none",
                gpu_part=self._snapshot_gpus,
                gpu_state=SnapshotGpuState(checkpointer)
                if self.gpu_parker is not None and checkpointer is not None
                else None,
            )
        #: images built from gpud.Image definitions (#11), where the executor is Podman
        self.images: ImageBuilder | None = None
        if self.caps.image_builds:
            self.images = ImageBuilder(
                ledger=ledger,
                executor=executor,
                work_dir=config.data_dir / "image-builds",
                max_bytes=config.image_max_bytes,
                network=config.image_build_network,
                build_args=pip_index_args(
                    config.image_pip_index_url, config.image_pip_extra_index_url, os.environ
                ),
                timeout=config.image_build_timeout,
                in_use=self._images_in_use,
            )
        self._write_blocked = False  # a start could not be recorded (disk full, lock held)
        #: rounds and warm hand-offs, never at once (gpud.daemon.loop, #12)
        self._gate = HandOffGate()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.kill_jobs_on_exit = False
        # Shared box (#5): the users table, the fair-share policy and decayed usage.
        self.users = Directory(ledger, on_change=self._reschedule)
        self.policy = Policy(
            half_life=config.fairshare_half_life,
            fairshare_weight=config.fairshare_weight,
            age_weight=config.age_weight,
            max_age=config.max_age,
        )
        self.retry_policy = RetryPolicy(config.retry_backoff, config.retry_backoff_max)
        self.usage = DecayedTotals(config.fairshare_half_life, now=self.clock.time())
        self.batches = BatchLimits(ledger)  # max_concurrency of .map batches (#12)
        #: jobs waiting for dependencies, kept out of the scheduler's queue (#14)
        self.deps = DepIndex()
        self.jobs.held = self.deps
        #: webhooks told of jobs' ends, by a task of their own (#14)
        self.notifier = Notifier(config)
        #: what /metrics counts as jobs end (#16, gpud.daemon.stats)
        self.stats = JobStats()
        #: results just stored with a job's end, for the caller waiting on it (#12)
        self.recent = RecentResults()
        #: payloads of keep_warm jobs until their start, jobs just ended (#12, hotcache)
        self.payloads = RecentPayloads()
        self.final = RecentFinal()
        #: a big batch's objects kept out of full GC collections while queued (#12)
        self.heap = FrozenHeap()

    def _images_in_use(self) -> set[str]:
        """The images of the active jobs (those still arriving too: #12)."""
        jobs = [r.job for r in self.jobs.values()] + self.jobs.unfiled()
        return {j.image for j in jobs if j.image}

    async def get(self, job_id: int) -> Job:
        rec = self.jobs.get(job_id)
        if rec is not None:
            return rec.job
        # A call's waiter reads the job that just ended from memory: no ledger trip (#12).
        done = self.final.get(job_id, self.clock.time())
        if done is not None:
            return done
        return await self.ledger.call(Ledger.get, job_id)

    def changed(self, job_id: int) -> trio.Event:
        """An event set at the job's next change. For a job not in memory (final, or
        not yet recorded) it is already set: the caller reads the job again."""
        rec = self.jobs.get(job_id)
        if rec is None:
            ev = trio.Event()
            ev.set()
            return ev
        if rec.changed is None:
            rec.changed = trio.Event()
        return rec.changed

    def handles(self) -> list[Handle]:
        """The processes (and warm workers) of the jobs being supervised."""
        return [r.handle for r in self.jobs.values() if r.handle is not None]

    def _reschedule(self) -> None:
        self._wake.set()

    async def _advance(
        self,
        job_id: int,
        *steps: Step,
        expect: JobState | None = None,
        retry: bool = True,
        synced: bool = True,
        result: bytes | None = None,
        wake: bool = True,
    ) -> Job:
        """Record state changes, then update memory. With ``retry`` (a job's own life),
        a full disk or a held write lock is waited out: the change is never dropped.

        ``synced=False``: a step the daemon takes on its own (STARTING, RUNNING, a job's
        end) is committed without an fsync (#12; gpud.ledger.thread). A kill -9 keeps it;
        a power cut may take the ledger back to an earlier step (the job is then found
        RUNNING and recovered, or LOST and retried: at least once, on a power cut only).
        Whoever is answered after this returns was answered after the COMMIT.
        ``result``: a warm job's inline result, stored in the same commit (#12).
        ``wake=False``: no scheduling round for this change (a warm worker's hand-off,
        which changes nothing a round decides on; gpud.daemon.loop)."""
        call = self.ledger.call if synced else self.ledger.call_unsynced

        def write() -> Awaitable[tuple[Job, int]]:
            return call(_advance_in_order, job_id, steps, self.clock.time(), expect, result)

        if retry:
            what = f"job {job_id} going {' then '.join(s.state.value for s in steps)}"
            job, seq = await persist(write, what)
        else:
            job, seq = await write()
        if result is not None:
            self.recent.put(job_id, job.attempt, result)  # the waiting caller reads it here
        # Two advances of one job can resume here in either order; only the later commit
        # may update memory, or a stale STARTING could outlive the job's end.
        rec = self.jobs.get(job_id)
        if rec is None or seq < rec.seq:
            # Not in memory: already final (a later commit dropped it), so this one is
            # stale too. Jobs enter memory only at submit and recovery.
            return job
        rec.seq, rec.job = seq, job
        if job.state in FINAL:
            del self.jobs[job_id]
            if rec.assigned is not None:
                # Matched to an idle warm worker and ended (cancelled) before it ran there:
                # the worker is free again (it never is otherwise: its start is gone).
                self._release_warm(rec)
            self.heap.drained(len(self.jobs))
            self.final.put(job)
            self.payloads.pop(job_id)  # cancelled before it started
            dependencies.job_ended(self, job)  # its waiters go on or are cancelled (#14)
            self.notifier.job_ended(job)
            self.stats.job_ended(job)  # /metrics' counters (#16)
        else:
            self.jobs.refile(job_id)  # the queue index follows the job's state (#12)
        ev, rec.changed = rec.changed, None
        if ev is not None:
            ev.set()  # a record dropped above still wakes its waiters, who read the ledger
        if wake:
            self._reschedule()
        return job

    async def _finish(
        self,
        job: Job,
        f: Finished,
        *,
        began: float | None = None,
        began_known: bool = False,
        result: bytes | None = None,
        wake: bool = True,
    ) -> Job:
        """Record how an attempt ended. ``began_known``: ``began`` is when the user's
        code began (a warm worker says so inline), so the job's files are not read.
        ``result``: the result a warm worker sent inline, stored with the end (#12)."""
        now = self.clock.time()
        current = await self.get(job.id)
        if (
            current.gpus
            and current.state in (JobState.RUNNING, JobState.SUSPENDED)
            and current.started_at
        ):
            # Fair share counts from when the process started, within milliseconds of when
            # the GPUs were handed out (the ledger's accounting has the exact figure),
            # less its suspended time (#13).
            self.usage.add(
                current.owner, _charged_from(current, now), now, len(current.gpus), now=now
            )
        fields: dict[str, object] = {}
        rec = self.jobs.get(job.id)
        dispatched = rec.dispatched_at if rec is not None else None
        if rec is not None:
            rec.dispatched_at = None
        user_start = began if began_known else await self._user_start(job.id)
        if dispatched is not None and user_start is not None:
            fields["startup"] = round(max(0.0, user_start - dispatched), 6)
        steps = after(current, f, now, self.retry_policy, fields=fields)
        new = await self._advance(job.id, *steps, synced=False, result=result, wake=wake)
        log.info("job %s %s%s", job.id, f.state.value, f": {f.error}" if f.error else "")
        return new

    # -- job files, on a worker thread (gpud.daemon.jobfiles) ------------------------------

    async def _prepare_job_dir(
        self,
        job: Job,
        function: bytes,
        args: bytes,
        ident: JobIdentity,
        *,
        payload_files: bool = True,
    ) -> LaunchSpec:
        # A dependency's small warm result is in the ledger, not in a result.pkl (#12).
        stored = (await self.ledger.read(deps_results, list(job.deps))) if job.deps else None

        def lay_out() -> LaunchSpec:
            return jobfiles.prepare_job_dir(
                self.config.jobs_dir,
                job,
                function,
                args,
                ident,
                self.gpus,
                payload_files=payload_files,
                stored=stored,
            )

        if not job.deps and (not payload_files or len(function) + len(args) <= INLINE_LAYOUT_BYTES):
            # A directory without dependencies' results is a dozen metadata calls (mkdir,
            # unlinks, the log's open, chown) and, for a cold job, its small payload
            # written into the page cache (no fsync): cheaper here than the thread trip
            # and the loop's wake-up, which were most of a start's cost (#12).
            return lay_out()
        return await trio.to_thread.run_sync(lay_out)

    async def _collect(self, job: Job, outcome: Outcome) -> Finished:
        return await trio.to_thread.run_sync(
            jobfiles.collect, self.config.jobs_dir, self.config.data_dir, job, outcome
        )

    async def _user_start(self, job_id: int) -> float | None:
        return await trio.to_thread.run_sync(jobfiles.user_start, self.config.jobs_dir, job_id)

    # -- warm workers -----------------------------------------------------------------------

    def _release_warm(self, rec: JobRecord) -> None:
        """A job matched to a warm worker did not start in it after all: the worker is
        free. Takes the record itself: the job may have ended (and left ``jobs``)."""
        w, rec.assigned = rec.assigned, None
        if w is not None and w.busy == rec.job.id:
            w.busy = None
            w.idle_since = self.clock.monotonic()

    async def _end_warm(self, w: WarmWorker, why: str) -> None:
        assert self.warm is not None
        log.info("ending warm worker %s (last job %s): %s", w.id, w.last_job, why)
        await self.warm.close(w)
        if w.handle is not None:
            # Closed, it ends on its own after its @gpud.exit methods (#14): give it the
            # stop grace for them before the kill.
            try:
                with trio.move_on_after(min(self.config.kill_grace, 10.0)):
                    await self.executor.wait(w.handle)
            finally:
                # Even when the daemon is stopping (this task cancelled): a worker ended is
                # reaped, so no process or container of a finished job is left behind.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.executor.reap, w.handle)
                    with trio.move_on_after(5):
                        await self.executor.wait(w.handle)  # collect it: no zombie

    def gpu_holders(self) -> dict[str, Job]:
        """GPU UUID -> the job holding it; an idle warm worker holds its GPUs in the name
        of the last job it ran (`gpud gpus` shows that job and its owner)."""
        held: dict[str, Job] = {}
        for w in self.warm.workers.values() if self.warm is not None else ():
            if w.idle and w.gpus:
                last = Job(
                    id=w.last_job,
                    function="(warm worker)",
                    state=JobState.RUNNING,
                    submitted_at=0.0,
                    owner=w.key[3],
                    gpus=w.gpus,
                )
                held.update((u, last) for u in w.gpus)
        held.update(
            (u, r.job)
            for r in self.jobs.values()
            if r.job.state not in (JobState.QUEUED, JobState.SUSPENDED)
            for u in r.job.gpus
        )
        return held

    def _snapshot_gpus(self, job: Job) -> str:
        """The GPU part of a snapshot key: type and count; the UUIDs themselves where real
        devices go into the container (they are part of what a restore brings back)."""
        types = {g.uuid: g for g in self.gpus}
        if job.gpus and not all(types[u].fake for u in job.gpus if u in types):
            return ",".join(job.gpus)
        return ",".join(sorted(types[u].type for u in job.gpus if u in types))

    async def _load_usage(self) -> None:
        """Decayed GPU-seconds per user from the ledger (what ended in the last 30
        half-lives; older usage has decayed below a billionth)."""
        now = self.clock.time()
        since = now - 30 * self.config.fairshare_half_life
        for span in await self.ledger.call(finished_gpu_intervals, since):
            self.usage.add(span.owner, span.started_at, span.ended_at, 1, now=now)

    def _usage_now(self, running: Sequence[Job], now: float) -> dict[str, float]:
        """Decayed GPU-seconds per user now: what ended, plus what runs so far."""
        usage = self.usage.at(now)
        for j in running:
            if j.gpus and j.state is JobState.RUNNING and j.started_at is not None:
                usage[j.owner] = usage.get(j.owner, 0.0) + interval_usage(
                    _charged_from(j, now),
                    now,
                    len(j.gpus),
                    now=now,
                    half_life=self.config.fairshare_half_life,
                )
        return usage


def _charged_from(job: Job, now: float) -> float:
    """Where a job's charged GPU time starts: its start, moved by its suspended time so far
    (#13), as if it had been suspended before it ran (decay places it a little early)."""
    assert job.started_at is not None
    suspended = job.suspended_s + (now - job.suspended_at if job.suspended_at else 0.0)
    return min(now, job.started_at + suspended)
