"""Why a job waits, as data (#12): built cheaply in a scheduling round, formatted on read.

A round over a long queue used to spend most of its time formatting reason strings that
nobody read. Here a round keeps a small object per distinct reason, shared by every job
that waits for the same thing, and :meth:`text` makes the words only when ``gpud ps``,
the TUI or ``/v1/queue`` shows that job (the string is then cached on the object).

The words are those the product promises and tests/test_scheduler.py pins: honest,
specific, naming what a job waits for and who holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpud.domain import Gpu, GpuRequest

__all__ = [
    "Backoff",
    "BatchLimit",
    "CpuBehind",
    "GpuPart",
    "GpuWait",
    "Text",
    "gpu_list",
    "gpus_word",
    "id_list",
    "inventory",
    "seconds",
]

# How many job ids or pids a reason lists before it says "and N more": a reason is one
# line in a table, and a queue of 500 CPU jobs must not produce a 5 kB string.
_MAX_LISTED = 5


@dataclass(frozen=True, slots=True)
class Text:
    """A reason whose words were cheap or rare enough to make at once."""

    words: str

    def text(self, job_id: int) -> str:
        return self.words


@dataclass(frozen=True, slots=True)
class Backoff:
    remaining: float  # seconds left at the round's time
    attempt: int  # the attempt waited for
    of: int  # attempts allowed in all

    def text(self, job_id: int) -> str:
        return (
            f"retrying after a failure: backoff for another {self.remaining:.1f} s "
            f"(attempt {self.attempt} of {self.of})"
        )


@dataclass(frozen=True, slots=True)
class BatchLimit:
    """Held back by its batch's ``max_concurrency`` (gpud.batches): a job of a batch that
    has that many starting or running never reaches the round."""

    batch_id: int
    limit: int

    def text(self, job_id: int) -> str:
        return f"batch {self.batch_id} at its max_concurrency of {self.limit}"


@dataclass(frozen=True, slots=True)
class CpuBehind:
    head: int  # the CPU job first in line: it takes the next slot
    others: int  # CPU jobs in line between the head and this one

    def text(self, job_id: int) -> str:
        if not self.others:
            return f"waiting behind job {self.head} for a CPU slot"
        s = "s" if self.others > 1 else ""
        return f"waiting behind job {self.head} and {self.others} other CPU job{s} for a CPU slot"


@dataclass(frozen=True, slots=True)
class GpuPart:
    """GPUs in the same situation: held by a job, reserved for one, foreign, or free."""

    kind: str  # "held", "reserved", "foreign" or "free"
    job: int  # the holder or reserver (0 for foreign and free)
    owner: str  # that job's owner, if known
    indices: tuple[int, ...]
    pids: tuple[int, ...] = ()  # foreign processes


@dataclass(slots=True)
class GpuWait:
    """Waiting for GPUs: for every GPU the job could use, why it cannot have it now.

    Shared by all the jobs of one request shape that wait at the same state of the
    GPUs; the job whose reservation a part names reads "free and kept for this job"."""

    request: GpuRequest
    parts: tuple[GpuPart, ...]
    never: tuple[str, ...]  # fallback options this box can never hold
    over_quota: tuple[str, ...] = ()  # options that would take the owner over quota
    owner: str = ""
    _words: str | None = field(default=None, repr=False)
    _reservers: frozenset[int] = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        self._reservers = frozenset(p.job for p in self.parts if p.kind == "reserved")

    def text(self, job_id: int) -> str:
        if job_id in self._reservers:
            return self._format(job_id)
        if self._words is None:
            self._words = self._format(0)
        return self._words

    def _format(self, job_id: int) -> str:
        out: list[str] = []
        for p in self.parts:
            where = gpu_list(p.indices)
            if p.kind == "held":
                who = f"job {p.job} ({p.owner})" if p.owner else f"job {p.job}"
                out.append(f"{where} held by {who}")
            elif p.kind == "foreign":
                noun = "pid" if len(p.pids) == 1 else "pids"
                out.append(
                    f"{where} busy with processes gpud did not start ({noun} {id_list(p.pids)})"
                )
            elif p.kind == "reserved" and p.job == job_id:
                out.append(f"{where} free and kept for this job")
            elif p.kind == "reserved":
                ahead = f"{p.owner}, ahead in the queue" if p.owner else "ahead in the queue"
                out.append(f"{where} reserved for job {p.job} ({ahead})")
            else:
                out.append(f"{where} free")
        reason = f"waiting for {self.request}: " + ", ".join(out)
        if self.never:
            # Fallback options the box can never hold are worth saying, or a user will
            # wonder why "4 x h100" never happens on a box with two of them.
            reason += f"; this box can never fit {' or '.join(self.never)}"
        if self.over_quota:
            reason += (
                f"; {' or '.join(self.over_quota)} would take {self.owner} over their GPU quota"
            )
        return reason


# ---------------------------------------------------------------------------------------
# Words


def gpu_list(indices: Iterable[int]) -> str:
    ids = list(indices)
    return ("GPU " if len(ids) == 1 else "GPUs ") + ",".join(str(i) for i in ids)


def id_list(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_MAX_LISTED])
    if len(ids) > _MAX_LISTED:
        shown += f" and {len(ids) - _MAX_LISTED} more"
    return shown


def inventory(box: Sequence[Gpu]) -> str:
    """'2 x h100 (GPUs 0,1) and 1 x l4 (GPU 2)': what a box has, by type, in index order."""
    by_type: dict[str, list[int]] = {}
    for g in box:
        by_type.setdefault(g.type, []).append(g.index)
    parts = [f"{len(ix)} x {t} ({gpu_list(ix)})" for t, ix in by_type.items()]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def gpus_word(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def seconds(s: float) -> str:
    if s >= 3600 and s % 3600 == 0:
        return f"{int(s // 3600)} h"
    if s >= 60 and s % 60 == 0:
        return f"{int(s // 60)} min"
    return f"{s:g} s"
