"""The scheduling loop: load -> decide -> apply, one round at a time. Events set one wake-up
event; however many arrive during a round, they make one next round (coalesced)."""

from __future__ import annotations

import logging
import math
import sqlite3
from collections import Counter
from typing import cast

import trio

from gpud.crashpoint import crash_point
from gpud.daemon import jobfiles
from gpud.daemon.record import Finished, JobRecord
from gpud.daemon.supervise import Supervision
from gpud.domain import (
    FINAL,
    IdleWorker,
    IllegalTransition,
    Job,
    JobState,
    Start,
    Wait,
)
from gpud.executors.base import ArrayCapable
from gpud.ledger import Step
from gpud.pending import PendingIndex
from gpud.scheduler import hand_off, plan
from gpud.storage import is_busy, is_full
from gpud.warm import WarmWorker

log = logging.getLogger("gpud")

#: How long a warm call's end waits for a round in progress before it is recorded the
#: old way (waking the next round) instead of handing its worker the next call (#12).
HAND_OFF_WAIT = 0.02


class SchedulingLoop(Supervision):
    async def _schedule_loop(self) -> None:
        last_full = -math.inf
        while True:
            self._wake = trio.Event()
            # Rounds started by events look sched_queue_depth jobs deep; the whole queue
            # is looked at every sched_interval while jobs are queued (Slurm's
            # default_queue_depth and sched_interval, #12).
            full = self.clock.time() - last_full >= self.config.sched_interval
            # Another user's `gpud ps` is answered before more jobs start (#12).
            await self.interactive.yield_to_requests()
            await self._gate.close()
            try:
                next_due = await self._schedule_once(full=full)
            except Exception:  # noqa: BLE001 - a bug in one round must not stop the daemon
                log.exception("a scheduling round failed; retrying in 1 s")
                next_due = self.clock.time() + 1.0
            finally:
                self._gate.open()
            if full:
                last_full = self.clock.time()
            if len(self.jobs.pending):
                due_full = last_full + self.config.sched_interval
                next_due = due_full if next_due is None else min(next_due, due_full)
            if next_due is None:
                await self._wake.wait()
            else:
                with trio.move_on_after(max(0.0, next_due - self.clock.time())):
                    await self._wake.wait()

    async def _schedule_once(self, *, full: bool = True) -> float | None:
        """One round of plan -> apply. Returns when a backoff next expires, if any."""
        now = self.clock.time()
        pending: PendingIndex | list[Job] = self.jobs.pending
        running = list(self.jobs.running.values())
        if self.batches.any_limited() and not self.caps.arrays:
            # max_concurrency (#12): O(queued) only while a limited batch has queued jobs.
            # An array-capable executor (Slurm, #15) enforces it itself, as the array's %N.
            pending = await self.batches.admit(list(pending), running)
        if pending and jobfiles.low_space(self.config.data_dir):
            # A job could not even lay out its directory: keep what space is left for the
            # running jobs' state changes, and look again in a while.
            why = (
                f"the disk holding {self.config.data_dir} is full: no job starts until "
                "space is freed there"
            )
            self.waits = {j.id: Wait(j.id, why, i) for i, j in enumerate(pending, 1)}
            return now + 2.0
        idle = self.warm.idle() if self.warm is not None else []
        # Suspended jobs hold no GPUs; those due to resume get theirs first (#13).
        running = await self.resume_round(running, [u for w in idle for u in w.gpus])
        idle += self.parking.offer(self, self.gpu_holders)  # parked, with a call queued
        usage = self._usage_now(running, now)
        # Warm matching is part of the pure plan, in the same (fair-share) order (#12).
        p = plan(
            pending,
            running,
            self.gpus,
            [IdleWorker(w.id, w.key, w.gpus, w.last_job, w.key[3]) for w in idle],
            cpu_slots=self.config.cpu_slots,
            now=now,
            usage=usage,
            policy=self.policy,
            quotas=self.users.quotas(),
            depth=None if full else self.config.sched_queue_depth,
            previous=self.plan,
        )
        self.plan = p
        workers = {w.id: w for w in idle}
        evictable = [workers[i] for i in p.evictable if not self.parking.holds(workers[i])]
        starts: list[Start] = []
        for job_id, worker_id in p.assigned.items():
            rec = self.jobs.get(job_id)
            if rec is None:
                continue  # ended (cancelled) during this round's earlier starts
            w = workers[worker_id]
            if self.parking.blocked(w, job_id, len(self.parking.waits) + 1):
                continue  # its GPUs are held: the call waits, saying so (#13)
            w.busy = job_id  # reserved now: the next round must not hand it out again
            rec.assigned = w
            starts.append(Start(job_id, w.gpus))
        for d in p.starts:
            # Idle warm workers on these GPUs give way to the job (eviction), first.
            for w in [w for w in evictable if set(w.gpus) & set(d.gpus)]:
                evictable.remove(w)
                await self.parking.give_way(self, w, d.job_id)  # parked, or ended (#13)
            starts.append(d)
        if self.caps.arrays and len(starts) > 1:
            await self._expect_arrays(starts)
        if len(starts) == 1:
            await self._start(starts[0])
        elif starts:
            # Side by side, so that their STARTING commits share one group (#12).
            async with trio.open_nursery() as n:
                for d in starts:
                    n.start_soon(self._start, d)
        self.waits = p.waits  # worked out when first read (#12)
        due = await self.preempt_round(p, running, now)  # #13, with preempt_after set
        backoffs = [p.next_backoff] if p.next_backoff is not None else []
        backoffs += [due] if due is not None else []  # a job's wait reaches preempt_after
        if self._write_blocked:
            self._write_blocked = False
            backoffs.append(now + 1.0)
        return min(backoffs) if backoffs else None

    async def _expect_arrays(self, starts: list[Start]) -> None:
        """Tell an array-capable executor which batch jobs this round starts, so that it
        submits each batch's launches as one array (a Slurm job array, #15)."""
        batch_of = {}
        for d in starts:
            rec = self.jobs.get(d.job_id)
            if rec is not None and rec.job.batch_id is not None:
                batch_of[d.job_id] = rec.job.batch_id
        counts = Counter(batch_of.values())
        batch_of = {j: b for j, b in batch_of.items() if counts[b] > 1}
        if batch_of:
            limits = await self.batches.limits_of(batch_of.values())
            cast(ArrayCapable, self.executor).expect(
                {j: (b, limits.get(b)) for j, b in batch_of.items()}
            )

    async def _start(self, d: Start, *, wake: bool = True) -> None:
        rec = self.jobs.get(d.job_id)
        if rec is None:
            return  # ended while this round was deciding
        if rec.stop_reason is not None:
            self._release_warm(rec)
            return  # cancelled while this round was deciding
        types = {g.uuid: g.type for g in self.gpus}
        fields = {"gpus": d.gpus, "gpu_types": tuple(types.get(u, "unknown") for u in d.gpus)}
        step = Step(JobState.STARTING, fields=fields)
        w = rec.assigned
        try:
            if (
                w is not None
                and w.handle is not None
                and w.stream is not None
                and not self.parking.holds(w)
            ):
                # Matched to an idle warm worker, whose pid is known: STARTING and RUNNING
                # in one commit, its directory and payload made ready meanwhile (#12). A
                # parked one (#13) is unparked first, by its supervisor, before RUNNING.
                crash_point("warm_worker_ready")
                job = await self._start_warm(rec, w, step, d.gpus, wake=wake)
            else:
                job = await self._advance(
                    d.job_id, step, expect=JobState.QUEUED, retry=False, synced=False, wake=wake
                )
        except IllegalTransition as e:  # e.g. cancelled in the meantime
            log.info("job %s not started: %s", d.job_id, e)
            self._release_warm(rec)
            return
        except sqlite3.Error as e:
            if not (is_full(e) or is_busy(e)):
                raise
            # It stays queued; the next round (in 1 s) tries again.
            if not self._write_blocked:
                log.warning("job %s not started: the ledger cannot be written (%s)", d.job_id, e)
            self._write_blocked = True
            self._release_warm(rec)
            return
        assert self._nursery is not None
        if job.state is JobState.RUNNING and w is not None:
            rec.handle = w.handle
        rec.dispatched_at = self.clock.time()
        self._nursery.start_soon(self._supervise, job, None)

    # -- pipelining: a warm worker's next call without a round (#12) ---------------------

    def _hand_off_choice(self, w: WarmWorker, ended: Job) -> JobRecord | None:
        """The queued call that the warm worker whose call ``ended`` just answered takes
        next, reserved for it (no await here); None: the next round decides, as always.

        The choice is the pure :func:`gpud.scheduler.hand_off`: what a round run now
        would give this worker. Left to the round: GPU workers (their GPUs, claims,
        evictions and parking are the round's), snapshot calls, a round running or
        waiting, quick requests being answered (rounds let them go first,
        gpud.priority), a suspended job (its resume comes first), a ledger that could
        not be written, a low disk, and, while a batch has a max_concurrency, a call of
        another batch than the one that ended (it keeps its count; another's may not)."""
        if (
            self._gate.round
            or w.gpus
            or ended.gpu is not None
            or ended.snapshot
            or w.stream is None
            or w.gone.is_set()
            or w.busy is not None
            or self._write_blocked
            or self.interactive.serving
            or not self.jobs.pending
        ):
            return None
        # The slots as they are: a call handed its slot by a hand-off still in flight (whose
        # end may not be in memory yet) holds none; the call it went to holds it (#12).
        moves = self._gate.moves
        running = [j for i, j in self.jobs.running.items() if i != ended.id and i not in moves]
        running += [j for j in moves.values() if j.id not in self.jobs.running]
        if any(j.state is JobState.SUSPENDED for j in running):
            return None
        if jobfiles.low_space(self.config.data_dir):
            return None
        now = self.clock.time()
        job_id = hand_off(
            self.jobs.pending,
            running,
            self.gpus,
            IdleWorker(w.id, w.key, w.gpus, w.last_job, w.key[3]),
            cpu_slots=self.config.cpu_slots,
            now=now,
            usage=self._usage_now(running, now),
            policy=self.policy,
            quotas=self.users.quotas(),
            taken=[j.id for j in moves.values()],
        )
        rec = self.jobs.get(job_id) if job_id is not None else None
        if (
            rec is None
            or rec.assigned is not None
            or rec.stop_reason is not None
            or rec.job.state is not JobState.QUEUED
            or rec.job.snapshot
        ):
            return None
        if (
            self.batches.any_limited()
            and not self.caps.arrays
            and rec.job.batch_id != ended.batch_id
        ):
            return None
        w.busy = rec.job.id  # reserved now, as a round's match does
        rec.assigned = w
        return rec

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
        """A warm call's end, and, where :meth:`_hand_off_choice` names one, the worker's
        next call started in the same step: its STARTING+RUNNING commit beside this end
        (one group of the ledger thread), its task sent as soon as that commit returns,
        with no scheduling round in between (#12). The start is the round's own
        ``_start``: recorded before the worker gets the task, cancellation and failures
        handled as for any start. Neither change wakes a round (the slot went from one
        call to the next); an end that queues a retry, or a start that did not happen,
        does."""
        if stays and self._gate.round:
            # A round runs: decide after it (it may take w), unless it is a long one (one
            # that parks a GPU worker, say): this call's end is not held up for it.
            with trio.move_on_after(HAND_OFF_WAIT):
                await self._gate.opened()
        nxt = self._hand_off_choice(w, job) if stays else None
        if nxt is None:
            await self._finish(job, f, began=began, began_known=True, result=result)
            return
        next_id = nxt.job.id
        crash_point("warm_hand_off")
        self._gate.enter(job.id, nxt.job)
        ended: list[Job] = []
        failed: list[Exception] = []
        started = False

        async def start_next() -> None:
            nonlocal started
            try:
                await self._start(Start(next_id, w.gpus), wake=False)
                # Started: its supervisor (not run yet) holds the worker; a start given up
                # released it (_release_warm).
                started = nxt.assigned is w
            except Exception:  # noqa: BLE001 - a bug here must not cut the end short
                log.exception("job %s was not handed to warm worker %s", next_id, w.id)
            finally:
                if not started:
                    self._release_warm(nxt)  # e.g. cancelled (and gone) before its start
                # Its start is recorded (or given up): a round may look again.
                self._gate.leave()

        try:
            async with trio.open_nursery() as n:
                n.start_soon(start_next)
                # This end first: its time is taken (and its commit queued) before the next
                # call's start, so the ledger never shows the two overlapping.
                try:
                    ended.append(
                        await self._finish(
                            job, f, began=began, began_known=True, result=result, wake=False
                        )
                    )
                except Exception as e:  # noqa: BLE001 - raised below, the start left whole
                    failed.append(e)
            if failed:
                raise failed[0]
        finally:
            self._gate.moves.pop(job.id, None)
            if started:
                self.stats.handoffs += 1
            if not started or not ended or ended[0].state not in FINAL:
                self._reschedule()
