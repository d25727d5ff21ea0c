"""The queue, indexed once and kept up to date, so a scheduling round costs what changed.

A round used to sort every queued job and look at each of them. Here the queued jobs are
kept in groups of the same owner, priority, GPU request and warm-worker key, each group
sorted by (submit time, id). Within a group the scheduling order never changes (fair
share and age move whole owners, and an older job of the same priority always ranks at
least as high as a younger one), so :func:`gpud.scheduler.plan` merges the few groups
lazily and stops as soon as every group's request shape is blocked: the rest of the queue
waits, and why is worked out only when somebody reads it.

The index also answers "how many jobs does this user have queued" in O(1) (the
``max_queued`` quota check at every submit) and "when does the next retry backoff end".

Pure data structures: no clock, no I/O. :class:`ActiveJobs` is the daemon's dict of
active jobs' records, which keeps a :class:`PendingIndex` of its QUEUED jobs as jobs come,
change state and go.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Container, Hashable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from gpud.domain import GpuRequest, Job, JobState, served, warm_key

__all__ = ["ActiveJobs", "Group", "PendingIndex"]

GroupKey = tuple[str, int, GpuRequest | None, Hashable]


class Group:
    """Queued jobs of one owner, priority, GPU request and warm key, oldest first."""

    __slots__ = ("backoff", "gpu", "jobs", "keys", "owner", "priority", "wkey")

    def __init__(self, owner: str, priority: int, gpu: GpuRequest | None, wkey: Hashable) -> None:
        self.owner = owner
        self.priority = priority
        self.gpu = gpu
        self.wkey = wkey  # the warm key of its jobs (None: they do not run warm)
        self.keys: list[tuple[float, int]] = []  # (submitted_at, id), sorted
        self.jobs: list[Job] = []  # parallel to keys
        self.backoff: dict[int, Job] = {}  # its jobs with a retry backoff (not_before > 0)

    def snapshot(self) -> Group:
        """A copy whose job list later adds and removals do not touch (a plan reads it
        after the round, when its waits are first read)."""
        g = Group(self.owner, self.priority, self.gpu, self.wkey)
        g.jobs = list(self.jobs)
        g.backoff = dict(self.backoff)
        return g


class PendingIndex:
    """Queued jobs by group; O(log n) to add or remove one (a memmove, in practice)."""

    def __init__(self, owners: Mapping[int, str] | None = None) -> None:
        self._owners = owners or {}  # job id -> owner, for jobs without job.owner
        self._groups: dict[GroupKey, Group] = {}
        self._where: dict[int, tuple[GroupKey, float]] = {}  # id -> (group, submitted_at)
        self._queued: dict[str, int] = {}  # owner -> queued jobs
        self._backoffs: list[tuple[float, int]] = []  # (not_before, id), sorted
        # id -> when it was queued (a count of adds), oldest first: which jobs came since
        # a plan was made, without a scan (a job replaced in place keeps its place).
        self._added: dict[int, int] = {}
        self.seq = 0

    @classmethod
    def of(cls, jobs: Iterable[Job], owners: Mapping[int, str] | None = None) -> PendingIndex:
        index = cls(owners)
        for j in jobs:
            index.add(j)
        return index

    def owner(self, job: Job) -> str:
        return job.owner or self._owners.get(job.id, "")

    def add(self, job: Job) -> None:
        """Queue ``job``, or replace the queued job of the same id."""
        if job.id in self._where:
            self._remove(job.id)
        else:
            self.seq += 1
            self._added[job.id] = self.seq
        owner = self.owner(job)
        # The warm key is computed once here, not in every round (it serialises the env).
        gk: GroupKey = (owner, job.priority, job.gpu, warm_key(job) if served(job) else None)
        g = self._groups.get(gk)
        if g is None:
            g = self._groups[gk] = Group(owner, job.priority, job.gpu, gk[3])
        k = (job.submitted_at, job.id)
        if not g.keys or g.keys[-1] < k:  # the usual case: the newest job goes last
            g.keys.append(k)
            g.jobs.append(job)
        else:
            i = bisect_left(g.keys, k)
            g.keys.insert(i, k)
            g.jobs.insert(i, job)
        self._where[job.id] = (gk, job.submitted_at)
        self._queued[owner] = self._queued.get(owner, 0) + 1
        if job.not_before > 0:
            insort(self._backoffs, (job.not_before, job.id))
            g.backoff[job.id] = job

    def discard(self, job_id: int) -> Job | None:
        """Take the job out of the queue (started, cancelled...); None if it was not in."""
        self._added.pop(job_id, None)
        return self._remove(job_id)

    def _remove(self, job_id: int) -> Job | None:
        where = self._where.pop(job_id, None)
        if where is None:
            return None
        gk, submitted_at = where
        g = self._groups[gk]
        i = bisect_left(g.keys, (submitted_at, job_id))
        job = g.jobs[i]
        del g.keys[i]
        del g.jobs[i]
        if not g.jobs:
            del self._groups[gk]
        left = self._queued[gk[0]] - 1
        if left:
            self._queued[gk[0]] = left
        else:
            del self._queued[gk[0]]
        if job.not_before > 0:
            j = bisect_left(self._backoffs, (job.not_before, job_id))
            del self._backoffs[j]
            g.backoff.pop(job_id, None)
        return job

    def get(self, job_id: int) -> Job | None:
        where = self._where.get(job_id)
        if where is None:
            return None
        g = self._groups[where[0]]
        return g.jobs[bisect_left(g.keys, (where[1], job_id))]

    def added_since(self, seq: int) -> list[int]:
        """Ids of the jobs queued after the add count was ``seq`` (and still queued):
        O(their number)."""
        out = []
        for job_id, s in reversed(self._added.items()):
            if s <= seq:
                break
            out.append(job_id)
        return out

    def kind(self, job_id: int) -> GroupKey | None:
        """The group (owner, priority, request, warm key) a queued job is in."""
        where = self._where.get(job_id)
        return None if where is None else where[0]

    def count_before(self, group: Group, key: tuple[float, int]) -> int:
        """How many queued jobs of ``group``'s kind (owner, priority, request, warm key:
        a plan's snapshot of it, say) come before ``key`` (submit time, id): O(log n).
        A deep page of /v1/queue counts the jobs that left since the plan with it."""
        g = self._groups.get((group.owner, group.priority, group.gpu, group.wkey))
        return 0 if g is None else bisect_left(g.keys, key)

    def queued_by(self, owner: str) -> int:
        """How many jobs ``owner`` has queued: O(1), for the max_queued check at submit."""
        return self._queued.get(owner, 0)

    def owners(self) -> Iterable[str]:
        """Everyone with a queued job."""
        return self._queued.keys()

    def groups(self) -> list[Group]:
        return list(self._groups.values())

    def next_backoff(self, now: float) -> float | None:
        """When the first retry backoff still running at ``now`` ends, if any."""
        i = bisect_right(self._backoffs, (now, float("inf")))
        return self._backoffs[i][0] if i < len(self._backoffs) else None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._where

    def __iter__(self) -> Iterator[Job]:
        for g in self._groups.values():
            yield from g.jobs


V = TypeVar("V")


class ActiveJobs(dict[int, V]):
    """The daemon's active jobs by id (each a record holding its latest Job, or the Job
    itself), with the queued ones indexed in :attr:`pending` and the others (starting,
    running) in :attr:`running`, kept in step as records come, change and go.

    A record's job is replaced, never changed in place, when its state changes (the
    ledger hands back a new Job); whoever replaces it calls :meth:`refile`."""

    def __init__(self, job_of: Callable[[V], Job]) -> None:
        super().__init__()
        self._job_of = job_of
        self.pending = PendingIndex()
        self.running: dict[int, Job] = {}
        #: queued jobs kept out of :attr:`pending`: those waiting for dependencies (#14)
        self.held: Container[int] = ()

    def refile(self, job_id: int) -> None:
        """File the job of ``job_id``'s record again (its state may have changed)."""
        job = self._job_of(self[job_id])
        if job.state is JobState.QUEUED:
            self.running.pop(job_id, None)
            if job_id in self.held:
                self.pending.discard(job_id)
            else:
                self.pending.add(job)
        else:
            self.pending.discard(job_id)
            self.running[job_id] = job

    def _forget(self, job_id: int) -> None:
        self.pending.discard(job_id)
        self.running.pop(job_id, None)

    def __setitem__(self, job_id: int, value: V) -> None:
        super().__setitem__(job_id, value)
        self.refile(job_id)

    def __delitem__(self, job_id: int) -> None:
        super().__delitem__(job_id)
        self._forget(job_id)

    def pop(self, job_id: int, *default: Any) -> Any:
        self._forget(job_id)
        return super().pop(job_id, *default)

    def setdefault(self, job_id: int, default: V) -> V:
        if job_id not in self:
            self[job_id] = default
        return self[job_id]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def clear(self) -> None:
        super().clear()
        self.pending = PendingIndex()
        self.running.clear()

    def popitem(self) -> tuple[int, V]:
        job_id, value = super().popitem()
        self._forget(job_id)
        return job_id, value
