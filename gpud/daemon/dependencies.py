"""The daemon's side of job dependencies (#14): holding a job with unmet dependencies out
of the scheduler's queue, freeing it when they are met and cancelling it when they no
longer can be. The policy is gpud.deps (pure); this is the thin shell around it.

Called from three places in the daemon, one line each: a submit and the recovery (before
the jobs enter the daemon's records, so a held job never reaches the queue index) and
the end of every job (``DaemonCore._advance``)."""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from typing import Any, Protocol

import trio

from gpud.crashpoint import crash_point
from gpud.deps import DepIndex, Doomed
from gpud.domain import FINAL, IllegalTransition, Job, JobState
from gpud.ledger import LedgerThread, Step
from gpud.ledger.deps import owners_and_states
from gpud.pending import ActiveJobs

__all__ = ["admit", "cancel_doomed", "job_ended"]

log = logging.getLogger("gpud")


class DaemonCore(Protocol):
    """What of gpud.daemon.core.DaemonCore this module uses (no import: core calls in)."""

    deps: DepIndex
    ledger: LedgerThread
    _nursery: trio.Nursery | None

    @property
    def jobs(self) -> ActiveJobs[Any]: ...
    def _reschedule(self) -> None: ...
    async def _advance(
        self, job_id: int, *steps: Step, expect: JobState | None = None, retry: bool = True
    ) -> Job: ...


async def admit(core: DaemonCore, jobs: Sequence[Job], active: Container[int] = ()) -> list[Doomed]:
    """Hold those of ``jobs`` (queued, not yet in ``core.jobs``) whose dependencies are
    still to come; return those to cancel because one ended the wrong way. ``active``:
    ids that are active though not in ``core.jobs`` yet (recovery).

    The dependencies' states are read from the ledger, then the holds are made without
    an await in between and against the daemon's records: a dependency still in memory
    will pass through :func:`job_ended`, one gone from memory has its final state
    committed (the ledger commit comes before the record is dropped). A dependency read
    as active but gone from memory since is read again."""
    with_deps = [j for j in jobs if j.deps and j.state is JobState.QUEUED]
    if not with_deps:
        return []
    deps = {d for j in with_deps for d in j.deps}
    for _ in range(10):
        states = await core.ledger.call(owners_and_states, deps)
        live = {d for d in deps if d in core.jobs or d in active}
        unsure = {d for d in deps - live if d in states and states[d][1] not in FINAL}
        if not unsure:
            break
    ended = {d: s for d, (_, s) in states.items() if d not in live and s in FINAL}
    doomed = []
    for j in with_deps:
        d = core.deps.hold(j, ended)
        if d is not None:
            doomed.append(d)
    return doomed


def job_ended(core: DaemonCore, job: Job) -> None:
    """A job reached its final state (and left ``core.jobs``): free or doom its waiters."""
    if not core.deps.waiting and not core.deps.doomed:
        return  # the common case: no job waits for anything
    ready, doomed = core.deps.ended(job.id, job.state, job.error)
    if ready or doomed:
        crash_point("deps_ended")  # its end committed, its waiters not yet freed or doomed
    for job_id in ready:
        if job_id in core.jobs:
            core.jobs.refile(job_id)  # into the scheduler's queue now
    if ready:
        core._reschedule()
    cancel_doomed(core, doomed)


def cancel_doomed(core: DaemonCore, doomed: Sequence[Doomed]) -> None:
    if doomed and core._nursery is not None:
        core._nursery.start_soon(_cancel_all, core, list(doomed))


async def _cancel_all(core: DaemonCore, doomed: list[Doomed]) -> None:
    for d in doomed:
        try:
            await core._advance(
                d.job_id,
                Step(JobState.CANCELLED, d.reason, fields={"error": d.reason}),
                expect=JobState.QUEUED,
            )
            log.info("job %s cancelled: %s", d.job_id, d.reason)
        except IllegalTransition:
            core.deps.doomed.discard(d.job_id)  # cancelled by its owner meanwhile
        except Exception:  # noqa: BLE001 - one bad cancel must not stop the others
            log.exception("could not cancel job %s (%s)", d.job_id, d.reason)
