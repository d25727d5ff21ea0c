"""Supervision: one task per started job runs it to its end (a cold process or a warm
worker), stops it on cancel or timeout, and records how it ended."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import cast

import trio

from gpud import longrun
from gpud.crashpoint import crash_point
from gpud.daemon import jobfiles
from gpud.daemon.record import (
    Finished,
    JobRecord,
    _fmt_seconds,
    _served,
    _task_env,
)
from gpud.daemon.suspend import Suspending, deadline
from gpud.domain import (
    FINAL,
    Job,
    JobState,
)
from gpud.executors.base import ArrayCapable, Handle, LaunchSpec, Outcome
from gpud.executors.process import JobIdentity
from gpud.ledger import Step
from gpud.ledger.store import Ledger
from gpud.storage import is_full, persist
from gpud.users import run_as
from gpud.warm import Done, WarmWorker, first_of, warm_key
from gpud_client.jobdir import WorkerStatus, parse_status

log = logging.getLogger("gpud")


class Supervision(Suspending):
    async def _supervise(self, job: Job, handle: Handle | None) -> None:
        """Run one job to its end; an unexpected error fails the job, never the daemon."""
        rec = self.jobs.get(job.id)
        if rec is None:
            return  # it ended before its supervisor began
        # This supervisor's own scope and warm reservation: after a retry the job may be
        # started again (a new supervisor) before this one's cleanup runs.
        scope = rec.scope = trio.CancelScope()
        assigned = rec.assigned
        try:
            await self._run_job(job, handle, scope)
        except Exception:  # noqa: BLE001 - a bug must fail this job, not the daemon
            log.exception("internal error while supervising job %s", job.id)
            live = rec.handle or handle
            if live is not None:
                await trio.to_thread.run_sync(self.executor.reap, live)
            try:
                current = await self.get(job.id)
                if current.state not in FINAL and current.state is not JobState.QUEUED:
                    await self._finish(
                        current,
                        Finished(
                            JobState.FAILED,
                            "gpud hit an internal error while running this job; "
                            "see the daemon's log",
                            None,
                            False,
                            False,
                        ),
                    )
            except Exception:  # noqa: BLE001 - logged; cleanup below must still run
                log.exception("could not record the failure of job %s", job.id)
        finally:
            if assigned is not None and rec.assigned is assigned:
                self._release_warm(rec)  # matched to a warm worker but never ran in it
            if rec.scope is scope:
                rec.scope, rec.handle, rec.stop_reason = None, None, None
                rec.staged = None

    async def _run_job(self, job: Job, handle: Handle | None, scope: trio.CancelScope) -> None:
        job_id = job.id
        rec = self.jobs[job_id]
        if handle is None and _served(job) and self.warm is not None and rec.stop_reason is None:
            await self._run_warm(job, scope)
            return
        if handle is None:
            if rec.stop_reason is not None:
                await self._finish(
                    job, Finished(JobState.CANCELLED, "cancelled", None, False, False)
                )
                return
            try:
                handle = await self._launch(job)
            except Exception as e:  # noqa: BLE001 - any launch failure is the job's failure
                _log_start_failure(job_id, e)
                await self._finish(
                    job,
                    Finished(JobState.FAILED, f"could not start the job: {e}", None, False, True),
                )
                return
            rec.handle = handle
            job = await self._advance(
                job_id,
                Step(
                    JobState.RUNNING,
                    "running",
                    fields={
                        "pid": handle.pid,
                        "pid_start": handle.pid_start,
                        "started_at": self.clock.time(),
                        "start_kind": "cold",
                    },
                ),
                synced=False,
            )
            log.info(
                "job %s started: pid %s, gpus %s", job_id, handle.pid, ",".join(job.gpus) or "none"
            )
        rec.handle = handle
        # Moved by its suspended time; none while it is suspended (#13).
        scope.deadline = deadline(rec.job, self.clock.time(), trio.current_time())
        outcome: Outcome | None = None
        warn = longrun.start_warning(
            self._nursery,
            self.executor,
            job,
            handle,
            scope,
            self.config.jobs_dir / str(job_id) / "output.log",
        )
        try:
            with scope:
                if self.caps.arrays:
                    # Slurm (#15): a job pending in Slurm has not begun; its timeout counts
                    # from when Slurm starts it (the ledger's start, for an adopted one
                    # Slurm already ran).
                    scope.deadline = math.inf
                    ex = cast(ArrayCapable, self.executor)
                    timed = rec.job
                    if await ex.until_started(handle):
                        timed = dataclasses.replace(timed, started_at=self.clock.time())
                    scope.deadline = deadline(timed, self.clock.time(), trio.current_time())
                outcome = await self.executor.wait(handle)
        finally:
            if warn is not None:
                warn.cancel()
        if outcome is None:
            await self._stop_and_finish(job, handle)
        else:
            crash_point("before_finish")
            collect = functools.partial(
                jobfiles.reap_and_collect,
                lambda: self.executor.reap(handle),
                self.config.jobs_dir,
                self.config.data_dir,
                job,
                outcome,
            )
            if self.caps.quick_reap:
                # A killpg and two small reads: cheaper here than the thread trip (#12).
                ended, began = collect()
            else:
                ended, began = await trio.to_thread.run_sync(collect)
            await self._finish(job, ended, began=began, began_known=True)

    async def _stop_and_finish(self, job: Job, handle: Handle) -> None:
        """The job's cancel scope fired: stop it (TERM, grace, KILL) and record why."""
        rec = self.jobs.get(job.id)
        stop_as = (rec.stop_reason if rec is not None else None) or JobState.TIMED_OUT
        await self.stop_signal_hook(job, handle)  # a suspended job must see its SIGTERM
        grace = longrun.grace_of(job, self.config)
        killed = await self.executor.stop(handle, grace)
        why = (
            "cancelled"
            if stop_as is JobState.CANCELLED
            else "its GPU state could not be brought back after a suspension (see the daemon's log)"
            if stop_as is JobState.FAILED  # gpud.daemon.suspend (#13)
            else f"timed out after {_fmt_seconds(job.timeout)}"
        )
        why = longrun.stop_text(why, stop_as, killed, grace)  # which signal ended it (#14)
        await self._finish(job, Finished(stop_as, why, None, False, False))

    async def _run_warm(self, job: Job, scope: trio.CancelScope) -> None:
        """Run a keep_warm (or snapshot) job in a warm worker: the one the scheduler
        matched, one restored from its snapshot, or a new one that then stays for the
        next call."""
        assert self.warm is not None
        rec = self.jobs[job.id]
        w, rec.assigned = rec.assigned, None
        kind, note, take = "warm" if w is not None else "cold", "", None
        running: Job | None = None
        function = args = b""
        try:
            # As for a cold job: its submitter's Unix user on a root daemon; the warm
            # worker is launched with this spec, so it runs as them too.
            # A matched worker runs as the user it was started for (same owner, by its
            # key): no account lookup per call (#12).
            ident = (
                w.ident
                if w is not None and isinstance(w.ident, JobIdentity)
                else run_as(job.owner, self.identity)
            )
            staged, rec.staged = rec.staged, None
            if isinstance(staged, Exception):
                raise staged
            if w is not None and isinstance(staged, tuple):
                # Got ready while its start was committed (_start_warm).
                spec, (function, args) = staged
                running = job
            elif w is not None and self.parking.holds(w):
                # Parked in host memory (#13): restore its GPU state first; a worker that
                # cannot be brought back is ended and the call starts cold.
                kind = "unparked"
                why = await self.parking.unpark(self, w)
                if why is not None:
                    w, kind, note = None, "cold", why
            if running is not None:
                pass
            elif w is not None:
                crash_point("warm_worker_ready")
                spec, running, (function, args) = await self._lay_out_while_running(
                    job, ident, w, kind
                )
            else:
                function, args = await self._payload(job.id)
                # The payload goes to the worker over the hub (#12); a snapshot's worker
                # still loads its function from the directory for its setup.
                spec = await self._prepare_job_dir(
                    job, function, args, ident, payload_files=job.snapshot
                )
                if job.snapshot and self.snapshots is not None:
                    plan = await self.snapshots.plan(job, spec, self._new_warm_worker)
                    w, kind, note, take = plan.worker, plan.kind, plan.note, plan.take
                else:
                    if job.snapshot:
                        note = f"snapshots need the Podman executor, not {self.executor.name}"
                    w = await self._new_warm_worker(job, spec)
                w.ident = ident
        except Exception as e:  # noqa: BLE001 - any start-up failure is the job's failure
            _log_start_failure(job.id, e)
            if w is not None and kind in ("warm", "unparked"):  # it stays for the next job
                w.busy, w.idle_since = None, self.clock.monotonic()
            await self._finish(
                job, Finished(JobState.FAILED, f"could not start the job: {e}", None, False, True)
            )
            return
        assert w is not None and w.handle is not None
        if running is not None:
            job = running
        else:
            crash_point("warm_worker_ready")
            rec.handle = w.handle
            job = await self._advance(job.id, self._running_step(w, kind, note), synced=False)
        scope.deadline = deadline(rec.job, self.clock.time(), trio.current_time())
        done: Done | None = None
        finished = False
        task_dir = self.executor.task_dir(spec.job_dir)
        meta = {
            "job_id": job.id,
            "name": job.function,
            "python": job.python,
            "attempt": job.attempt,
        }
        warn = longrun.start_warning(
            self._nursery, self.executor, job, w.handle, scope, spec.log_path
        )
        try:
            with scope:
                if take is not None and self.snapshots is not None:
                    await self.snapshots.take(w, job, take, task_dir)
                done = await self.warm.run(
                    w,
                    job.id,
                    task_dir,
                    keep_warm=job.keep_warm,
                    env={**_task_env(job), **longrun.task_env(job, task_dir)},
                    payload=(meta, function, args),
                )
                finished = True
                crash_point("before_finish")
        finally:
            if warn is not None:
                warn.cancel()
            if take is not None and self.snapshots is not None:
                await self.snapshots.settle(take, job.id)
        if not finished:
            # Cancelled or out of time: the worker goes with the job.
            self.warm.forget(w)
            await self._stop_and_finish(job, w.handle)
            return
        code = done.code if done is not None else None
        if code is None:  # the worker died during the job
            self.warm.forget(w)
            await trio.to_thread.run_sync(self.executor.reap, w.handle)
            with trio.move_on_after(5):
                await self.executor.wait(w.handle)  # collect it: no zombie left per crash
        outcome = Outcome(exit_code=code)
        status = _inline_status(done, job)
        if status is not None:
            # Said inline, after the worker wrote and synced result.pkl and status.json:
            # no file to read back, no thread hop (#12).
            _f = jobfiles.judge(self.config.data_dir, status, True, outcome)
            assert done is not None
            # No await since the answer came (the worker is idle, none other took it): the
            # loop may hand it its next call now, beside this end (#12, pipelining).
            stays = code in (0, 1) and job.keep_warm > 0
            await self._finish_warm(job, _f, w, stays, began=done.started, result=done.result)
            if done.result is not None:
                # Stored with the job's end: the worker may forget it. Had this daemon
                # died before the commit, the worker would have written result.pkl and
                # status.json for the next one to collect (gpud_client.worker.serve).
                crash_point("before_warm_ack")
                await self.warm.ack(w, job.id)
        else:
            _f = await self._collect(job, outcome)
            await self._finish(job, _f)
        if code is not None and code != 0 and code != 1:
            await self._end_warm(w, f"job {job.id} ended with exit code {code}")
        elif code is not None and job.keep_warm <= 0:
            await self._end_warm(w, f"job {job.id} is over and keep_warm is 0")

    async def _finish_warm(
        self,
        job: Job,
        f: Finished,
        w: WarmWorker,
        stays: bool,
        *,
        began: float | None,
        result: bytes | None,
    ) -> None:
        """Record the end of a call a warm worker answered inline (``stays``: the worker
        stays for the next call). The scheduling loop overrides this to hand the worker
        its next call in the same step (gpud.daemon.loop)."""
        await self._finish(job, f, began=began, began_known=True, result=result)

    def _running_step(self, w: WarmWorker, kind: str, note: str) -> Step:
        assert w.handle is not None
        why = f"running ({kind}{': ' + note if note else ''})"
        return Step(
            JobState.RUNNING,
            why,
            fields={
                "pid": w.handle.pid,
                "pid_start": w.handle.pid_start,
                "started_at": self.clock.time(),
                "start_kind": kind,
            },
        )

    async def _start_warm(
        self,
        rec: JobRecord,
        w: WarmWorker,
        starting: Step,
        gpus: tuple[str, ...],
        *,
        wake: bool = True,
    ) -> Job:
        """Start a queued job in the idle warm worker matched to it: STARTING and RUNNING
        in one commit (``expect`` QUEUED: its errors are the caller's, as for any start),
        while its directory is laid out (a worker thread) and its payload read (the
        ledger's read connection), side by side (#12). Those two's result, or their error
        (the job's failure to start, told by its supervisor), is left in ``rec.staged``.
        The task is sent only after the commit, so the ledger has the change before it is
        acted on; a crash in between leaves a RUNNING job that never reached the worker,
        recovered as any running job whose daemon died."""
        # As the STARTING step will make it: its GPUs, and its next attempt.
        job = dataclasses.replace(rec.job, gpus=gpus, attempt=rec.job.attempt + 1)
        payload: list[tuple[bytes, bytes]] = []
        spec: list[LaunchSpec] = []
        errors: list[Exception] = []

        async def read_payload() -> None:
            try:
                payload.append(await self._payload(job.id))
            except Exception as e:  # noqa: BLE001 - told by the supervisor
                errors.append(e)

        async def lay_out() -> None:
            try:
                ident = (
                    w.ident
                    if isinstance(w.ident, JobIdentity)
                    else run_as(job.owner, self.identity)
                )
                # The payload goes over the hub: no payload files to write.
                spec.append(await self._prepare_job_dir(job, b"", b"", ident, payload_files=False))
            except Exception as e:  # noqa: BLE001 - told by the supervisor
                errors.append(e)

        started: list[Job] = []
        failed: list[Exception] = []
        async with trio.open_nursery() as n:
            n.start_soon(read_payload)
            n.start_soon(lay_out)
            try:
                started.append(
                    await self._advance(
                        job.id,
                        starting,
                        self._running_step(w, "warm", ""),
                        expect=JobState.QUEUED,
                        retry=False,
                        synced=False,
                        wake=wake,
                    )
                )
            except Exception as e:  # noqa: BLE001 - raised below, outside the nursery
                failed.append(e)
        if failed:
            raise failed[0]
        rec.staged = errors[0] if errors else (spec[0], payload[0])
        return started[0]

    async def _lay_out_while_running(
        self, job: Job, ident: JobIdentity, w: WarmWorker, kind: str = "warm"
    ) -> tuple[LaunchSpec, Job, tuple[bytes, bytes]]:
        """For a job matched to an idle warm worker, whose pid is known already: record
        RUNNING while its directory is laid out and its payload read (on the ledger's read
        connection), side by side (#12). The task is sent only once all are done, so the
        ledger still has the change before it is acted on; a crash in between leaves a
        RUNNING job that never reached the worker, as a crash between the two steps in
        turn did."""
        self.jobs[job.id].handle = w.handle
        step = self._running_step(w, kind, "")
        recorded: list[Job] = []
        payload: list[tuple[bytes, bytes]] = []
        errors: list[Exception] = []

        async def record() -> None:
            try:
                recorded.append(await self._advance(job.id, step, synced=False))
            except Exception as e:  # noqa: BLE001 - raised below, outside the nursery
                errors.append(e)

        async def read_payload() -> None:
            try:
                payload.append(await self._payload(job.id))
            except Exception as e:  # noqa: BLE001 - raised below, outside the nursery
                errors.append(e)

        spec: LaunchSpec | None = None
        async with trio.open_nursery() as n:
            n.start_soon(record)
            n.start_soon(read_payload)
            try:
                # The payload goes over the hub: no payload files to write.
                spec = await self._prepare_job_dir(job, b"", b"", ident, payload_files=False)
            except Exception as e:  # noqa: BLE001 - raised below, outside the nursery
                errors.append(e)
        if errors:
            raise errors[0]
        assert spec is not None
        return spec, recorded[0], payload[0]

    async def _payload(self, job_id: int) -> tuple[bytes, bytes]:
        """A job's function and arguments: kept in memory since its submit, else read on
        the ledger's read connection (#12)."""
        hit = self.payloads.pop(job_id)
        return hit if hit is not None else await self.ledger.read(Ledger.payload, job_id)

    async def _new_warm_worker(
        self, job: Job, spec: LaunchSpec, snapshot: Path | None = None
    ) -> WarmWorker:
        """Launch a new warm worker for the job (``snapshot``: its container is to be
        checkpointed into this directory) and wait for its hello."""
        assert self.warm is not None
        w = self.warm.new_worker(warm_key(job), job.gpus, job.keep_warm, busy=job.id)
        spec = dataclasses.replace(spec, serve=(str(self.warm.path), w.token), snapshot=snapshot)
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

    async def _launch(self, job: Job) -> Handle:
        # From memory since its submit, else on the read connection: not behind the
        # writer's group of commits (#12). The payload was committed with the submit.
        function, args = await self._payload(job.id)
        # Its submitter's Unix user on a root daemon (never root); a job whose owner lost
        # their account since submitting fails here, saying so.
        ident = run_as(job.owner, self.identity)
        spec = await self._prepare_job_dir(job, function, args, ident)
        crash_point("before_launch")
        # Durable before anything starts: after a crash, an attempt without this record
        # never ran (start it), one with it may have (look for its process and outcome).
        await persist(
            lambda: self.ledger.call(Ledger.mark_launched, job.id, job.attempt, self.clock.time()),
            f"the launch of job {job.id}",
        )
        crash_point("after_mark_launched")
        with trio.CancelScope(shield=True):
            handle = await self.executor.launch(spec)
        crash_point("after_launch")
        return handle

    async def _warm_loop(self) -> None:
        """End warm workers whose keep_warm ran out."""
        assert self.warm is not None
        while True:
            await trio.sleep(0.5)
            for h in self.warm.take_lost():  # idle workers that died on their own
                await trio.to_thread.run_sync(self.executor.reap, h)
            await self.parking.tick(self)  # parked ones that died or ran out (#13)
            await self.warm.flush_acks()  # stored results no next task told of (#12)
            expired = self.warm.expired(self.clock.monotonic())
            for w in expired:
                await self._end_warm(w, f"idle for {w.keep_warm:g} s")
            if expired:
                self._reschedule()


def _inline_status(done: Done | None, job: Job) -> WorkerStatus | None:
    """The status a warm worker sent with its answer, if it is this attempt's."""
    if done is None or done.code is None or done.status is None:
        return None
    try:
        status = parse_status(done.status, f"job {job.id}'s inline status")
    except ValueError:
        return None
    return status if status.attempt == job.attempt else None


def _log_start_failure(job_id: int, e: Exception) -> None:
    """A full disk is the admin's to fix, not a bug: one line, no traceback (the job's
    error says the same); anything else gets its traceback."""
    if is_full(e):
        log.warning("job %s could not start: %s", job_id, e)
    else:
        log.exception("job %s could not start", job_id)
