"""Two small caches on the warm-call path (#12), so that a call costs fewer trips to the
ledger's threads: each trip is a thread hand-off and a wake-up of the event loop, which on
a small, busy box costs as much as the work itself.

* :class:`RecentPayloads`: the function's and the arguments' pickles of a job (warm or
  cold), kept from its submit until its start hands them to a warm worker or writes them
  into the job's directory. Without it the start read them back from the ledger (a trip
  on the read connection) a few milliseconds after they were committed. The function's
  bytes of a batch are one object shared by all its jobs, counted once.
* :class:`RecentFinal`: the last jobs that ended, as their final commit returned them. A
  caller waiting on a call (``/v1/jobs/run``, a batch's results) reads the job it waited
  for from here instead of from the ledger. A final job never changes state again
  (gpud.domain.TRANSITIONS); the columns that do change afterwards are bookkeeping no
  reader of a call's outcome looks at.

Both are caches only: what they hold is committed in the ledger, which stays the answer
when they miss. Both are bounded (count and bytes), oldest dropped first.
"""

from __future__ import annotations

import contextlib
import gc
from collections import OrderedDict
from collections.abc import Iterator

from gpud.domain import Job

__all__ = [
    "FREEZE_AT",
    "FrozenHeap",
    "gc_quiet",
    "PAYLOAD_BYTES",
    "PAYLOAD_COUNT",
    "FINAL_COUNT",
    "FINAL_TTL",
    "RecentFinal",
    "RecentPayloads",
]

#: At most this many bytes of payloads (each distinct function counted once) and this many
#: jobs: a .map's queued inputs up to there start without a ledger read; the rest read it.
PAYLOAD_BYTES = 16 << 20
PAYLOAD_COUNT = 20_000
#: The last jobs that ended: a .map's reader at full speed is far fewer behind than this.
FINAL_COUNT = 20_000
#: ... and for at most this long after their end (seconds).
FINAL_TTL = 60.0


class RecentPayloads:
    """job id -> (function pickle, arguments pickle), for jobs submitted and not started."""

    def __init__(self, max_bytes: int = PAYLOAD_BYTES, max_count: int = PAYLOAD_COUNT) -> None:
        self._data: OrderedDict[int, tuple[bytes, bytes]] = OrderedDict()
        #: id() of a function's bytes -> (the bytes, kept alive; how many jobs hold them)
        self._functions: dict[int, tuple[bytes, int]] = {}
        self._bytes = 0
        self._max_bytes, self._max_count = max_bytes, max_count

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size(self) -> int:
        return self._bytes

    def put(self, job_id: int, function: bytes, args: bytes) -> None:
        if len(function) + len(args) > self._max_bytes:
            return  # never fits: the ledger has it
        self.pop(job_id)
        self._data[job_id] = (function, args)
        self._bytes += len(args)
        _, n = self._functions.get(id(function), (function, 0))
        self._functions[id(function)] = (function, n + 1)
        if n == 0:
            self._bytes += len(function)
        while self._data and (self._bytes > self._max_bytes or len(self._data) > self._max_count):
            oldest = next(iter(self._data))
            self.pop(oldest)

    def pop(self, job_id: int) -> tuple[bytes, bytes] | None:
        """The job's payload, forgotten here (a later attempt reads the ledger)."""
        hit = self._data.pop(job_id, None)
        if hit is None:
            return None
        function, args = hit
        self._bytes -= len(args)
        _, n = self._functions[id(function)]
        if n == 1:
            del self._functions[id(function)]
            self._bytes -= len(function)
        else:
            self._functions[id(function)] = (function, n - 1)
        return hit


class RecentFinal:
    """job id -> the job as its final commit returned it, the last ``max_count``."""

    def __init__(self, max_count: int = FINAL_COUNT) -> None:
        self._data: OrderedDict[int, Job] = OrderedDict()
        self._max_count = max_count

    def __len__(self) -> int:
        return len(self._data)

    def put(self, job: Job) -> None:
        self._data.pop(job.id, None)
        self._data[job.id] = job
        while len(self._data) > self._max_count:
            self._data.popitem(last=False)

    def get(self, job_id: int, now: float) -> Job | None:
        job = self._data.get(job_id)
        if job is None or job.ended_at is None or now - job.ended_at > FINAL_TTL:
            return None
        return job


#: A batch of at least this many jobs is built with the cyclic GC off, and frozen once
#: filed (#12).
FREEZE_AT = 10_000

_quiet = 0  # big batches being built now
_was_enabled = True


@contextlib.contextmanager
def gc_quiet(jobs: int) -> Iterator[None]:
    """No cyclic GC while a batch of ``jobs`` (at least :data:`FREEZE_AT`) is built,
    stored and filed, a few seconds: each full collection walked the batch as it grew,
    0.1-0.25 s in one step, four to six times for 100,000 jobs (#12). The batch's
    objects are frozen at the end of its filing (:class:`FrozenHeap`); what other tasks
    left meanwhile is collected after. Nests (two big batches at once)."""
    global _quiet, _was_enabled
    if jobs < FREEZE_AT:
        yield
        return
    if _quiet == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _quiet += 1
    try:
        yield
    finally:
        _quiet -= 1
        if _quiet == 0 and _was_enabled:
            gc.enable()


class FrozenHeap:
    """Keeps a big queue's objects out of the cyclic GC's full collections (#12).

    With a batch of 100,000 jobs in memory (a record, a Job, its env, the queue index's
    entries: about half a million objects), each full collection walks them all: 0.3 to
    1.2 s in one step, measured during a 50,000-job sweep, while the other users'
    requests waited. Nothing in a queued job's record forms a cycle, so they need no
    cyclic GC at all: they are freed by their reference counts as the jobs end. Once a
    big batch is filed, :meth:`filed` moves every object alive into the permanent
    generation (:func:`gc.freeze`), which full collections skip; when the queue has
    drained below a tenth of that, :meth:`drained` gives them back (:func:`gc.unfreeze`),
    so a cycle that died meanwhile among them is still collected in the end."""

    def __init__(self, at: int = FREEZE_AT) -> None:
        self.at = at
        self.frozen = False

    def filed(self, jobs: int) -> None:
        """A submit of ``jobs`` jobs is filed."""
        if jobs >= self.at:
            gc.freeze()
            self.frozen = True

    def drained(self, active: int) -> None:
        """A job ended; ``active`` jobs are left."""
        if self.frozen and active < self.at // 10:
            gc.unfreeze()
            self.frozen = False
