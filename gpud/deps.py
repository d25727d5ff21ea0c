"""Job dependencies (#14): which queued jobs wait for which, and what a dependency's end
means for the jobs waiting on it. Pure data, no I/O, no clock.

A job submitted with ``after=[41, 42]`` is held out of the scheduler's queue (it is not
in :class:`gpud.pending.PendingIndex` at all, so a round never looks at it) until every
dependency is met: with ``afterok`` (the default) when each has succeeded, with
``afterany`` when each has ended, however. A dependency that ends otherwise under
``afterok`` (failed, cancelled, timed out, lost) dooms the job: the daemon cancels it,
saying which dependency and why, and that cancel dooms the jobs waiting on it in turn.

The cost follows what changed, not the queue: :class:`DepIndex` keeps the waiters of each
dependency, so a job's end touches only the jobs that named it.

Cycles cannot be made: the ids a submit names must exist (and be the submitter's own)
at submit, and a new job's id is larger than every existing one, so every edge points
from a newer job to an older one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpud.domain import Job, JobState

__all__ = ["DepIndex", "Doomed", "check_after", "ended_text"]

#: how each way of ending reads in a dependent's cancel reason
_ENDED = {
    JobState.FAILED: "failed",
    JobState.CANCELLED: "was cancelled",
    JobState.TIMED_OUT: "timed out",
    JobState.LOST: "was lost",
    JobState.SUCCEEDED: "succeeded",
}

#: the most jobs one submit may name in ``after``
MAX_AFTER = 1000


def ended_text(state: JobState) -> str:
    return _ENDED.get(state, state.value)


def check_after(
    owner: str, after: Iterable[int], found: Mapping[int, tuple[str, JobState]]
) -> str | None:
    """Why a submit's ``after`` ids are refused (None: they are fine). ``found`` is the
    ledger's (owner, state) of those that exist.

    Only the submitter's own jobs may be named, as Slurm lets a user depend only on jobs
    they can see: on a shared box another user's job ids, states and results are theirs
    (and a result passed on with ``result_of`` must be readable by the job's user), so
    another user's job reads exactly like a job that does not exist."""
    ids = list(dict.fromkeys(after))
    if len(ids) > MAX_AFTER:
        return f"after names {len(ids)} jobs: at most {MAX_AFTER}"
    unknown = [i for i in ids if i not in found or found[i][0] != owner]
    if unknown:
        listed = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        return (
            f"after names no job of yours with id {listed}: a dependency must be one "
            "of your own jobs that exists now (see gpud ps --all)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Doomed:
    """A waiting job that can no longer start: cancel it with ``reason``."""

    job_id: int
    reason: str


class DepIndex:
    """The queued jobs that wait for dependencies, indexed both ways."""

    def __init__(self) -> None:
        #: job id -> the ids of its dependencies not met yet (non-empty), in order
        self.waiting: dict[int, list[int]] = {}
        #: dependency id -> the ids of the jobs waiting on it
        self._waiters: dict[int, set[int]] = {}
        self._any: set[int] = set()  # the waiting jobs with afterany
        self._owners: dict[int, str] = {}
        self._held_by: dict[str, int] = {}  # owner -> how many of their jobs wait
        #: jobs that can no longer start, until the daemon has recorded their cancel:
        #: they stay out of the scheduler's queue meanwhile
        self.doomed: set[int] = set()

    def __contains__(self, job_id: object) -> bool:
        """Is the job kept out of the scheduler's queue (waiting, or to be cancelled)?"""
        return job_id in self.waiting or job_id in self.doomed

    def __len__(self) -> int:
        return len(self.waiting)

    def held_owners(self) -> dict[str, int]:
        """Owner -> how many of their queued jobs wait for dependencies (for /metrics)."""
        return dict(self._held_by)

    def held_by(self, owner: str) -> int:
        """How many of ``owner``'s queued jobs wait for dependencies (max_queued counts
        them with the rest)."""
        return self._held_by.get(owner, 0)

    def reason(self, job_id: int) -> str | None:
        """Why a held job waits, e.g. "waiting for job 41" (None: it is not held)."""
        unmet = self.waiting.get(job_id)
        if not unmet:
            return None
        if len(unmet) == 1:
            return f"waiting for job {unmet[0]}"
        head = ", ".join(map(str, unmet[:5]))
        return f"waiting for jobs {head}" + (
            f" and {len(unmet) - 5} more" if len(unmet) > 5 else ""
        )

    def hold(self, job: Job, ended: Mapping[int, JobState]) -> Doomed | None:
        """Take in a queued job with dependencies. ``ended`` holds the final states of
        those of its dependencies that have ended; the others are active. Returns what
        to cancel if one already ended the wrong way; the job is held only if some
        dependency is still to come."""
        unmet: list[int] = []
        for dep in dict.fromkeys(job.deps):
            state = ended.get(dep)
            if state is None:
                unmet.append(dep)
            elif not job.deps_any and state is not JobState.SUCCEEDED:
                self.doomed.add(job.id)
                return Doomed(job.id, f"dependency job {dep} {ended_text(state)}")
        if not unmet:
            return None
        self.waiting[job.id] = unmet
        for dep in unmet:
            self._waiters.setdefault(dep, set()).add(job.id)
        if job.deps_any:
            self._any.add(job.id)
        self._owners[job.id] = job.owner
        self._held_by[job.owner] = self._held_by.get(job.owner, 0) + 1
        return None

    def ended(
        self, job_id: int, state: JobState, why: str | None = None
    ) -> tuple[list[int], list[Doomed]]:
        """Job ``job_id`` is over (``state``, cancelled because of ``why``): forget it if
        it was held, and settle its waiters. Returns (jobs now free to be scheduled, jobs
        to cancel); a cascaded cancel names the first cause too."""
        self._drop(job_id)
        self.doomed.discard(job_id)
        cause = (
            f" ({why})"
            if why and state is JobState.CANCELLED and why.startswith("dependency job")
            else ""
        )
        ready: list[int] = []
        doomed: list[Doomed] = []
        for waiter in sorted(self._waiters.pop(job_id, ())):
            if waiter not in self._any and state is not JobState.SUCCEEDED:
                self._drop(waiter)
                self.doomed.add(waiter)
                doomed.append(Doomed(waiter, f"dependency job {job_id} {ended_text(state)}{cause}"))
                continue
            unmet = self.waiting[waiter]
            unmet.remove(job_id)
            if not unmet:
                self._drop(waiter)
                ready.append(waiter)
        return ready, doomed

    def _drop(self, job_id: int) -> None:
        unmet = self.waiting.pop(job_id, None)
        if unmet is None:
            return
        for dep in unmet:
            ws = self._waiters.get(dep)
            if ws is not None:
                ws.discard(job_id)
                if not ws:
                    del self._waiters[dep]
        self._any.discard(job_id)
        owner = self._owners.pop(job_id)
        left = self._held_by[owner] - 1
        if left:
            self._held_by[owner] = left
        else:
            del self._held_by[owner]
