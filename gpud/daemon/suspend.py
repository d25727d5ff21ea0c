"""Suspend, resume and preemption in the daemon (#13): the trio side of gpud.preempt.

A suspended job's processes are stopped where they are (SIGSTOP to its process group, or
``podman pause`` of its container), its GPUs are free for the scheduler, its timeout
clock is stopped and no GPU time is charged for it. The ledger records the suspension
first and the processes are stopped second; on resume they are continued first and the
ledger records it second: a crash in between leaves a job that the ledger calls suspended
and that may be running, which recovery resumes (SIGCONT is harmless to a running
process), never one it calls running while it is stopped for ever.

GPU state: a job whose GPUs are real keeps its GPU memory when stopped, so it can be
suspended only where a :class:`GpuStateParker` moves that state to host memory (the CUDA
checkpoint module, #13 item 1); without one, only CPU jobs and jobs on fake GPUs can be.
Where a parker is set (the real one, or gpud.testing's fake), every GPU job's state goes
through it, fake GPUs included, so that the fake drives the same path in CPU-only tests.
"""

from __future__ import annotations

import logging
import math
import os
import signal

import trio

from gpud import preempt
from gpud.crashpoint import crash_point
from gpud.daemon.core import DaemonCore
from gpud.daemon.gpustate import GpuStateParker
from gpud.daemon.record import JobRecord
from gpud.domain import SUSPENDABLE_FROM, IllegalTransition, Job, JobState, served
from gpud.executors.base import Handle
from gpud.ledger import Step
from gpud.scheduler import Plan

__all__ = ["GpuStateParker", "NotSuspendable", "Suspending", "deadline"]

log = logging.getLogger("gpud")

#: How long `gpud resume` waits for the job to be running before answering (it waits on
#: for its GPUs after that, and the answer says so).
RESUME_WAIT = 10.0


class NotSuspendable(ValueError):
    """A suspend or resume the job's state or kind does not allow (409); says why."""


class SuspendBook:
    """What the daemon keeps in memory about suspensions."""

    def __init__(self) -> None:
        #: suspended jobs that want to resume -> the preemptor they wait for to leave the
        #: queue first (None: as soon as their GPUs are free)
        self.wanted: dict[int, int | None] = {}
        #: (victim, preemptor) pairs so far: a job is never suspended twice for one job
        self.history: set[tuple[int, int]] = set()
        #: GPUs kept this round for suspended jobs waiting for the rest of theirs
        self.reserved: list[str] = []


def deadline(job: Job, now: float, trio_now: float) -> float:
    """The trio deadline of a job's timeout: its start plus its timeout plus the time it
    spent suspended; none while it is suspended (its clock is stopped)."""
    if job.state is JobState.SUSPENDED:
        return math.inf
    started = (job.started_at if job.started_at is not None else now) + job.suspended_s
    return trio_now + max(0.0, started + job.timeout - now)


class Suspending(DaemonCore):
    #: the GPU state parker, where the driver has one (set by the server; None: CPU only)
    gpu_parker: GpuStateParker | None = None

    @property
    def suspensions(self) -> SuspendBook:
        book = self.__dict__.get("_suspend_book")
        if book is None:
            book = self.__dict__["_suspend_book"] = SuspendBook()
        return book

    # -- what the API calls -----------------------------------------------------------------

    def why_not_suspendable(self, job: Job) -> str | None:
        """Why this job cannot be suspended now, or None if it can."""
        if job.state not in SUSPENDABLE_FROM:
            return f"job {job.id} is {job.state.value}; only running jobs can be suspended"
        if self.executor.name not in ("process", "podman"):
            return f"the {self.executor.name} executor cannot suspend jobs"
        if served(job):
            return (
                f"job {job.id} runs in a warm worker (keep_warm or snapshot): "
                "suspending warm workers is not supported yet"
            )
        rec = self.jobs.get(job.id)
        if rec is None or rec.handle is None:
            return f"job {job.id} has no process to stop yet; try again in a moment"
        fake = {g.uuid for g in self.gpus if g.fake}
        if job.gpus and not set(job.gpus) <= fake and self.gpu_parker is None:
            return (
                f"job {job.id} holds GPUs, and this daemon cannot move GPU state to "
                "host memory (the CUDA checkpoint API needs driver 570 or later; see "
                "`gpud gpus`): only jobs without GPU state can be suspended here"
            )
        return None

    async def suspend(self, job_id: int, reason: str, *, for_job: int | None = None) -> Job:
        """Suspend a running job (raises NotSuspendable, saying why not)."""
        job = await self.get(job_id)
        why = self.why_not_suspendable(job)
        if why is not None:
            raise NotSuspendable(why)
        rec = self.jobs[job_id]
        assert rec.handle is not None
        try:
            job = await self._advance(
                job_id,
                Step(
                    JobState.SUSPENDED,
                    reason,
                    fields={"suspend_reason": reason, "suspended_for": for_job},
                ),
                expect=JobState.RUNNING,
                retry=False,
            )
        except IllegalTransition:
            raise NotSuspendable(f"job {job_id} is no longer running") from None
        crash_point("suspend_recorded")
        if rec.scope is not None:
            rec.scope.deadline = math.inf  # its timeout clock stops
        try:
            await self._stop_processes(rec, job)
        except Exception as e:  # noqa: BLE001 - undo: it runs on, saying why
            log.warning("job %s could not be suspended: %s", job_id, e)
            await self._continue(rec, f"resumed: suspending it failed ({e})")
            raise NotSuspendable(f"job {job_id} could not be suspended: {e}") from None
        self.suspensions.wanted.pop(job_id, None)
        if for_job is not None:
            self.suspensions.history.add((job_id, for_job))
            self.suspensions.wanted[job_id] = for_job
        log.info("job %s %s", job_id, reason)
        return job

    async def resume(self, job_id: int) -> Job:
        """Ask for a suspended job to resume: at once where its GPUs are free, else when
        they are (ahead of newer work of its priority). Waits a little for it."""
        job = await self.get(job_id)
        if job.state is not JobState.SUSPENDED:
            raise NotSuspendable(
                f"job {job_id} is {job.state.value}; only suspended jobs can be resumed"
            )
        self.suspensions.wanted[job_id] = None
        self._reschedule()
        end = trio.current_time() + RESUME_WAIT
        while (job := await self.get(job_id)).state is JobState.SUSPENDED:
            with trio.move_on_at(end) as cs:
                await self.changed(job_id).wait()
            if cs.cancelled_caught:
                break
        return job

    def suspended_note(self, job: Job) -> str | None:
        """What `gpud ps` says of a suspended job: why, and whether it waits to resume."""
        if job.state is not JobState.SUSPENDED:
            return None
        why = job.suspend_reason or "suspended"
        if job.id in self.suspensions.wanted:
            after = self.suspensions.wanted[job.id]
            what = "its GPUs" if job.gpus else "a CPU slot"
            why += (
                f"; resumes when job {after} has started"
                if after is not None and self._queued(after)
                else f"; resumes when {what} free up"
            )
        return why

    # -- the scheduling round's part (gpud.daemon.loop calls these) ---------------------------

    async def resume_round(self, running: list[Job], held: list[str]) -> list[Job]:
        """Resume the suspended jobs whose GPUs are free, before the round hands GPUs out;
        return the jobs holding GPUs for the plan: the running ones (suspended ones
        left out), the resumed ones, and GPUs kept for suspended jobs."""
        suspended = [j for j in running if j.state is JobState.SUSPENDED]
        active = [j for j in running if j.state is not JobState.SUSPENDED]
        book = self.suspensions
        book.reserved = []
        ids = {j.id for j in suspended}
        for i in [i for i in book.wanted if i not in ids]:
            del book.wanted[i]  # ended while suspended
        if not suspended:
            return running
        for j in suspended:
            after = book.wanted.get(j.id)
            if after is not None and not self._queued(after):
                book.wanted[j.id] = None  # its preemptor started (or ended)
        wanted = {i for i, after in book.wanted.items() if after is None}
        r = preempt.resumes(
            suspended, wanted, active, self.gpus, cpu_slots=self.config.cpu_slots, held=held
        )
        for job_id in r.resume:
            rec = self.jobs.get(job_id)
            if rec is None or rec.job.state is not JobState.SUSPENDED:
                continue
            job = await self._continue(rec, "resumed")
            if job.state is JobState.RUNNING:
                active.append(job)
        book.reserved = [u for j in r.reserved for u in j.gpus]
        return [*active, *r.reserved]

    async def preempt_round(self, p: Plan, running: list[Job], now: float) -> float | None:
        """Suspend running jobs for queued ones that waited past preempt_after. Returns
        when the next queued job that outranks a running one reaches preempt_after (the
        loop holds a round then), if one will."""
        after = self.config.preempt_after
        if after is None:
            return None
        started = {s.job_id for s in p.starts} | set(p.assigned)
        low = min(
            (j.priority for j in running if j.state is JobState.RUNNING and j.preemptible),
            default=None,
        )
        if low is None:
            return None
        # The oldest not-started job of each group that outranks some victim: O(groups).
        queued: list[Job] = []
        for g in self.jobs.pending.groups():
            if g.priority <= low:
                continue
            first = next((j for j in g.jobs if j.id not in started), None)
            if first is not None:
                queued.append(first)
        if not queued:
            return None
        queued.sort(key=preempt.order)
        later = [preempt.waited_since(j) + after for j in queued]
        due = min((t for t in later if t > now), default=None)
        holding = [
            j
            for j in self.jobs.running.values()
            if j.state in (JobState.STARTING, JobState.RUNNING)
        ]
        waiting_for = {a for a in self.suspensions.wanted.values() if a is not None}
        choices = preempt.choose(
            queued,
            holding,
            self.gpus,
            now=now,
            preempt_after=after,
            cpu_slots=self.config.cpu_slots,
            history=self.suspensions.history,
            waiting_for=waiting_for,
            held=[*(u for j in p.held for u in j.gpus), *self.suspensions.reserved],
            quotas=self.users.quotas(),
            suspendable=lambda j: self.why_not_suspendable(j) is None,
        )
        for c in choices:
            try:
                await self.suspend(c.victim, c.reason, for_job=c.for_job)
            except NotSuspendable as e:
                # Not tried again for this job (every round would otherwise).
                self.suspensions.history.add((c.victim, c.for_job))
                log.info("job %s not preempted for job %s: %s", c.victim, c.for_job, e)
        if choices:
            self._reschedule()  # the next round hands the freed GPUs out
        return due

    # -- recovery (gpud.daemon.recovery calls this for a SUSPENDED job) ----------------------

    async def recover_suspended(self, job: Job, handle: Handle | None) -> bool:
        """After a restart: a suspended job whose processes are still there waits to
        resume (at once where its GPUs are free); one whose processes are gone is lost.
        Returns whether it was adopted (the caller supervises it)."""
        rec = self.jobs[job.id]
        if handle is None:
            return False
        rec.handle = handle
        if job.suspended_for is not None:
            self.suspensions.history.add((job.id, job.suspended_for))
        self.suspensions.wanted[job.id] = None
        log.info("job %s was suspended at the restart: it resumes when its GPUs are free", job.id)
        return True

    async def stop_signal_hook(self, job: Job, handle: Handle) -> None:
        """Before a suspended job is stopped for good (cancel, timeout): continue its
        processes so that they see SIGTERM (a stopped process does not act on it)."""
        if job.state is JobState.SUSPENDED or self._stored_state(job.id) is JobState.SUSPENDED:
            await self._signal(handle, stop=False)

    # -- the processes -------------------------------------------------------------------------

    def _stored_state(self, job_id: int) -> JobState | None:
        rec = self.jobs.get(job_id)
        return rec.job.state if rec is not None else None

    def _queued(self, job_id: int) -> bool:
        rec = self.jobs.get(job_id)
        return rec is not None and rec.job.state is JobState.QUEUED

    async def _stop_processes(self, rec: JobRecord, job: Job) -> None:
        """GPU state first (the driver's lock waits for the CUDA work in flight, which a
        stopped process still has), then SIGSTOP."""
        # The handle as it is now: the job may end during the park's await, and its
        # supervisor then clears rec.handle (the signal below finds the process gone).
        handle = rec.handle
        assert handle is not None
        if job.gpus and self.gpu_parker is not None:
            await self.gpu_parker.park(job, handle)
        await self._signal(handle, stop=True)

    async def _continue(self, rec: JobRecord, why: str) -> Job:
        """Continue a suspended job's processes (GPU state first), then record RUNNING."""
        job = rec.job
        handle = rec.handle  # kept: the job may end (rec.handle cleared) during the unpark
        if handle is not None:
            if job.gpus and self.gpu_parker is not None:
                try:
                    await self.gpu_parker.unpark(job, handle)
                except Exception as e:  # noqa: BLE001 - it cannot run without its state
                    log.warning("job %s could not get its GPU state back: %s", job.id, e)
                    if rec.scope is not None:
                        rec.stop_reason = JobState.FAILED
                        rec.scope.cancel()
                    return job
            await self._signal(handle, stop=False)
            crash_point("resume_continued")
        self.suspensions.wanted.pop(job.id, None)
        try:
            job = await self._advance(
                job.id, Step(JobState.RUNNING, why), expect=JobState.SUSPENDED
            )
        except IllegalTransition:
            return await self.get(job.id)  # it ended meanwhile
        if rec.scope is not None:
            rec.scope.deadline = deadline(job, self.clock.time(), trio.current_time())
        log.info("job %s %s", job.id, why)
        return job

    async def _signal(self, handle: Handle, *, stop: bool) -> None:
        if handle.container is not None and self.executor.name == "podman":
            # `podman pause` (the cgroup freezer): the container's processes, whatever
            # their process groups. A blocking API call: on a thread.
            await trio.to_thread.run_sync(_pause, self.executor, handle.container, stop)
            return
        try:
            os.killpg(handle.pid, signal.SIGSTOP if stop else signal.SIGCONT)
        except ProcessLookupError:
            if stop:
                raise RuntimeError("its process is gone") from None


def _pause(executor: object, container: str, stop: bool) -> None:
    c = executor.client.containers.get(container)  # type: ignore[attr-defined]  # Podman executor only
    if stop:
        c.pause()
        return
    try:
        c.unpause()
    except Exception as e:  # noqa: BLE001 - not paused (anymore): nothing to undo
        log.debug("unpause of %s: %s", container, e)
