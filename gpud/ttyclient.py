"""The client side of the daemon's WebSockets (#14): a small blocking WebSocket client on
wsproto (already installed with hypercorn), over the same Unix socket or TCP address
and the same token as every other request."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from gpud_client.paths import normalise_url, resolve_url

__all__ = ["Refused", "WebSocket"]


class Refused(Exception):
    """The daemon refused (``{"error": ...}``): its HTTP status, code and detail."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class WebSocket:
    def __init__(self, path: str, url: str | None = None, token: str | None = None) -> None:
        url = normalise_url(url) if url else resolve_url()
        if url.startswith("unix://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(url.removeprefix("unix://"))
            host = "gpud"
        else:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.hostname or "localhost"
            self.sock = socket.create_connection((host, port))
            if parts.scheme == "https":
                ctx = ssl.create_default_context()
                self.sock = ctx.wrap_socket(self.sock, server_hostname=host)
        self.ws = WSConnection(ConnectionType.CLIENT)
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self.sock.sendall(self.ws.send(Request(host=host, target=path, extra_headers=headers)))
        self._text: list[str] = []
        #: what came in with the handshake's answer, for the first read()
        self.pending: list[tuple[str, Any]] = []
        while True:
            events = list(self._events())
            for i, (kind, value) in enumerate(events):
                if kind == "open":
                    self.pending = events[i + 1 :]
                    return
                if kind == "rejected":
                    raise Refused(int(value), "rejected", f"the daemon refused ({value})")
            if any(kind == "closed" for kind, _ in events):
                break
        raise ConnectionError("the daemon closed the connection during the WebSocket handshake")

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def send_json(self, obj: Any) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=json.dumps(obj))))

    def close(self) -> None:
        # Closing anyway, whatever state the connection was in.
        with contextlib.suppress(Exception):
            self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        self.sock.close()

    def _events(self) -> Iterator[tuple[str, Any]]:
        """("open"|"rejected"|"bytes"|"json"|"closed", value) for what one read brings."""
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                yield "open", None
            elif isinstance(event, RejectConnection):
                yield "rejected", event.status_code
            elif isinstance(event, RejectData):
                continue
            elif isinstance(event, BytesMessage):
                yield "bytes", bytes(event.data)
            elif isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    text, self._text = "".join(self._text), []
                    msg = json.loads(text)
                    if isinstance(msg, dict) and "error" in msg:
                        err = msg["error"]
                        raise Refused(int(err["status"]), str(err["code"]), str(err["detail"]))
                    yield "json", msg
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                with contextlib.suppress(Exception):  # the peer may be gone already
                    self.sock.sendall(self.ws.send(event.response()))
                yield "closed", event.code
        if not data:
            yield "closed", None

    def read(self) -> list[tuple[str, Any]]:
        """What one socket read brings (call when the socket is readable)."""
        if self.pending:  # already here: no blocking read for more
            pending, self.pending = self.pending, []
            return pending
        return list(self._events())
