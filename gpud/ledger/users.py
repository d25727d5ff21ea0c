"""Users in the ledger: names, the admin flag, hashed API tokens and quotas (issue #5).

The ledger stores only the SHA-256 of a token: whoever reads the database (or a backup
of it) learns no token. Tokens are 32 random bytes, so a plain hash is enough; a slow
password hash would buy nothing against guessing and cost every request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpud.domain import Quota

if TYPE_CHECKING:
    from gpud.ledger.store import Ledger

__all__ = [
    "USER_NAME_RE",
    "UnknownUser",
    "User",
    "UserExists",
    "add_user",
    "get_user",
    "list_users",
    "remove_user",
    "set_admin",
    "set_quota",
    "set_token",
]

#: What a gpud user name may be: a Unix user name (it is one, on a root daemon).
USER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


class UnknownUser(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no gpud user {self.name!r}"


class UserExists(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class User:
    name: str
    admin: bool
    token_hash: str | None
    created_at: float
    quota: Quota


_COLUMNS = "name, admin, token_hash, created_at, max_gpus, max_queued, max_timeout"


def _row(r: tuple[object, ...]) -> User:
    name, admin, token_hash, created_at, max_gpus, max_queued, max_timeout = r
    assert isinstance(name, str) and isinstance(created_at, float | int)
    return User(
        name=name,
        admin=bool(admin),
        token_hash=token_hash if isinstance(token_hash, str) else None,
        created_at=float(created_at),
        quota=Quota(
            max_gpus=int(max_gpus) if isinstance(max_gpus, int) else None,
            max_queued=int(max_queued) if isinstance(max_queued, int) else None,
            max_timeout=float(max_timeout) if isinstance(max_timeout, float | int) else None,
        ),
    )


def list_users(ledger: Ledger) -> list[User]:
    rows = ledger.conn.execute(f"SELECT {_COLUMNS} FROM users ORDER BY name")
    return [_row(tuple(r)) for r in rows]


def get_user(ledger: Ledger, name: str) -> User:
    r = ledger.conn.execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
    if r is None:
        raise UnknownUser(name)
    return _row(tuple(r))


def add_user(ledger: Ledger, name: str, *, admin: bool, token_hash: str | None, now: float) -> User:
    if not USER_NAME_RE.match(name):
        raise ValueError(
            f"invalid user name {name!r}: use a Unix user name (letters, digits, '_', '.', "
            "'-'; at most 32 characters, not starting with a digit)"
        )
    with ledger._tx() as c:
        if c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
            raise UserExists(f"gpud user {name!r} already exists")
        c.execute(
            "INSERT INTO users (name, admin, token_hash, created_at) VALUES (?, ?, ?, ?)",
            (name, int(admin), token_hash, now),
        )
    return get_user(ledger, name)


def _update(ledger: Ledger, name: str, sets: str, params: tuple[object, ...]) -> User:
    with ledger._tx() as c:
        cur = c.execute(f"UPDATE users SET {sets} WHERE name = ?", (*params, name))
        if cur.rowcount == 0:
            raise UnknownUser(name)
    return get_user(ledger, name)


def remove_user(ledger: Ledger, name: str) -> None:
    """Forget the user (their jobs and accounting stay, under their name)."""
    with ledger._tx() as c:
        if c.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
            raise UnknownUser(name)


def set_token(ledger: Ledger, name: str, token_hash: str | None) -> User:
    return _update(ledger, name, "token_hash = ?", (token_hash,))


def set_admin(ledger: Ledger, name: str, admin: bool) -> User:
    return _update(ledger, name, "admin = ?", (int(admin),))


def set_quota(ledger: Ledger, name: str, quota: Quota) -> User:
    return _update(
        ledger,
        name,
        "max_gpus = ?, max_queued = ?, max_timeout = ?",
        (quota.max_gpus, quota.max_queued, quota.max_timeout),
    )
