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
from collections import Counter
from collections.abc import Callable, Container, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

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

    def __init__(self, job_of: Callable[[V], Job], make: Callable[[Job], V] | None = None) -> None:
        super().__init__()
        self._job_of = job_of
        #: a record for a job that :meth:`arrive` brought in (a Job itself by default)
        self._make: Callable[[Job], V] = make or cast(Callable[[Job], V], lambda j: j)
        self.pending = PendingIndex()
        self.running: dict[int, Job] = {}
        #: queued jobs kept out of :attr:`pending`: those waiting for dependencies (#14)
        self.held: Container[int] = ()
        #: jobs committed and not filed yet (:meth:`arrive`), by id
        self._incoming: dict[int, Job] = {}
        #: ... how many of them each owner has queued (not held), and those not counted
        self._incoming_by: dict[str, int] = {}
        self._uncounted: set[int] = set()

    # -- jobs arriving in bulk (#12) -------------------------------------------------------
    #
    # Filing a job (its record, the queue index) costs about 10 us: a batch of 100,000 is
    # a second during which the event loop serves nothing else. So a batch just committed
    # *arrives* in one step (a dict update) and is filed a chunk at a time between the
    # loop's other work (:meth:`file`). Meanwhile an unfiled job is filed the moment
    # anyone looks it up by id (``get``, ``in``, ``[]``, ``pop``, ``del``): to every
    # lookup, every committed active job is here. What iterates (the scheduler's index,
    # ``values()``, ``len()``) sees an arriving job once it is filed, a few milliseconds
    # later; :meth:`queued_by` counts it from its arrival.

    def arrive(self, jobs: Sequence[Job]) -> None:
        """Bring in jobs just committed (none of them filed, none here yet; held ones
        already in :attr:`held`), to be filed by :meth:`file` or when first looked up.
        A few C-speed passes: about 30 ms for 100,000 jobs."""
        ids = [j.id for j in jobs]
        self._incoming.update(zip(ids, jobs, strict=True))
        held = self.held
        # Counted as queued (for the owner's max_queued) from now on; the held ones and
        # those not queued (recovery's running jobs) are remembered as not counted.
        skip = {j.id for j in jobs if j.state is not JobState.QUEUED or (j.deps and j.id in held)}
        self._uncounted |= skip
        by = self._incoming_by
        for owner, n in Counter(j.owner for j in jobs if j.id not in skip).items():
            by[owner] = by.get(owner, 0) + n

    def arriving(self, job_id: int) -> bool:
        """Has the job arrived and is it still to be filed?"""
        return job_id in self._incoming

    def file(self, ids: Iterable[int]) -> None:
        """File these arrived jobs now (those already filed, or gone, are passed over)."""
        for job_id in ids:
            if job_id in self._incoming:
                self._file(job_id)

    def unfiled(self) -> list[Job]:
        """The jobs that arrived and are not filed yet."""
        return list(self._incoming.values())

    def _file(self, job_id: int) -> None:
        job = self._incoming.pop(job_id)
        if job_id in self._uncounted:
            self._uncounted.discard(job_id)
        else:
            left = self._incoming_by[job.owner] - 1
            if left:
                self._incoming_by[job.owner] = left
            else:
                del self._incoming_by[job.owner]
        if not dict.__contains__(self, job_id):
            self[job_id] = self._make(job)

    def queued_by(self, owner: str) -> int:
        """How many jobs ``owner`` has queued and not held: filed or arriving, O(1)."""
        return self.pending.queued_by(owner) + self._incoming_by.get(owner, 0)

    def queued_owners(self) -> set[str]:
        """Everyone with a job queued (filed or arriving) and not held."""
        return set(self.pending.owners()) | self._incoming_by.keys()

    def get(self, job_id: int, default: V | None = None) -> V | None:  # type: ignore[override]  # dict.get's overloads
        if self._incoming and job_id in self._incoming:
            self._file(job_id)
        return super().get(job_id, default)

    def __contains__(self, job_id: object) -> bool:
        if self._incoming and job_id in self._incoming:
            self._file(job_id)  # narrowed to int by the dict it is in
        return super().__contains__(job_id)

    def __getitem__(self, job_id: int) -> V:
        if self._incoming and job_id in self._incoming:
            self._file(job_id)
        return super().__getitem__(job_id)

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
        if self._incoming and job_id in self._incoming:
            self._file(job_id)
        super().__delitem__(job_id)
        self._forget(job_id)

    def pop(self, job_id: int, *default: Any) -> Any:
        if self._incoming and job_id in self._incoming:
            self._file(job_id)
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
        self._incoming.clear()
        self._incoming_by.clear()
        self._uncounted.clear()
        self.pending = PendingIndex()
        self.running.clear()

    def popitem(self) -> tuple[int, V]:
        job_id, value = super().popitem()
        self._forget(job_id)
        return job_id, value
