"""The synchronous client's HTTP/1.1 transport, on the standard library's http.client.

Why not httpx here (#12): importing httpx costs ~0.3 s on a small box. httpcore imports
trio whenever it is installed, and httpx imports its own command line (rich, pygments).
Every `gpud ps` paid that before it sent its one request. The sync :class:`Client` (the
CLI, the decorator API) speaks through this module; the async client keeps httpx, which
it needs for trio and asyncio alike.

What it does: a small pool of keep-alive connections (Unix socket or TCP, TLS for
https://), a connect timeout and a read timeout per request, streamed answers (chunked
or not), and errors in the shape of httpx's, so that one error mapping and one retry
policy (:mod:`gpud_client.client`) serve both clients.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
    "TimeoutException",
    "Transport",
    "TransportError",
]


class TransportError(Exception):
    """The request did not get a whole answer: the socket, not the daemon, failed."""


class ConnectError(TransportError):
    """No connection was made (no socket, refused, a full backlog): nothing was sent."""


class TimeoutException(TransportError):
    pass


class ConnectTimeout(TimeoutException):
    pass


class ReadTimeout(TimeoutException):
    pass


class RemoteProtocolError(TransportError):
    """The connection was made, then dropped or answered nonsense: the request may have
    reached the daemon."""


#: The most idle keep-alive connections a client keeps (the sync client is used from a
#: few threads at most: a .map's result stream beside a submit, say).
MAX_IDLE = 8


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        # The host is never used for routing over a Unix socket; "gpud" makes the Host
        # header recognisable, as before (#5 logs it).
        super().__init__("gpud", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()  # a client that waits out a daemon restart must not leak one a try
            raise
        self.sock = sock


class Response:
    """A status, headers and a body read whole (``content``) or as it comes (``iter_*``).
    The attributes the shared error mapping reads are those of httpx.Response."""

    def __init__(
        self, transport: Transport, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse
    ) -> None:
        self._transport = transport
        self._conn: http.client.HTTPConnection | None = conn
        self._raw = raw
        self.status_code = raw.status
        self.reason_phrase = raw.reason
        self.headers = raw.headers  # an email.message.Message: .get() ignores case
        self._content: bytes | None = None

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def content(self) -> bytes:
        if self._content is None:
            self.read()
        assert self._content is not None
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def read(self) -> bytes:
        if self._content is None:
            with _mapped():
                self._content = self._raw.read()
            self.close()
        return self._content

    def iter_bytes(self) -> Iterator[bytes]:
        """Chunks as they arrive (a followed log must show each write at once)."""
        with _mapped():
            while chunk := self._raw.read1(65536):
                yield chunk
        self.close()

    def iter_lines(self) -> Iterator[bytes]:
        with _mapped():
            while line := self._raw.readline():
                yield line.rstrip(b"\r\n")
        self.close()

    def close(self) -> None:
        """Give the connection back when the answer was read to its end; otherwise close
        it (bytes left in it would be taken for the next answer)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._raw.isclosed() and not self._raw.will_close:
            self._transport._put(conn)
        else:
            self._raw.close()
            self._transport._drop(conn)


class _mapped:
    """Socket and protocol errors, as the transport's errors (read after connecting)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: object) -> None:
        if e is None or isinstance(e, TransportError):
            return
        if isinstance(e, TimeoutError):
            raise ReadTimeout(str(e) or "timed out") from e
        if isinstance(e, http.client.RemoteDisconnected):
            raise RemoteProtocolError("Server disconnected without sending a response.") from e
        if isinstance(e, OSError | http.client.HTTPException):
            raise RemoteProtocolError(str(e) or type(e).__name__) from e


class Transport:
    """Keep-alive connections to one daemon, shared by the threads of one client."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        #: sent with every request: the user agent and the API token (#5)
        self.headers = headers
        #: called with (method, path) before each request is sent (tests count requests)
        self.on_request: list[Callable[[str, str], None]] = []
        self._idle: list[http.client.HTTPConnection] = []
        # Connections in use, kept here too: a stream abandoned in a reference cycle (a
        # generator kept by a traceback) is then closed by the generator's finalizer,
        # never found unclosed by the socket's own (a ResourceWarning) first.
        self._busy: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._tls: Any = None
        if url.startswith("unix://"):
            self._socket_path: str | None = url.removeprefix("unix://")
            self._prefix = ""
        else:
            self._socket_path = None
            parts = urlsplit(url)
            self._scheme, self._netloc = parts.scheme, parts.netloc
            self._prefix = parts.path.rstrip("/")

    def _new(self, connect_timeout: float | None) -> http.client.HTTPConnection:
        if self._socket_path is not None:
            return _UnixConnection(self._socket_path, connect_timeout)
        if self._scheme == "https":
            if self._tls is None:
                import ssl

                # One context a client: making one loads the CA bundle (~25 ms).
                self._tls = ssl.create_default_context()
            return http.client.HTTPSConnection(
                self._netloc, timeout=connect_timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._netloc, timeout=connect_timeout)

    def _take(self) -> http.client.HTTPConnection | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                # A keep-alive connection the daemon closed while it sat idle reads as
                # ready (EOF): drop it rather than send a request into it.
                if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                    self._busy.add(conn)
                    return conn
                conn.close()
        return None

    def _put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._busy.discard(conn)
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._busy.discard(conn)
        conn.close()

    def _connect(self, connect_timeout: float | None) -> http.client.HTTPConnection:
        conn = self._new(connect_timeout)
        try:
            conn.connect()
        except TimeoutError as e:
            conn.close()
            raise ConnectTimeout(str(e) or "timed out") from e
        except OSError as e:
            conn.close()
            raise ConnectError(str(e)) from e
        with self._lock:
            self._busy.add(conn)
        return conn

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        connect_timeout: float | None,
        read_timeout: float | None,
        stream: bool = False,
    ) -> Response:
        """Send one request; the answer whole, or (``stream``) with its body unread: the
        caller reads it and closes the Response."""
        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        for hook in self.on_request:
            hook(method, self._prefix + path)
        all_headers = {**self.headers, **(headers or {})}
        reused = self._take()
        if reused is not None and method == "GET":
            try:
                return self._exchange(
                    reused, method, target, body, all_headers, read_timeout, stream
                )
            except RemoteProtocolError as e:
                # A keep-alive connection the daemon closed just as it was taken (its
                # idle timeout): nothing was answered, and a GET is safe to send again.
                if not isinstance(e.__cause__, OSError | http.client.RemoteDisconnected):
                    raise
        conn = reused if reused is not None and method != "GET" else None
        return self._exchange(
            conn or self._connect(connect_timeout),
            method,
            target,
            body,
            all_headers,
            read_timeout,
            stream,
        )

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str],
        read_timeout: float | None,
        stream: bool,
    ) -> Response:
        try:
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout)
            with _mapped():
                try:
                    conn.request(method, target, body=body, headers=headers)
                except OSError as unsent:
                    # The daemon may have answered before it read the whole body, and
                    # closed: a 503 for a body over its budget (#10). Read that answer.
                    try:
                        raw = conn.getresponse()
                    except (OSError, http.client.HTTPException):
                        raise unsent from None
                else:
                    raw = conn.getresponse()
        except BaseException:
            self._drop(conn)
            raise
        resp = Response(self, conn, raw)
        if not stream:
            try:
                resp.read()
            except BaseException:
                resp.close()
                raise
        return resp

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()  # (those in use are closed as their answers are)
