"""Who is on the other end of a Unix-socket connection: SO_PEERCRED under hypercorn.

The kernel knows the uid of the process that connected to a Unix socket (SO_PEERCRED),
and cannot be lied to about it, which makes it the natural identity of a local user (as
Docker's, Podman's and systemd's sockets use it). hypercorn, however, passes nothing of
the socket into the ASGI scope: for a Unix socket ``scope["client"]`` is None.

So gpud subclasses hypercorn's trio ``TCPServer`` (the object that owns each accepted
connection, Unix sockets included), reads SO_PEERCRED once per connection, and stores it
in a context variable. trio gives every task a copy of the context of the task that
started it, and hypercorn starts each request's ASGI task from the connection's task, so
the app sees the credentials of exactly the connection its request came on.

This leans on two details of hypercorn (``hypercorn.trio.run.TCPServer`` and its
``stream.socket``). :func:`install` checks them and returns False when they are not
there; the API then treats Unix-socket requests as unidentified and asks for a token,
and ``tests/test_auth.py`` fails loudly, so an upgrade cannot silently change who is
who.
"""

from __future__ import annotations

import contextvars
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["Peer", "current", "install", "read_peercred"]


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


_PEER: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("gpud_peer", default=None)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def current() -> Peer | None:
    """The credentials of the Unix-socket peer of the request being served, if known."""
    return _PEER.get()


def read_peercred(sock: Any) -> Peer | None:
    """SO_PEERCRED of a connected Unix socket (stdlib or trio); None for anything else."""
    if sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return Peer(pid, uid, gid)


def install() -> bool:
    """Hook hypercorn's trio server (once); False if this hypercorn lacks what it needs."""
    try:
        import hypercorn.trio.run as run_module
    except ImportError:
        return False
    base = getattr(run_module, "TCPServer", None)
    if not isinstance(base, type) or not hasattr(base, "run"):
        return False
    if getattr(base, "_gpud_peercred", False):
        return True

    class PeerCredTCPServer(base):  # type: ignore[valid-type,misc]  # hypercorn's class, found at run time
        _gpud_peercred = True

        async def run(self) -> None:
            sock = getattr(getattr(self, "stream", None), "socket", None)
            peer = None
            if sock is not None:
                try:
                    peer = read_peercred(sock)
                except OSError:
                    peer = None  # the peer is gone already; the request will fail anyway
            # This task's own context: only this connection's requests see it.
            _PEER.set(peer)
            await super().run()

    run_module.TCPServer = PeerCredTCPServer  # type: ignore[attr-defined]  # patching hypercorn
    return True
