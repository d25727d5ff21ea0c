"""Container snapshots in the ledger (issue #4): what was checkpointed, for which key,
how often it was restored, and why it stopped being used.

A snapshot row is keyed by the sha256 of every part that must match for a restore to be
right (:func:`gpud.snapshots.key_parts`); ``parts`` keeps those parts readable so that a
replaced snapshot can say what changed. States:

* ``taking`` - a container is being checkpointed for this key now;
* ``ready``  - ``location`` restores;
* ``retry``  - the last take or restore failed (``last_error``): the next cold start
  takes it again;
* ``failed`` - ``failures`` reached the daemon's limit: not taken or used any more.
  Only ``gpud snapshots rm`` (or a change of key) brings snapshots back for it.

``failures`` counts failures in a row, takes and restores alike, and only a good restore
resets it: so a snapshot that is taken fine but never restores is re-taken a bounded
number of times, never in a loop.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpud.ledger.store import Ledger

__all__ = [
    "Snapshot",
    "abandon_take",
    "claim_take",
    "delete_snapshot",
    "get_snapshot",
    "interrupted_takes",
    "list_snapshots",
    "mark_ready",
    "record_restore",
    "record_failure",
]

_COLUMNS = (
    "id, key, parts, function, owner, image, state, location, size, created_at, "
    "last_used, restores, failures, last_error, taken_by"
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    key: str
    parts: dict[str, str]
    function: str
    owner: str
    image: str
    state: str
    location: str | None
    size: int
    created_at: float
    last_used: float | None
    restores: int
    failures: int
    last_error: str | None
    taken_by: int | None


def _row(r: sqlite3.Row) -> Snapshot:
    parts: Any = json.loads(r["parts"])
    return Snapshot(
        id=r["id"],
        key=r["key"],
        parts={str(k): str(v) for k, v in parts.items()},
        function=r["function"],
        owner=r["owner"],
        image=r["image"],
        state=r["state"],
        location=r["location"],
        size=r["size"],
        created_at=r["created_at"],
        last_used=r["last_used"],
        restores=r["restores"],
        failures=r["failures"],
        last_error=r["last_error"],
        taken_by=r["taken_by"],
    )


def get_snapshot(ledger: Ledger, key: str) -> Snapshot | None:
    r = ledger.conn.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
    return None if r is None else _row(r)


def list_snapshots(ledger: Ledger, owner: str | None = None) -> list[Snapshot]:
    sql = f"SELECT {_COLUMNS} FROM snapshots"
    args: tuple[str, ...] = ()
    if owner is not None:
        sql += " WHERE owner = ?"
        args = (owner,)
    return [_row(r) for r in ledger.conn.execute(sql + " ORDER BY id", args)]


def claim_take(
    ledger: Ledger,
    key: str,
    parts: dict[str, str],
    *,
    function: str,
    owner: str,
    image: str,
    job_id: int,
    now: float,
) -> bool:
    """Claim the taking of this key's snapshot for a job: True for a new key or one in
    ``retry``; False while another job takes it, or when it is ready or failed."""
    with ledger._tx() as c:
        cur = c.execute(
            "INSERT OR IGNORE INTO snapshots (key, parts, function, owner, image, state, "
            "created_at, taken_by) VALUES (?, ?, ?, ?, ?, 'taking', ?, ?)",
            (key, json.dumps(parts, sort_keys=True), function, owner, image, now, job_id),
        )
        if cur.rowcount == 1:
            return True
        cur = c.execute(
            "UPDATE snapshots SET state = 'taking', taken_by = ?, location = NULL, "
            "size = 0 WHERE key = ? AND state = 'retry'",
            (job_id, key),
        )
        return cur.rowcount == 1


def mark_ready(ledger: Ledger, key: str, location: str, size: int, now: float) -> None:
    # (failures stays: only a good restore shows that the snapshot works)
    with ledger._tx() as c:
        c.execute(
            "UPDATE snapshots SET state = 'ready', location = ?, size = ?, "
            "created_at = ?, last_used = ? WHERE key = ?",
            (location, size, now, now, key),
        )


def abandon_take(ledger: Ledger, key: str) -> None:
    """The take did not happen for a reason that is not the snapshot's (the user's setup
    raised): forget the claim, so that the next call tries again."""
    with ledger._tx() as c:
        c.execute(
            "DELETE FROM snapshots WHERE key = ? AND state = 'taking' "
            "AND location IS NULL AND restores = 0 AND failures = 0",
            (key,),
        )
        c.execute("UPDATE snapshots SET state = 'retry' WHERE key = ? AND state = 'taking'", (key,))


def record_restore(ledger: Ledger, key: str, now: float) -> None:
    with ledger._tx() as c:
        c.execute(
            "UPDATE snapshots SET restores = restores + 1, last_used = ?, failures = 0 "
            "WHERE key = ?",
            (now, key),
        )


def record_failure(
    ledger: Ledger, key: str, error: str, max_failures: int, location: str | None = None
) -> str:
    """Count a failed take or restore; return the new state: ``retry``, or ``failed``
    when that was ``max_failures`` in a row. The snapshot's files are gone either way
    (the caller removes them). ``location``: the failed restore's snapshot; when that is
    not the key's current one (a concurrent restore of it already failed, and counted),
    nothing changes."""
    with ledger._tx() as c:
        guard, args = "", [error, max_failures, key]
        if location is not None:
            guard, args = " AND state = 'ready' AND location = ?", [*args, location]
        c.execute(
            "UPDATE snapshots SET failures = failures + 1, last_error = ?, "
            "location = NULL, size = 0, "
            "state = CASE WHEN failures + 1 >= ? THEN 'failed' ELSE 'retry' END "
            f"WHERE key = ?{guard}",
            args,
        )
        r = c.execute("SELECT state FROM snapshots WHERE key = ?", (key,)).fetchone()
    return str(r[0]) if r is not None else "retry"


def interrupted_takes(ledger: Ledger) -> None:
    """At start-up: takes that a stopped daemon left unfinished go back to ``retry``."""
    with ledger._tx() as c:
        c.execute(
            "UPDATE snapshots SET state = 'retry', last_error = 'the daemon stopped "
            "while it was being taken' WHERE state = 'taking'"
        )


def delete_snapshot(ledger: Ledger, snapshot_id: int) -> None:
    with ledger._tx() as c:
        c.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
