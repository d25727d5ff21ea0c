"""The inside of a `gpud shell` job (#14): a shell on a PTY, served on a Unix socket.

`gpud shell` submits :func:`session` as an ordinary job, so it is queued, placed on GPUs,
accounted and counted in fair share like any other, and runs as its owner in the job's
environment (CUDA_VISIBLE_DEVICES and the rest) under either executor: in a process, or
in the job's container. This module is pickled by value with it (the worker has only
the standard library and cloudpickle), so it imports nothing but the standard library.

The job owns the PTY: it spawns the user's login shell on the slave side (its own session,
the slave as controlling terminal) and listens on ``tty.sock`` in the job directory (mode
0600, the job's user; the daemon reaches it as root or as that same user). The daemon's
``/v1/jobs/{id}/tty`` WebSocket relays one client at a time to it. A client that goes
away detaches: the shell keeps running, its latest output is kept for the next attach.

Frames on the socket, both ways: one type byte, a 4-byte big-endian length, the payload.
``d`` terminal bytes; ``r`` a resize, ``b"ROWS COLS"``; ``x`` (to the client) the shell
exited, ``b"CODE"``; ``q`` (to the client) another client attached in its place.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import selectors
import signal
import socket
import struct
import subprocess
import termios
import time

GPUD_PICKLE_BY_VALUE = True  # gpud_client.payload: ship this module with the function

SOCKET_NAME = "tty.sock"
DATA, RESIZE, EXIT, REPLACED = b"d", b"r", b"x", b"q"
HEADER = ">cI"  # a format, not a struct.Struct: this module is pickled by value
HEADER_SIZE = struct.calcsize(HEADER)
MAX_FRAME = 1 << 20
#: output kept while no client is attached, replayed to the next one
BACKLOG = 64 * 1024


class ShellIdle(Exception):
    """The session had no client and no input for longer than its idle timeout."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(HEADER, kind, len(payload)) + payload


class FrameReader:
    """Splits a byte stream into (type, payload) frames."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= HEADER_SIZE:
            kind, size = struct.unpack_from(HEADER, self.buf)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes")
            if len(self.buf) < HEADER_SIZE + size:
                break
            out.append((kind, bytes(self.buf[HEADER_SIZE : HEADER_SIZE + size])))
            del self.buf[: HEADER_SIZE + size]
        return out


def user_shell() -> list[str]:
    """The job user's login shell from its passwd entry, else /bin/bash (else /bin/sh)."""
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    for cand in (shell, "/bin/bash", "/bin/sh"):
        if cand and os.access(cand, os.X_OK) and not cand.endswith(("nologin", "false")):
            return [cand]
    return ["/bin/sh"]


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _make_controlling() -> None:  # runs in the child, after setsid
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def session(
    argv: list[str] | None = None,
    *,
    term: str = "xterm-256color",
    rows: int = 24,
    cols: int = 80,
    idle_timeout: float = 3600.0,
) -> None:
    """Run the shell (or ``argv``) on a PTY until it exits; its exit code becomes the
    job's outcome: 0 succeeded, anything else ``SystemExit(code)`` (failed)."""
    jobdir = os.getcwd()  # the worker runs in the job directory (both executors)
    cmd = argv or user_shell()
    env = dict(os.environ, TERM=term, GPUD_SHELL="1")
    home = env.get("HOME", "")
    cwd = home if home and os.path.isdir(home) and os.access(home, os.X_OK) else jobdir
    master, slave = os.openpty()
    set_size(slave, rows, cols)
    path = os.path.join(jobdir, SOCKET_NAME)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # an earlier attempt's
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # 0600 from the start: no window where others may connect
    try:
        listener.bind(SOCKET_NAME)  # relative: a job directory's path may pass 108 bytes
    finally:
        os.umask(old_umask)
    listener.listen(4)
    proc = subprocess.Popen(
        cmd,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env=env,
        start_new_session=True,
        preexec_fn=_make_controlling,
        close_fds=True,
    )
    os.close(slave)
    try:
        code = _serve(proc, master, listener, idle_timeout)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(master)
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGHUP)
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if code != 0:
        raise SystemExit(code)


def _serve(
    proc: subprocess.Popen[bytes], master: int, listener: socket.socket, idle_timeout: float
) -> int:
    sel = selectors.DefaultSelector()
    sel.register(master, selectors.EVENT_READ, "pty")
    sel.register(listener, selectors.EVENT_READ, "listen")
    client: socket.socket | None = None
    reader = FrameReader()
    backlog = bytearray()
    last = time.monotonic()

    def drop() -> None:
        nonlocal client
        if client is not None:
            sel.unregister(client)
            client.close()
            client = None

    while True:
        if client is None and time.monotonic() - last > idle_timeout:
            raise ShellIdle(
                f"the shell was idle (no client attached, no input) for {idle_timeout:g} s "
                "(the daemon's shell_idle_timeout)"
            )
        events = sel.select(timeout=1.0)
        if not events and proc.poll() is not None:
            # Exited while something it started still holds the terminal open.
            code = proc.returncode
            code = 128 - code if code < 0 else code
            if client is not None:
                with contextlib.suppress(OSError):
                    client.sendall(frame(EXIT, str(code).encode()))
            drop()
            return code
        for key, _ in events:
            if key.data == "listen":
                conn, _ = listener.accept()
                if client is not None:
                    with contextlib.suppress(OSError):
                        client.sendall(frame(REPLACED))
                    drop()
                client, reader, last = conn, FrameReader(), time.monotonic()
                sel.register(client, selectors.EVENT_READ, "client")
                if backlog:
                    with contextlib.suppress(OSError):
                        client.sendall(frame(DATA, bytes(backlog)))
                    backlog.clear()
            elif key.data == "pty":
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave fd closed, the shell is gone
                    data = b""
                if not data:
                    code = proc.wait()
                    code = 128 - code if code < 0 else code  # killed by signal N: 128+N
                    if client is not None:
                        with contextlib.suppress(OSError):
                            client.sendall(frame(EXIT, str(code).encode()))
                    drop()
                    return code
                if client is not None:
                    try:
                        client.sendall(frame(DATA, data))
                        continue
                    except OSError:
                        drop()
                backlog += data
                del backlog[:-BACKLOG]
            elif client is not None:
                try:
                    chunk = client.recv(65536)
                    frames = reader.feed(chunk) if chunk else None
                except (OSError, ValueError):
                    frames = None
                if frames is None:
                    drop()  # detached: the shell goes on
                    last = time.monotonic()
                    continue
                for kind, payload in frames:
                    last = time.monotonic()
                    if kind == DATA:
                        view = memoryview(payload)
                        while view:
                            view = view[os.write(master, view) :]
                    elif kind == RESIZE:
                        with contextlib.suppress(ValueError, OSError):
                            r, c = (int(x) for x in payload.split())
                            set_size(master, r, c)
