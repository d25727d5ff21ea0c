"""Recovery: after a restart, re-adopt, collect, restart or mark lost what the previous
daemon left."""

from __future__ import annotations

import dataclasses
import logging

import trio

from gpud.daemon import dependencies, jobfiles
from gpud.daemon.record import (
    Finished,
    JobRecord,
)
from gpud.daemon.supervise import Supervision
from gpud.domain import (
    Job,
    JobState,
)
from gpud.executors.base import Outcome
from gpud.ledger import Step
from gpud.ledger.store import Ledger

log = logging.getLogger("gpud")


class Recovery(Supervision):
    async def _recover(self) -> None:
        """Re-adopt what a previous daemon left running, collect what finished while it was
        away, start what it never launched; mark the rest lost (then retry).

        Whatever the ledger last recorded (STARTING or RUNNING), the attempt's process or
        outcome is looked for: its launch is recorded before the executor starts anything
        (attempts.launched_at), and the worker's status.json names its attempt."""
        jobs = await self.ledger.call(Ledger.active)
        assert self._nursery is not None
        await trio.to_thread.run_sync(
            self.executor.cleanup, {j.id for j in jobs}, {j.pid for j in jobs if j.pid}
        )
        # Jobs waiting for dependencies are held again before they enter (#14).
        doomed = await dependencies.admit(self, jobs, active={j.id for j in jobs})
        for job in jobs:
            self.jobs[job.id] = JobRecord(job)
        dependencies.cancel_doomed(self, doomed)
        for job in jobs:
            if job.state is JobState.SUSPENDED:
                await self._recover_suspended(job)  # #13
            elif job.state is not JobState.QUEUED:
                await self._recover_job(job)

    async def _recover_job(self, job: Job) -> None:
        assert self._nursery is not None
        launched = job.state is JobState.RUNNING or await self.ledger.call(
            Ledger.launched, job.id, job.attempt
        )
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
                job = await self._advance(
                    job.id,
                    Step(
                        JobState.RUNNING,
                        "adopted",
                        fields={
                            "pid": handle.pid,
                            "pid_start": handle.pid_start,
                            "started_at": self.clock.time(),
                        },
                    ),
                )
            log.info("job %s adopted after restart (pid %s)", job.id, handle.pid)
            self._nursery.start_soon(self._supervise, job, handle)
            return
        status = await trio.to_thread.run_sync(jobfiles.worker_status, self.config.jobs_dir, job.id)
        if status is not None and status.attempt == job.attempt:
            # It finished while no daemon watched: collect its outcome as usual.
            if job.state is JobState.STARTING:
                began = await self._user_start(job.id)
                job = await self._advance(
                    job.id,
                    Step(
                        JobState.RUNNING,
                        "ran while the daemon was down",
                        fields={"started_at": began or self.clock.time(), "start_kind": "cold"},
                    ),
                )
            done = await self._collect(job, Outcome(exit_code=None))
            log.info("job %s finished while the daemon was down: collected", job.id)
            await self._finish(job, done)
            return
        if job.state is JobState.STARTING and await self._user_start(job.id) is None:
            # Launched, gone, and the user's code never began (the worker writes
            # `started` first thing; the launch removed an earlier attempt's): start again.
            log.info("job %s was launched but never began before the restart: starting it", job.id)
            self._resume_start(job)
            return
        await self._finish(
            job,
            Finished(
                JobState.LOST,
                "the daemon restarted and the job's process was gone",
                None,
                False,
                True,
            ),
        )

    async def _recover_suspended(self, job: Job) -> None:
        """A job suspended when the daemon stopped: its stopped processes are adopted and
        resumed when its GPUs are free; if they are gone, it is lost (#13)."""
        assert self._nursery is not None
        handle = await trio.to_thread.run_sync(
            self.executor.adopt, dataclasses.replace(job, state=JobState.RUNNING)
        )
        if await self.recover_suspended(job, handle):
            assert handle is not None
            self._nursery.start_soon(self._supervise, job, handle)
            return
        status = await trio.to_thread.run_sync(jobfiles.worker_status, self.config.jobs_dir, job.id)
        if status is not None and status.attempt == job.attempt:
            # Its processes ran on and ended while no daemon watched: the daemon died after
            # recording the suspension and before stopping them, or after continuing them
            # and before recording the resume. It finished: collect it, never call it lost
            # (a retry would run it a second time).
            done = await self._collect(job, Outcome(exit_code=None))
            log.info("job %s (suspended) finished while the daemon was down: collected", job.id)
            await self._finish(job, done)
            return
        await self._finish(
            job,
            Finished(
                JobState.LOST,
                "the daemon restarted while the job was suspended, and its process was gone",
                None,
                False,
                True,
            ),
        )

    def _resume_start(self, job: Job) -> None:
        """Carry on starting a STARTING job (its GPUs are still its own) from the launch."""
        assert self._nursery is not None
        self.jobs[job.id].dispatched_at = self.clock.time()
        self._nursery.start_soon(self._supervise, job, None)
