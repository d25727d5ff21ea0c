"""The scheduling loop: load -> decide -> apply, one round at a time. Events set one wake-up
event; however many arrive during a round, they make one next round (coalesced)."""


from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Mapping

import trio

from gpud.daemon import jobfiles
from gpud.daemon.record import (
    _served,
)
from gpud.daemon.supervise import Supervision
from gpud.domain import (
    IllegalTransition,
    Job,
    JobState,
    Quota,
    Start,
    Wait,
)
from gpud.ledger import Step
from gpud.scheduler import decide, order_key, scheduling_key
from gpud.storage import is_busy, is_full
from gpud.warm import WarmWorker, warm_key

log = logging.getLogger("gpud")


class SchedulingLoop(Supervision):
    async def _schedule_loop(self) -> None:
        while True:
            self._wake = trio.Event()
            try:
                next_due = await self._schedule_once()
            except Exception:  # noqa: BLE001 - a bug in one round must not stop the daemon
                log.exception("a scheduling round failed; retrying in 1 s")
                next_due = self.clock.time() + 1.0
            if next_due is None:
                await self._wake.wait()
            else:
                with trio.move_on_after(max(0.0, next_due - self.clock.time())):
                    await self._wake.wait()

    async def _schedule_once(self) -> float | None:
        """One round of decide -> apply. Returns when a backoff next expires, if any."""
        now = self.clock.time()
        pending = [r.job for r in self.jobs.values() if r.job.state is JobState.QUEUED]
        running = [r.job for r in self.jobs.values() if r.job.state is not JobState.QUEUED]
        pending = await self.batches.admit(pending, running)  # max_concurrency (#12)
        if pending and jobfiles.low_space(self.config.data_dir):
            # A job could not even lay out its directory: keep what space is left for the
            # running jobs' state changes, and look again in a while.
            why = (f"the disk holding {self.config.data_dir} is full: no job starts until "
                   "space is freed there")
            self._set_waits({j.id: Wait(j.id, why, i) for i, j in enumerate(pending, 1)})
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
            rec = self.jobs.get(job_id)
            if rec is None:
                continue  # ended (cancelled) during this round's earlier starts
            w.busy = job_id  # reserved now: the next round must not hand it out again
            rec.assigned = w
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
        self._set_waits(waits)
        backoffs = [j.not_before for j in pending if j.not_before > now and j.id in waits]
        if self._write_blocked:
            self._write_blocked = False
            backoffs.append(now + 1.0)
        return min(backoffs) if backoffs else None

    def _set_waits(self, waits: Mapping[int, Wait]) -> None:
        for job_id, rec in self.jobs.items():
            rec.wait = waits.get(job_id)

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

    async def _start(self, d: Start) -> None:
        rec = self.jobs.get(d.job_id)
        if rec is None:
            return  # ended while this round was deciding
        if rec.stop_reason is not None:
            self._release_warm(rec)
            return  # cancelled while this round was deciding
        types = {g.uuid: g.type for g in self.gpus}
        fields = {"gpus": d.gpus, "gpu_types": tuple(types.get(u, "unknown") for u in d.gpus)}
        try:
            job = await self._advance(d.job_id, Step(JobState.STARTING, fields=fields),
                                      expect=JobState.QUEUED, retry=False)
        except IllegalTransition as e:  # e.g. cancelled in the meantime
            log.info("job %s not started: %s", d.job_id, e)
            self._release_warm(rec)
            return
        except sqlite3.Error as e:
            if not (is_full(e) or is_busy(e)):
                raise
            # It stays queued; the next round (in 1 s) tries again.
            if not self._write_blocked:
                log.warning("job %s not started: the ledger cannot be written (%s)",
                            d.job_id, e)
            self._write_blocked = True
            self._release_warm(rec)
            return
        assert self._nursery is not None
        rec.dispatched_at = self.clock.time()
        self._nursery.start_soon(self._supervise, job, None)
