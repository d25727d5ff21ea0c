"""The sync client's transport (gpud_client/wire.py, #12) against a real Unix socket
server that behaves as a daemon may: it closes a kept-alive connection while the client
holds it idle, it streams chunked NDJSON, it answers before reading a body and closes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpud_client import wire

Handler = Callable[[socket.socket, bytes], None]


def _read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[[Handler], tuple[str, list[bytes]]]]:
    """Serve each connection with a handler (it answers one request, then the server
    closes the connection); the requests' heads are recorded."""
    listeners: list[socket.socket] = []

    def start(handler: Handler) -> tuple[str, list[bytes]]:
        path = str(tmp_path / f"s{len(listeners)}.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(8)
        listeners.append(lsock)
        heads: list[bytes] = []

        def serve() -> None:
            while True:
                try:
                    conn, _ = lsock.accept()
                except OSError:
                    return
                with conn:
                    head = _read_head(conn)
                    heads.append(head)
                    handler(conn, head)

        threading.Thread(target=serve, daemon=True).start()
        return f"unix://{path}", heads

    yield start
    for lsock in listeners:
        lsock.close()


def _ok(conn: socket.socket, head: bytes) -> None:
    # No "Connection: close": the client keeps the connection, which is closed under it.
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")


def test_a_connection_closed_while_idle_is_not_reused(server) -> None:  # type: ignore[no-untyped-def]
    url, heads = server(_ok)
    t = wire.Transport(url, {"user-agent": "test", "authorization": "Bearer x"})
    try:
        for _ in range(3):
            r = t.request(
                "GET", "/v1/health", params={"a": "b c"}, connect_timeout=5, read_timeout=5
            )
            assert (r.status_code, r.content, r.is_success) == (200, b"{}", True)
        assert len(heads) == 3
        assert heads[0].startswith(b"GET /v1/health?a=b+c HTTP/1.1\r\n")
        assert b"authorization: Bearer x" in heads[0] and b"Host: gpud" in heads[0]
    finally:
        t.close()


def test_a_chunked_stream_is_read_line_by_line(server) -> None:  # type: ignore[no-untyped-def]
    def ndjson(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for line in (b'{"n": 1}\n', b'{"n": 2}\n{"n"', b": 3}\n"):
            conn.sendall(b"%x\r\n%s\r\n" % (len(line), line))
        conn.sendall(b"0\r\n\r\n")

    url, _ = server(ndjson)
    t = wire.Transport(url, {})
    r = t.request("GET", "/x", connect_timeout=5, read_timeout=5, stream=True)
    assert list(r.iter_lines()) == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    t.close()


def test_an_answer_sent_before_the_body_was_read_is_returned(server) -> None:  # type: ignore[no-untyped-def]
    def busy(conn: socket.socket, head: bytes) -> None:
        conn.sendall(
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n"
            b"content-length: 4\r\nconnection: close\r\n\r\nbusy"
        )
        conn.shutdown(socket.SHUT_RDWR)  # the rest of the body is never read

    url, _ = server(busy)
    t = wire.Transport(url, {})
    r = t.request("POST", "/v1/jobs", body=b"x" * (16 << 20), connect_timeout=5, read_timeout=5)
    assert (r.status_code, r.headers.get("Retry-After"), r.text) == (503, "1", "busy")
    t.close()


def test_no_socket_is_a_connect_error_and_nothing_leaks(tmp_path: Path) -> None:
    t = wire.Transport(f"unix://{tmp_path}/none.sock", {})
    with pytest.raises(wire.ConnectError):
        t.request("GET", "/v1/health", connect_timeout=5, read_timeout=5)
    t.close()  # (an unclosed socket would fail the test: filterwarnings=error)
