"""Dependencies between jobs, the caller's side (#14): ``after=`` and ``result_of``.

::

    data = prepare.spawn("s3://bucket/raw")
    model = train.spawn(gpud.result_of(data), epochs=3)      # after=[data] is implied
    report = evaluate.spawn(gpud.result_of(model), after=[model])

All three are queued at once; each starts when the one before has succeeded, with that
one's return value as its argument, and no client needs to stay connected.

``result_of(job)`` is a placeholder. It pickles as ``slice("gpud.result_of", ID, None)``
(a built-in, so the job's Python needs no gpud to load it), which the worker runtime
replaces, in the job's own process, with the dependency's value: the daemon only links
the dependency's result file into the job's directory, and never unpickles it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["RESULT_OF_TAG", "ResultOf", "job_id_of", "job_ids", "result_of", "result_refs"]

#: The first field of the slice a placeholder pickles as (gpud_client.worker reads it).
RESULT_OF_TAG = "gpud.result_of"
_DEPTH = 4  # how deep inside lists, tuples and dicts placeholders are looked for


class ResultOf:
    """Stands for the return value of job ``job_id`` in a dependent job's arguments."""

    __slots__ = ("job_id",)

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"gpud.result_of({self.job_id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResultOf) and other.job_id == self.job_id

    def __hash__(self) -> int:
        return hash((ResultOf, self.job_id))

    def __reduce__(self) -> tuple[Any, ...]:
        return (slice, (RESULT_OF_TAG, self.job_id, None))


def job_id_of(job: Any) -> int:
    """The id of a job given as a handle (anything with an int ``id``) or an id."""
    if isinstance(job, bool):
        raise TypeError(f"a job is a job handle or a job id, not {job!r}")
    if isinstance(job, int):
        if job < 1:
            raise ValueError(f"job ids are >= 1, not {job}")
        return job
    job_id = getattr(job, "id", None)
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        return job_id
    raise TypeError(f"a job is a job handle (from .spawn) or a job id, not {job!r}")


def result_of(job: Any) -> ResultOf:
    """A placeholder for ``job``'s return value, as an argument of a job that runs after
    it: ``train.spawn(gpud.result_of(prepared))``. The dependency is implied: the job
    starts once ``job`` has succeeded (and is cancelled if it does not)."""
    return ResultOf(job_id_of(job))


def job_ids(after: Any) -> tuple[int, ...]:
    """``after=``'s jobs as ids, in order, once each: one job, or an iterable of them;
    a string of comma-separated ids too (``--after 41,42``)."""
    if after is None:
        return ()
    if isinstance(after, str):
        try:
            items: Iterable[Any] = [int(p) for p in after.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(
                f"after={after!r}: write job ids separated by commas, e.g. '41,42'"
            ) from None
    elif isinstance(after, Iterable):
        items = after
    else:
        items = [after]
    return tuple(dict.fromkeys(job_id_of(j) for j in items))


def result_refs(args: Iterable[Any], kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """The ids of the jobs whose results the arguments refer to (``result_of``)."""
    found: dict[int, None] = {}

    def walk(v: Any, depth: int) -> None:
        if isinstance(v, ResultOf):
            found[v.job_id] = None
        elif depth < _DEPTH and type(v) in (list, tuple):
            for x in v:
                walk(x, depth + 1)
        elif depth < _DEPTH and type(v) is dict:
            for x in v.values():
                walk(x, depth + 1)

    for a in args:
        walk(a, 0)
    for a in kwargs.values():
        walk(a, 0)
    return tuple(found)
