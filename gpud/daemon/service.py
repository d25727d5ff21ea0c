"""The daemon: the operations the API calls, and run(), which starts every role."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import cast

import trio

from gpud import __version__, longrun, queue_view
from gpud.crashpoint import crash_point, pause_point
from gpud.daemon import dependencies, stats
from gpud.daemon.gpupoll import GpuPolling
from gpud.daemon.hotcache import PAYLOAD_COUNT
from gpud.daemon.loop import SchedulingLoop
from gpud.daemon.parking import kill_leftovers
from gpud.daemon.record import (
    ExecutorDown,
    SubmitError,
    _fmt_seconds,
    _get_many,
)
from gpud.daemon.recovery import Recovery
from gpud.daemon.results import read_results
from gpud.deps import check_after
from gpud.domain import (
    FINAL,
    GpuRequest,
    IllegalTransition,
    Job,
    JobState,
    PythonEnv,
    Wait,
)
from gpud.executors.base import ExecutorRefusal, InterpreterCapable
from gpud.images import Build
from gpud.ledger import Event, IdempotencyKey, NewJob, Replay, Step
from gpud.ledger import snapshots as snapshot_store
from gpud.ledger.batches import BatchRow, batch_job_ids, batch_jobs, batch_row, batch_states
from gpud.ledger.deps import owners_and_states
from gpud.ledger.snapshots import Snapshot
from gpud.ledger.store import Ledger, all_alike
from gpud.ledger.usage import AttemptUsage, UsageBucket, attempts_between, buckets_between
from gpud.promtext import Family
from gpud.retention import for_daemon as retention_for
from gpud.retention import run as retention_loop
from gpud.scheduler import infeasible
from gpud.users import NoUnixAccount, run_as
from gpud_client.jobdir import (
    RESULT_FILE,
)
from gpud_client.models import GcReport, ImageSpec

log = logging.getLogger("gpud")

#: Jobs of a submit filed into memory per event-loop step (about 10 us each).
FILE_CHUNK = 1000


class Daemon(SchedulingLoop, Recovery, GpuPolling):
    async def check_submittable(
        self,
        gpu: GpuRequest | None,
        python: str,
        job_timeout: float,
        image: str | None,
        *,
        python_path: str | None = None,
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
        own = python_path not in (None, "daemon") and self.caps.job_python
        if theirs != mine and not own:
            where = f"image {resolved} has" if resolved else "this daemon's workers run"
            fix = (
                f"use an image with Python {theirs}"
                if resolved
                else f"have the admin set `python` in the daemon's config to a Python {theirs} "
                "interpreter"
            )
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

    async def resolve_python(
        self, owner: str, python: str, python_path: str | None, python_prefix: str | None
    ) -> PythonEnv | None:
        """The interpreter a job of ``owner`` runs with (process executor, #11), checked
        as the user it runs as; None where the executor picks it (a container's)."""
        if not self.caps.job_python:
            return None
        executor = cast(InterpreterCapable, self.executor)
        try:
            ident = run_as(owner, self.identity)
        except NoUnixAccount as e:
            raise SubmitError(str(e)) from None
        try:
            return await executor.resolve_python(
                python_path, version=python, prefix=python_prefix, ident=ident, owner=owner
            )
        except ExecutorRefusal as e:
            raise SubmitError(str(e)) from None

    async def check_after(self, owner: str, ids: Sequence[int]) -> str | None:
        """Why a submit may not name these jobs in ``after`` (#14; None: it may)."""
        found = await self.ledger.call(owners_and_states, ids)
        return check_after(owner, ids, found)

    async def submit(
        self,
        jobs: Sequence[NewJob],
        function: bytes,
        *,
        batch: bool = False,
        idempotency: IdempotencyKey | None = None,
        max_concurrency: int | None = None,
    ) -> tuple[int | None, list[Job]]:
        """Store and queue jobs; with a key its owner used before, return the jobs that
        key's first submit made instead (nothing new is queued). Raises KeyReused."""
        now = self.clock.time()
        try:
            # The jobs are read back in the same trip, inside the submit's transaction
            # (#12); the answer still comes only after its synced COMMIT.
            batch_id, made = await self.ledger.call(
                _submit_and_get,
                jobs,
                function,
                now,
                batch=batch,
                idempotency=idempotency,
                max_concurrency=max_concurrency,
            )
        except Replay as r:
            return r.batch_id, await self.ledger.call(_get_many, r.ids)
        crash_point("after_submit")
        # Durable now: only after the COMMIT do they exist for anyone else. From here on
        # nothing may stop them entering memory (not even this request's cancellation:
        # a client that hangs up), or they would wait in the ledger for a restart.
        with trio.CancelScope(shield=True):
            if batch_id is not None and max_concurrency is not None:
                self.batches.note(batch_id, max_concurrency)
            doomed = await dependencies.admit(self, made)  # held before they enter (#14)
            # Found by id from this step on; filed a chunk at a time (#12, gpud.pending).
            self.jobs.arrive(made)
            dependencies.cancel_doomed(self, doomed)
            await self._file_arrived([j.id for j in made], jobs, function)
        return batch_id, made

    async def _file_arrived(
        self, ids: Sequence[int], jobs: Sequence[NewJob], function: bytes
    ) -> None:
        """File jobs that arrived (:meth:`ActiveJobs.arrive`), a chunk per loop step: a
        batch of 100,000 was one step of over a second, in which no other request was
        answered (#12). The scheduler has each chunk as it is filed."""
        for i in range(0, len(ids), FILE_CHUNK):
            if i:
                await trio.lowlevel.checkpoint()
                crash_point("mid_filing")
                await pause_point("mid_filing")
            chunk = ids[i : i + FILE_CHUNK]
            for job_id, new in zip(chunk, jobs[i : i + FILE_CHUNK], strict=False):
                # Handed to its warm worker, or written into a cold job's directory, from
                # memory at its start, not read back (#12): only the batch's first inputs
                # (more would push them out), and only one still arriving (one looked up
                # meanwhile may have started or ended already; it reads the ledger).
                if (
                    i < PAYLOAD_COUNT
                    and not new.snapshot
                    and not new.deps
                    and self.jobs.arriving(job_id)
                ):
                    self.payloads.put(job_id, function, new.args)
            self.jobs.file(chunk)
            self._reschedule()
        self.heap.filed(len(ids))

    async def replay(self, key: IdempotencyKey) -> tuple[int | None, list[Job]] | None:
        """The jobs an earlier submit with this key made, or None if it is new."""
        # A read, on the read connection: not behind the writer's group of commits and
        # its fsync (#12). A key committed before this read began is seen; one committed
        # meanwhile (two submits with one key at once) is caught by the submit itself,
        # which checks the key again under the write lock.
        try:
            await self.ledger.read(Ledger.replay, key, self.clock.time())
        except Replay as r:
            return r.batch_id, await self.ledger.read(_get_many, r.ids)
        return None

    async def cancel(self, job_id: int) -> Job:
        job = await self.get(job_id)
        if job.state in FINAL:
            return job
        if job.state is JobState.QUEUED:
            try:
                return await self._advance(
                    job_id,
                    Step(JobState.CANCELLED, "cancelled"),
                    expect=JobState.QUEUED,
                    retry=False,
                )
            except IllegalTransition:
                pass  # it started in the meantime: stop it instead
        rec = self.jobs.get(job_id)
        if rec is None:  # it ended in the meantime
            return await self.get(job_id)
        # Between the start decision and its supervisor's first step there is no scope
        # yet: the supervisor sees stop_reason and does not start the job.
        rec.stop_reason = JobState.CANCELLED
        if rec.scope is not None:
            rec.scope.cancel()
        return await self.wait_final(job_id, longrun.grace_of(job, self.config) + 15)

    async def wait_final(self, job_id: int, within: float) -> Job:
        deadline = trio.current_time() + within
        while True:
            job = await self.get(job_id)
            if job.state in FINAL:
                return job
            ev = self.changed(job_id)
            with trio.move_on_at(deadline) as cs:
                await ev.wait()
            if cs.cancelled_caught:
                return await self.get(job_id)

    def log_path(self, job_id: int) -> Path:
        return self.config.jobs_dir / str(job_id) / "output.log"

    def result_path(self, job_id: int) -> Path:
        return self.config.jobs_dir / str(job_id) / RESULT_FILE

    async def read_results(
        self, jobs: Sequence[Job], limit: int | None
    ) -> list[tuple[bytes | None, int]]:
        """Each job's (result, if at most ``limit`` bytes; its size): from memory, the
        ledger (a warm job's small result, #12) or the job's result.pkl."""
        return await read_results(self.ledger, self.recent, self.config.jobs_dir, jobs, limit)

    def reason(self, job_id: int) -> tuple[str | None, int | None]:
        held = self.deps.reason(job_id)
        if held is not None:
            return held, None  # not in the scheduler's queue yet: no place in it (#14)
        w = self.wait_of(job_id)
        if w is None:
            return None, None
        return w.reason, w.position

    def wait_of(self, job_id: int) -> Wait | None:
        """Why a queued job waits and its position, as of the last scheduling round:
        read on its own, without working out the rest of the queue's (#12)."""
        return (
            self.parking.wait_of(job_id)  # its call waits to unpark a worker (#13)
            or queue_view.wait_of(self.waits, self.jobs.pending, job_id)
            or self.batches.wait_of(job_id, len(self.jobs.pending))
        )

    def queue_page(self, offset: int, limit: int) -> tuple[list[tuple[Job, Wait | None]], int]:
        """A page of the queue in scheduling order, each job with its wait, and how many
        are queued: O(offset + limit), not O(queued) (#12)."""
        rows, total = queue_view.page(self.waits, self.jobs.pending, offset, limit)
        if self.parking.waits:  # calls waiting to unpark a worker (#13)
            rows = [(j, self.parking.wait_of(j.id) or w) for j, w in rows]
        return rows, total

    def active_job(self, job_id: int) -> Job | None:
        """The job if it is queued, starting or running (every such job is in memory);
        None once it is final, or if there is no such job."""
        rec = self.jobs.get(job_id)
        return rec.job if rec is not None else None

    def queued(self) -> list[Job]:
        """The queued jobs in memory (submitted, not yet started)."""
        filed = [r.job for r in self.jobs.values() if r.job.state is JobState.QUEUED]
        return filed + self.jobs.unfiled()

    def queued_count(self, owner: str) -> int:
        # O(1): kept by the queue index (#12) and the dependency index (#14)
        return self.jobs.queued_by(owner) + self.deps.held_by(owner)

    def fresher(self, jobs: Sequence[Job]) -> list[Job]:
        """Jobs read from the ledger, each replaced by the daemon's own copy where it has
        one: memory is fresher than a read racing a commit."""
        return [r.job if (r := self.jobs.get(j.id)) is not None else j for j in jobs]

    # -- reads the API makes of the ledger (it never calls the ledger itself) -------------

    async def list_jobs(
        self,
        states: Iterable[JobState] | None,
        *,
        limit: int,
        before: int | None,
        owner: str | None,
    ) -> list[Job]:
        """A page of jobs, newest first, each in its freshest version."""
        jobs = await self.ledger.read(
            Ledger.list_jobs, states, limit=limit, before=before, owner=owner
        )
        return self.fresher(jobs)

    async def batch_row(self, batch_id: int) -> BatchRow | None:
        return await self.ledger.call(batch_row, batch_id)

    async def batch_job_ids(self, batch_id: int) -> list[int]:
        """A batch's jobs' ids, in input order."""
        return await self.ledger.call(batch_job_ids, batch_id)

    async def batch_states(self, batch_id: int) -> dict[str, int]:
        return await self.ledger.call(batch_states, batch_id)

    async def batch_jobs(self, ids: list[int]) -> list[Job]:
        """These jobs (as committed), in the order given (missing ones left out): those
        that just ended from memory (#12), the rest in one trip to the ledger."""
        now = self.clock.time()
        found = {i: j for i in ids if (j := self.final.get(i, now)) is not None}
        missing = [i for i in ids if i not in found]
        if missing:
            found.update((j.id, j) for j in await self.ledger.call(batch_jobs, missing))
        return [found[i] for i in ids if i in found]

    async def events_page(
        self, after: int, limit: int, job_id: int | None, owner: str | None
    ) -> tuple[list[Event], int]:
        """Events after a cursor, and the newest event's id (never below the page)."""
        return await self.ledger.call(_events_page, after, limit, job_id, owner)

    async def attempts_between(
        self, since: float, until: float, owner: str | None
    ) -> list[AttemptUsage]:
        return await self.ledger.call(attempts_between, since, until, owner)

    async def buckets_between(
        self, since: float, until: float, owner: str | None
    ) -> list[UsageBucket]:
        """Usage rolled up when retention removed the jobs it came from (#12)."""
        return await self.ledger.call(buckets_between, since, until, owner)

    async def collect_garbage(self, *, dry_run: bool) -> GcReport:
        """Apply the retention settings now (`gpud gc`), or say what that would remove."""
        return await retention_for(self).collect(dry_run=dry_run)

    async def snapshot_records(self, owner: str | None = None) -> list[Snapshot]:
        """The snapshots in the ledger (of one owner, or all)."""
        return await self.ledger.call(snapshot_store.list_snapshots, owner)

    async def delete_snapshot_record(self, snapshot_id: int) -> None:
        """Forget a snapshot the ledger holds (where no snapshotter manages its files)."""
        await self.ledger.call(snapshot_store.delete_snapshot, snapshot_id)

    async def ensure_image(
        self, spec: ImageSpec, files: Mapping[str, bytes], creator: str
    ) -> tuple[Build, bool]:
        """Start (or find) the build of an image definition, in the daemon's nursery."""
        assert self.images is not None and self._nursery is not None
        return await self.images.ensure(spec, files, creator, self._nursery)

    async def metrics(self) -> list[Family]:
        """What GET /metrics shows (#16): read from indexes and counters, never a scan of
        the queued jobs (gpud.daemon.stats)."""
        now = self.clock.time()
        return await stats.collect(
            self.stats,
            jobs=self.jobs,
            deps=self.deps,
            gpus=self.gpus,
            holders=self.gpu_holders(),
            usage=self._usage_now(list(self.jobs.running.values()), now),
            ledger=self.ledger,
            now=now,
            started_at=self.started_at,
            version=__version__,
            executor=self.executor.name,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._refresh_gpus()
                await self.users.refresh()
                await self._load_usage()
                if self.warm is not None:
                    kill_leftovers(self.parking.state_file)  # a dead daemon's parked (#13)
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
                nursery.start_soon(retention_loop, self)
                nursery.start_soon(self.notifier.run)
                nursery.start_soon(self.stats.watch_lag)  # /metrics' event-loop lag (#16)
                task_status.started()
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    # Idle warm workers end with the daemon (busy ones finish their job,
                    # which the next daemon collects); a warm container is removed. Chosen
                    # before the first await: the hub's connections are closing meanwhile.
                    ending = [
                        w.handle
                        for w in (list(self.warm.workers.values()) if self.warm else [])
                        if w.handle is not None and (w.idle or self.kill_jobs_on_exit)
                    ]
                    ending += self.warm.take_lost() if self.warm else []
                    ending += self.parking.end_all()  # killed, never left locked (#13)
                    for h in ending:
                        with trio.move_on_after(10):
                            await trio.to_thread.run_sync(self.executor.reap, h)
                    with trio.move_on_after(5):
                        for h in ending:
                            await self.executor.wait(h)  # collected: no zombie left behind
                if self.kill_jobs_on_exit:
                    for h in self.handles():
                        self.executor.reap(h)


def _submit_and_get(
    ledger: Ledger, jobs: Sequence[NewJob], function: bytes, now: float, **kw: object
) -> tuple[int | None, list[Job]]:
    batch_id, ids = ledger.submit(jobs, function, now, **kw)  # type: ignore[arg-type]  # kw: submit's keywords, from the API
    # A batch's jobs differ in their inputs only: read one, copy it (#12).
    return batch_id, ledger.get_alike(ids) if all_alike(jobs) else ledger.get_many(ids)


def _events_page(
    ledger: Ledger, after: int, limit: int, job_id: int | None, owner: str | None
) -> tuple[list[Event], int]:
    # One trip to the ledger thread for both, so `latest` is never below the page.
    return (
        ledger.events_after(after, limit=limit, job_id=job_id, owner=owner),
        ledger.last_event_id(),
    )
