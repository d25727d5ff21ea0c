"""Users of a shared box: tokens, the daemon's view of the users table, and run-as.

* **Tokens** are ``gpud_`` + 32 random bytes (URL-safe base64); the ledger keeps only
  their SHA-256 (:mod:`gpud.ledger.users`).
* :class:`Directory` is the daemon's cache of the users table. `gpud admin` changes the
  table through a connection of its own (SQLite WAL allows it while the daemon runs), so
  the daemon re-reads it every second, and at once (at most every 0.2 s) when a request
  names a user or token it does not know: a user just added works at once, a removed user
  or a rotated token stops working within a second.
* :func:`run_as` is who a job runs as: its submitter's Unix user (uid, gid and groups) on
  a daemon run by root, never root itself; the daemon's own user otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from gpud.domain import Quota
from gpud.identity import JobIdentity
from gpud.ledger import LedgerThread
from gpud.ledger.users import User, list_users

__all__ = [
    "Directory",
    "NoUnixAccount",
    "Principal",
    "hash_token",
    "new_token",
    "run_as",
    "unix_account",
]

log = logging.getLogger("gpud.users")

TOKEN_PREFIX = "gpud_"


def new_token() -> str:
    """A fresh API token (shown once, stored only hashed). The prefix lets secret
    scanners and people recognise one."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from, once authenticated."""

    name: str
    admin: bool
    #: how we know: "peer" (SO_PEERCRED on the Unix socket), "token", or "owner" (a
    #: daemon run by a user, whose 0600 socket only that user can reach)
    via: str
    uid: int | None = None  # the peer's uid when identified by SO_PEERCRED
    quota: Quota = field(default_factory=Quota)


class NoUnixAccount(ValueError):
    """A user with no Unix account cannot run jobs on a daemon run by root."""


def unix_account(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def run_as(owner: str, default: JobIdentity) -> JobIdentity:
    """The identity a job of ``owner`` runs as.

    A daemon run by a user runs everything as itself (``default``, which cannot switch).
    A daemon run by root runs a job as its owner's Unix user, with their primary group
    and supplementary groups (so group-shared datasets work as in the user's shell); an
    owner whose account is uid 0 (root, or an alias of it) runs as ``job_user`` instead,
    because jobs never run as root.
    """
    if not default.switch:
        return default
    pw = unix_account(owner)
    if pw is None:
        raise NoUnixAccount(
            f"user {owner!r} has no Unix account on this machine; jobs run as their "
            "submitter's Unix user, so only users with an account can run jobs here"
        )
    if pw.pw_uid == 0:
        return default
    # Exactly what initgroups(3) gives a login shell: the primary group and every group
    # the user is a member of (os.getgrouplist includes the primary one).
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    return JobIdentity(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, switch=True, groups=groups)


class Directory:
    """The daemon's cache of the users table (see the module docstring)."""

    REFRESH = 1.0  # seconds between periodic re-reads
    MISS_REFRESH = 0.2  # at most this often on an unknown name or token

    def __init__(
        self,
        ledger: LedgerThread,
        *,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._on_change = on_change
        self._clock = clock
        self._by_name: dict[str, User] = {}
        self._by_token: dict[str, User] = {}
        self._loaded_at = -1e18
        self._lock = trio.Lock()

    # -- reading --------------------------------------------------------------------

    def get(self, name: str) -> User | None:
        return self._by_name.get(name)

    def quotas(self) -> dict[str, Quota]:
        return {u.name: u.quota for u in self._by_name.values() if u.quota != Quota()}

    def quota(self, name: str) -> Quota:
        user = self._by_name.get(name)
        return user.quota if user is not None else Quota()

    async def user(self, name: str) -> User | None:
        """The user called ``name``, re-reading the table first if it is not known."""
        found = self._by_name.get(name)
        if found is None and await self._refresh_on_miss():
            found = self._by_name.get(name)
        return found

    async def by_token(self, token: str) -> User | None:
        h = hash_token(token)
        found = self._by_token.get(h)
        if found is None and await self._refresh_on_miss():
            found = self._by_token.get(h)
        return found

    # -- refreshing -----------------------------------------------------------------

    async def refresh(self) -> None:
        users = await self._ledger.call(list_users)
        by_name = {u.name: u for u in users}
        self._loaded_at = self._clock()
        if by_name == self._by_name:
            return
        self._by_name = by_name
        self._by_token = {u.token_hash: u for u in users if u.token_hash}
        log.debug("users: %s", ", ".join(sorted(by_name)) or "none")
        if self._on_change is not None:
            self._on_change()  # quotas may have changed: schedule again

    async def _refresh_on_miss(self) -> bool:
        """Re-read the table because a request named someone unknown; True if it was.

        At most one read per 0.2 s, whoever asks: a miss right after a read waits for the
        rest of those 0.2 s (so a user added a moment ago is still found), and a client
        hammering with wrong tokens costs one query per 0.2 s, and waits for each answer.
        """
        seen = self._loaded_at
        async with self._lock:
            if self._loaded_at != seen:
                return True  # someone else re-read it while we queued
            wait = self.MISS_REFRESH - (self._clock() - self._loaded_at)
            if wait > 0:
                await trio.sleep(wait)
            await self.refresh()
        return True

    async def run(self) -> None:
        """Re-read the table every second, for the daemon's life."""
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a failed read must not stop the daemon
                log.exception("reading the users table failed")
            await trio.sleep(self.REFRESH)
