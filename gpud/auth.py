"""Authentication and authorisation of API requests (issue #5).

Who a request comes from:

* **On the Unix socket**, the kernel says: the peer's uid (SO_PEERCRED, read by
  :mod:`gpud.peercred`). Root and the daemon's own user are admins; any other uid must be
  a gpud user of the same name (`gpud admin user add NAME`). An ``Authorization`` header
  is ignored there: the kernel's word is better than a token's, and a token meant for
  another daemon (a personal one, say) must not lock its owner out.
* **On TCP**, a bearer token, always, loopback included: every local user can reach a
  loopback port, whatever the socket's permissions.
* **On the Unix socket without peer credentials** (should a hypercorn upgrade break the
  hook): a daemon run by a user treats the caller as itself (its socket is 0600, so only
  that user, or root, can connect); a daemon run by root asks for a token.

Authorisation is small: users see and act on their own jobs, admins on all; only admins
may raise a job's priority above 0 (otherwise anyone could jump the fair-share queue,
which is why Slurm only lets privileged users lower their nice value); and the quotas
that are checked at submit. Every refusal is an exception the API turns into a 401, 403
or 422 with a message that says what to do, and logs.
"""

from __future__ import annotations

import os
import pwd
import time

from starlette.requests import Request

from gpud import peercred
from gpud.domain import Job, Quota
from gpud.users import Directory, Principal, unix_account

__all__ = [
    "Auth",
    "Forbidden",
    "QuotaExceeded",
    "Unauthenticated",
    "check_job_access",
    "effective_timeout",
]


class Unauthenticated(Exception):
    """401: we do not know who this is."""


class Forbidden(Exception):
    """403: we know who it is, and they may not do this."""


class QuotaExceeded(Exception):
    """422: a submit over one of the user's quotas."""


class _Names:
    """uid -> Unix name, remembered for 10 s: every request on the socket asks, and with
    LDAP or SSSD behind NSS a lookup can cost a round trip. Short, because a uid can be
    deleted and given to someone else."""

    TTL = 10.0

    def __init__(self) -> None:
        self._seen: dict[int, tuple[str | None, float]] = {}

    def __call__(self, uid: int) -> str | None:
        now = time.monotonic()
        hit = self._seen.get(uid)
        if hit is not None and now - hit[1] < self.TTL:
            return hit[0]
        try:
            name: str | None = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = None
        self._seen[uid] = (name, now)
        return name


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Auth:
    def __init__(self, directory: Directory, *, daemon_uid: int | None = None) -> None:
        self.directory = directory
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        self._name_of = _Names()

    async def authenticate(self, request: Request) -> Principal:
        unix = request.scope.get("client") is None
        if unix:
            peer = peercred.current()
            if peer is not None:
                return await self._from_uid(peer.uid)
            if self.daemon_uid != 0:
                # A user's daemon: its socket is 0600, so this is its owner (or root).
                return self._admin(self.daemon_uid, via="owner")
        token = _bearer(request)
        if token is None:
            raise Unauthenticated(
                "this request needs an API token: send `Authorization: Bearer TOKEN` "
                "(gpud_client and the gpud command read GPUD_TOKEN, or the token file "
                "~/.config/gpud/token); an admin creates users and their tokens with "
                "`gpud admin user add NAME`"
            )
        user = await self.directory.by_token(token)
        if user is None:
            raise Unauthenticated(
                "the API token is not valid here (mistyped, rotated, or its user was "
                "removed): ask an admin for a new one (`gpud admin token rotate NAME`)"
            )
        return Principal(user.name, user.admin, "token", None, user.quota)

    def _admin(self, uid: int, *, via: str) -> Principal:
        name = self._name_of(uid) or f"uid{uid}"
        user = self.directory.get(name)
        return Principal(name, True, via, uid, user.quota if user else Quota())

    async def _from_uid(self, uid: int) -> Principal:
        if uid in (0, self.daemon_uid):
            return self._admin(uid, via="peer")
        name = self._name_of(uid)
        if name is None:
            raise Forbidden(
                f"uid {uid} has no user name on this machine, so it cannot be a gpud user"
            )
        user = await self.directory.user(name)
        if user is None:
            raise Forbidden(
                f"{name} (uid {uid}) is not a user of this gpud: ask an admin to run "
                f"`sudo gpud admin user add {name}`"
            )
        return Principal(name, user.admin, "peer", uid, user.quota)

    def check_submit(self, who: Principal, *, priority: int, jobs: int, queued: int) -> None:
        """Refuse a submit this user may not make (Forbidden) or that is over their queued
        quota (QuotaExceeded)."""
        if self.daemon_uid == 0 and who.via == "token" and unix_account(who.name) is None:
            raise Forbidden(
                f"user {who.name!r} has no Unix account on this machine; jobs run as their "
                "submitter's Unix user, so only users with an account can submit here"
            )
        if priority > 0 and not who.admin:
            raise Forbidden(
                "only admins may give a job a priority above 0 (fair share decides between "
                "users); use 0 or a negative priority to order your own jobs"
            )
        limit = who.quota.max_queued
        if limit is not None and queued + jobs > limit:
            raise QuotaExceeded(
                f"{who.name} may have at most {limit} jobs queued (quota); {queued} are "
                f"queued and this submits {jobs}: wait for some to start, or ask an admin "
                f"to raise it (`gpud admin quota set {who.name} --queued N`)"
            )


def effective_timeout(who: Principal, requested: float | None, default: float) -> float:
    """The job's timeout: as asked (refused above the user's max_timeout quota), or the
    daemon's default capped at that quota."""
    cap = who.quota.max_timeout
    if requested is None:
        return default if cap is None else min(default, cap)
    if cap is not None and requested > cap:
        raise QuotaExceeded(
            f"timeout {requested:g} s is longer than {who.name}'s max_timeout quota "
            f"({cap:g} s): ask for less, or ask an admin to raise it"
        )
    return requested


def check_job_access(who: Principal, job: Job, action: str) -> None:
    """Users act on their own jobs; admins on all (Forbidden otherwise)."""
    if who.admin or job.owner == who.name:
        return
    raise Forbidden(
        f"job {job.id} belongs to {job.owner}: {who.name} may only {action} their own jobs "
        "(admins may act on all)"
    )
