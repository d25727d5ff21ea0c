"""The ledger reads dependencies need (#14): the owner and state of the jobs a submit
names in ``after``, in one query (run on the ledger thread)."""

from __future__ import annotations

from collections.abc import Iterable

from gpud.domain import JobState
from gpud.ledger.store import Ledger

__all__ = ["owners_and_states"]


def owners_and_states(ledger: Ledger, ids: Iterable[int]) -> dict[int, tuple[str, JobState]]:
    """id -> (owner, state) of those of ``ids`` that exist (removed ones do not)."""
    wanted = sorted(set(ids))
    out: dict[int, tuple[str, JobState]] = {}
    for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
        chunk = wanted[i : i + 500]
        rows = ledger.conn.execute(
            f"SELECT id, owner, state FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk
        ).fetchall()
        out.update((int(r[0]), (str(r[1]), JobState(r[2]))) for r in rows)
    return out
