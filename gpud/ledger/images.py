"""Images built from ``gpud.Image`` definitions (#11), in the ledger: who asked for each
first, when it was built and last used (garbage collection goes by that), and its
definition. The image itself lives in Podman's store, named after its key; a row whose
image is gone (collected, or removed by hand) is rebuilt on the next ask.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpud.ledger.store import Ledger

__all__ = ["BuiltImage", "get_image", "list_images", "record_build", "touch_image"]

_COLUMNS = "key, name, creator, created_at, last_used, size, build_seconds, builds, spec"


@dataclass(frozen=True, slots=True)
class BuiltImage:
    key: str
    name: str
    creator: str
    created_at: float
    last_used: float
    size: int
    build_seconds: float
    builds: int
    spec: str


def _row(r: sqlite3.Row) -> BuiltImage:
    return BuiltImage(
        key=r["key"],
        name=r["name"],
        creator=r["creator"],
        created_at=r["created_at"],
        last_used=r["last_used"],
        size=r["size"],
        build_seconds=r["build_seconds"],
        builds=r["builds"],
        spec=r["spec"],
    )


def get_image(ledger: Ledger, key: str) -> BuiltImage | None:
    r = ledger.conn.execute(f"SELECT {_COLUMNS} FROM images WHERE key = ?", (key,)).fetchone()
    return None if r is None else _row(r)


def list_images(ledger: Ledger) -> list[BuiltImage]:
    return [
        _row(r) for r in ledger.conn.execute(f"SELECT {_COLUMNS} FROM images ORDER BY last_used")
    ]


def record_build(
    ledger: Ledger,
    *,
    key: str,
    name: str,
    creator: str,
    spec: str,
    size: int,
    seconds: float,
    now: float,
) -> None:
    """A build finished: a new row, or a rebuild of a collected one (its creator stays)."""
    with ledger._tx() as c:
        c.execute(
            "INSERT INTO images (key, name, creator, created_at, last_used, size, "
            "build_seconds, builds, spec) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?) "
            "ON CONFLICT(key) DO UPDATE SET created_at = excluded.created_at, "
            "last_used = excluded.last_used, size = excluded.size, "
            "build_seconds = excluded.build_seconds, builds = builds + 1",
            (key, name, creator, now, now, size, seconds, spec),
        )


def touch_image(ledger: Ledger, name: str, now: float) -> bool:
    """A job or a build uses this image now; False if gpud did not build it."""
    with ledger._tx() as c:
        cur = c.execute("UPDATE images SET last_used = ? WHERE name = ?", (now, name))
        return cur.rowcount == 1
