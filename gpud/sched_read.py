"""Reading one queued job's wait, or a page of the queue, from a plan (#12).

Working out every wait of a round is O(queued) (about 0.5 s at 100,000 jobs), while a
reader (``gpud ps``, ``/v1/queue``, the TUI) shows a page of them. Here one job's wait is
found from what the round kept, without touching the rest of the queue:

* its **position** is its rank in the round's scheduling order: the number of jobs ahead
  of it in each group (a bisection of the group's jobs by key: within a group the order
  never changes), less the jobs that went to warm workers;
* its **reason**: every job the round looked at has its decision recorded. A job it did
  not look at is in a group whose request shape waited earlier in the round; the steps of
  such jobs change nothing the reasons depend on (only the CPU line's length), so its
  reason is what the round says for it in the state it had just before the job: the round
  replayed over the jobs it looked at whose keys are smaller (found by bisection, the
  replay moving forward and kept, and memoized per group and place);
* a CPU-only job's "behind N other CPU jobs" counts the CPU jobs in line ahead of it,
  those the round did not look at included: per CPU group whose shape waited, the jobs
  between where it waited and this job, less those in backoff, over their owner's
  max_timeout or gone to warm workers (found by bisection too).

So one read costs O(groups · log queued), plus the replay of the jobs the round looked at
(a few per group and per start) when the state it needs is not kept yet. The property
tests check that it equals the materialised waits, words and positions included.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence

from gpud.domain import Job, Quota, Reason, Start, Wait
from gpud.pending import Group
from gpud.reasons import Backoff, CpuBehind
from gpud.sched_round import Round, cpu_only

__all__ = ["KEEP_EVERY", "Looked", "Reader", "Walked"]

Key = tuple[float, float, int]
#: A job in the plan's order: the job, its group, its key and its position.
Walked = tuple[Job, int, Key, int]
#: A job the round looked at: its key, its group, the job, and its Start or reason.
Looked = tuple[Key, int, Job, "Start | Reason"]


class Reader:
    """One plan's waits, job by job, on demand."""

    def __init__(
        self,
        *,
        groups: Sequence[Group],
        key: Callable[[str], Callable[[Job], Key]],
        new_round: Callable[[], Round],
        new_merge: Callable[[], Iterator[tuple[Job, int, Key]]],
        now: float,
        quotas: Mapping[str, Quota],
        skip_keys: Sequence[Key],
        looked: list[Looked],
        kept: dict[int, Round],
        dropped: dict[int, Key],
        cut: Key | None,
        before_cut: Callable[[Job], Wait | None] | None,
        not_yet: Reason,
    ) -> None:
        self.groups = groups
        self.key = key
        self.new_round = new_round
        self.new_merge = new_merge
        self.now = now
        self.quotas = quotas
        self.skip_keys = sorted(skip_keys)
        self.looked = looked
        self.looked_keys = [x[0] for x in looked]
        self.looked_at = {x[2].id: n for n, x in enumerate(looked)}
        self.dropped = dropped  # group -> the key at which its shape waited
        self.cut = cut
        self.before_cut = before_cut  # the last complete plan's wait, past a cut
        self.not_yet = not_yet
        self._ends: list[tuple[Key, Key] | None] | None = None
        self._by_shape: dict[tuple[str, int, object], list[int]] | None = None
        self._round: Round | None = None
        self._at = 0  # how many looked-at jobs self._round has replayed
        self._kept = kept  # copies of the round every KEEP_EVERY jobs
        self._memo: dict[tuple[int, int, bool], Reason] = {}
        self._keys: dict[int, Callable[[Job], Key]] = {}
        self._not_in_line: dict[int, list[Key]] = {}
        self._skip_ids: set[int] | None = None

    # -- finding a job ------------------------------------------------------------------

    def locate(self, job: Job) -> tuple[int, int] | None:
        """(group, index in it) of ``job`` in this plan's snapshot, or None."""
        if self._by_shape is None:
            self._by_shape = {}
            for gi, g in enumerate(self.groups):
                self._by_shape.setdefault((g.owner, g.priority, g.gpu), []).append(gi)
        k = (job.submitted_at, job.id)
        for gi in self._by_shape.get((job.owner, job.priority, job.gpu), ()):
            jobs = self.groups[gi].jobs
            i = bisect_left(jobs, k, key=_fifo)
            if i < len(jobs) and jobs[i].id == job.id:
                return gi, i
        if not job.owner:  # an owner known only from the plan's owners mapping
            for gi, g in enumerate(self.groups):
                if (g.priority, g.gpu) == (job.priority, job.gpu):
                    i = bisect_left(g.jobs, k, key=_fifo)
                    if i < len(g.jobs) and g.jobs[i].id == job.id:
                        return gi, i
        return None

    # -- one job ------------------------------------------------------------------------

    def wait(self, job: Job) -> Wait | None:
        """The wait of ``job`` (queued when the plan was made); None if it started, went
        to a warm worker, or is not in this plan."""
        at = self.locate(job)
        if at is None:
            return None
        gi, i = at
        job = self.groups[gi].jobs[i]
        k = self._key(gi)(job)
        s = bisect_left(self.skip_keys, k)
        if s < len(self.skip_keys) and self.skip_keys[s] == k:
            return None  # it went to a warm worker
        return self.wait_at((job, gi, k, 0))

    def wait_at(self, item: Walked) -> Wait | None:
        """The wait of a job found by :meth:`order` (or with position 0: to be found)."""
        job, gi, k, position = item
        why = self.reason(gi, job, k)
        return None if why is None else Wait(job.id, why, position or self.position(k))

    def position(self, k: Key) -> int:
        """1 + the jobs ahead of key ``k`` in the round's order: a group wholly ahead or
        behind is counted from its ends, only those around ``k`` are bisected."""
        if self._ends is None:
            self._ends = [
                (self._key(gi)(g.jobs[0]), self._key(gi)(g.jobs[-1])) if g.jobs else None
                for gi, g in enumerate(self.groups)
            ]
        ahead = -bisect_left(self.skip_keys, k)
        for gi, ends in enumerate(self._ends):
            if ends is None or ends[0] >= k:
                continue
            jobs = self.groups[gi].jobs
            ahead += len(jobs) if ends[1] < k else bisect_left(jobs, k, key=self._key(gi))
        return ahead + 1

    def key_in(self, gi: int) -> Callable[[Job], Key]:
        """The scheduling key of a job of group ``gi``."""
        return self._key(gi)

    def _key(self, gi: int) -> Callable[[Job], Key]:
        f = self._keys.get(gi)
        if f is None:
            f = self._keys[gi] = self.key(self.groups[gi].owner)
        return f

    def reason(self, gi: int, job: Job, k: Key) -> Reason | str | None:
        n = self.looked_at.get(job.id)
        if n is not None:
            d = self.looked[n][3]
            if isinstance(d, Start):
                return None
            if isinstance(d, CpuBehind):
                return CpuBehind(d.head, d.others + self._unlooked_line(k))
            return d
        if self.cut is not None and k >= self.cut:
            before = self.before_cut(job) if self.before_cut is not None else None
            return self.not_yet if before is None else before.why
        # A job the round did not look at: its group's shape waited before it.
        if job.not_before > self.now:
            return Backoff(job.not_before - self.now, job.attempt + 1, job.retries + 1)
        p = bisect_left(self.looked_keys, k)
        g = self.groups[gi]
        # Every such job of the group gets the same reason at p, but for its timeout.
        quota = self.quotas.get(g.owner)
        memo = (
            gi,
            p,
            quota is not None and quota.max_timeout is not None and job.timeout > quota.max_timeout,
        )
        why = self._memo.get(memo)
        if why is None:
            rnd = self._round_at(p)
            line = rnd.cpu_line
            rnd.step(job, g.owner)
            rnd.cpu_line = line  # the one thing a step past its shape's wait changes
            why = rnd.last_reason
            assert why is not None and rnd.last_start is None, "a skipped job started"
            self._memo[memo] = why
        if isinstance(why, CpuBehind):
            return CpuBehind(why.head, why.others + self._unlooked_line(k))
        return why

    def _round_at(self, p: int) -> Round:
        """The round as it was after the first ``p`` jobs it looked at."""
        if self._round is None or self._at > p:
            at = p - p % KEEP_EVERY
            while at > 0 and at not in self._kept:
                at -= KEEP_EVERY
            self._round = self._kept[at].copy() if at else self.new_round()
            self._at = at
        rnd = self._round
        for n in range(self._at, p):
            _, gi, job, _ = self.looked[n]
            rnd.step(job, self.groups[gi].owner)
        self._at = p
        return rnd

    def _unlooked_line(self, k: Key) -> int:
        """CPU-only jobs in line ahead of key ``k`` that the round did not look at: those
        of CPU groups after the place their shape waited."""
        n = 0
        for gi, at in self.dropped.items():
            g = self.groups[gi]
            if not cpu_only(g.gpu) or at >= k:
                continue
            lo = bisect_left(g.jobs, at, key=self._key(gi)) + 1
            hi = bisect_left(g.jobs, k, key=self._key(gi))
            if hi <= lo:
                continue
            out = self._out_of_line(gi)
            n += (hi - lo) - (bisect_left(out, k) - bisect_left(out, at))
        return n

    def _out_of_line(self, gi: int) -> list[Key]:
        """Keys of a CPU group's jobs that never stand in the CPU line: in backoff, over
        their owner's max_timeout (a scan of the group, once per plan, only for an owner
        with that quota) or gone to warm workers."""
        hit = self._not_in_line.get(gi)
        if hit is not None:
            return hit
        g, key = self.groups[gi], self._key(gi)
        keys = {key(j) for j in g.backoff.values() if j.not_before > self.now}
        quota = self.quotas.get(g.owner)
        if quota is not None and quota.max_timeout is not None:
            limit = quota.max_timeout
            keys |= {key(j) for j in g.jobs if j.timeout > limit}
        keys |= {s for s in self.skip_keys if self._in_group(gi, s)}
        out = self._not_in_line[gi] = sorted(keys)
        return out

    def _in_group(self, gi: int, k: Key) -> bool:
        jobs = self.groups[gi].jobs
        i = bisect_left(jobs, (k[1], k[2]), key=_fifo)
        return i < len(jobs) and jobs[i].id == k[2]

    # -- the order ----------------------------------------------------------------------

    def order(self) -> Iterator[Walked]:
        """The plan's jobs in scheduling order, warm-assigned ones left out, each with its
        position: the walk a page of the queue takes, as far as the page goes."""
        for position, (job, gi, k) in enumerate(self.new_merge(), 1):
            yield job, gi, k, position

    def order_from(self, start: Key) -> Iterator[Walked]:
        """:meth:`order` from the first job whose key is ``start`` or more: each group
        is entered by bisection and the position of the first counted from the groups'
        sizes, so a deep page of the queue does not walk to its offset."""
        if self._skip_ids is None:
            self._skip_ids = {k[2] for k in self.skip_keys}  # a key ends with the job id
        skip = self._skip_ids
        heap = []
        for gi, g in enumerate(self.groups):
            key = self._key(gi)
            i = bisect_left(g.jobs, start, key=key)
            if i < len(g.jobs):
                heap.append((key(g.jobs[i]), gi, i))
        heapq.heapify(heap)
        position = self.position(start)
        while heap:
            k, gi, i = heapq.heappop(heap)
            jobs = self.groups[gi].jobs
            if i + 1 < len(jobs):
                heapq.heappush(heap, (self._key(gi)(jobs[i + 1]), gi, i + 1))
            job = jobs[i]
            if job.id in skip:
                continue
            yield job, gi, k, position
            position += 1


#: How often the replay of a round keeps a copy of its state, so that reading a job
#: replays at most this many steps of the round.
KEEP_EVERY = 8


def _fifo(job: Job) -> tuple[float, int]:
    return (job.submitted_at, job.id)
