"""The word that a warm result is stored (#12): it rides on the worker's next task when
the worker said in its hello that it takes it there, goes alone once the worker is idle,
and goes at once, alone, to a worker that did not say so (an older runtime, e.g. restored
from an older snapshot, would skip a task that carries it). A real hub socket; the worker
side is this test, speaking the protocol."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import trio

from gpud.domain import Job, JobState
from gpud.warm import RESULT_INLINE_MAX, Done, WarmPool, WarmWorker, warm_key


async def _worker(pool: WarmPool, hello: dict[str, object]) -> tuple[trio.SocketStream, WarmWorker]:
    w = pool.new_worker(warm_key(Job(1, "f", JobState.QUEUED, 0.0, owner="u")), (), 30.0)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(pool.path))
    stream = trio.SocketStream(sock)
    await stream.send_all(json.dumps({"hello": w.token, **hello}).encode() + b"\n")
    with trio.fail_after(10):
        await w.hello.wait()
    return stream, w


class _Lines:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream, self.buf = stream, b""

    async def next(self) -> dict[str, object]:
        with trio.fail_after(10):
            while b"\n" not in self.buf:
                self.buf += await self.stream.receive_some()
        line, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, object] = json.loads(line)
        return out

    async def skip(self, n: int) -> None:
        with trio.fail_after(10):
            while len(self.buf) < n:
                self.buf += await self.stream.receive_some()
        self.buf = self.buf[n:]


async def _one_call(pool: WarmPool, w: WarmWorker, lines: _Lines, job_id: int) -> dict[str, object]:
    """Run a task through the pool; answer it as a worker would, with an inline result."""
    got: list[Done | None] = []

    async def run() -> None:
        got.append(await pool.run(w, job_id, "/nowhere", keep_warm=30, payload=({}, b"F", b"A")))

    async with trio.open_nursery() as n:
        n.start_soon(run)
        task = await lines.next()
        await lines.skip(2)  # the payload's bytes
        done = {"done": job_id, "code": 0, "started": 1.0, "status": {}, "result": 3}
        await lines.stream.send_all(json.dumps(done).encode() + b"\n" + b"RES")
    assert got and got[0] is not None and got[0].result == b"RES"
    assert task["result_max"] == RESULT_INLINE_MAX
    return task


async def test_acks_ride_on_the_next_task_or_go_alone_when_idle(tmp_path: Path) -> None:
    pool = WarmPool(tmp_path / "hub.sock")
    async with trio.open_nursery() as n:
        await n.start(pool.serve)
        stream, w = await _worker(pool, {"ack_on_task": True})
        lines = _Lines(stream)
        first = await _one_call(pool, w, lines, 11)
        assert "ack" not in first
        await pool.ack(w, 11)
        second = await _one_call(pool, w, lines, 12)
        assert second["ack"] == [11]  # no message of its own
        await pool.ack(w, 12)
        await pool.flush_acks()  # the worker is idle: the ack goes alone
        assert await lines.next() == {"ack": [12]}
        await pool.flush_acks()
        third = await _one_call(pool, w, lines, 13)
        assert "ack" not in third  # said once only
        await stream.aclose()
        n.cancel_scope.cancel()


async def test_a_worker_that_did_not_say_it_takes_acks_on_tasks_gets_them_alone(
    tmp_path: Path,
) -> None:
    pool = WarmPool(tmp_path / "hub.sock")
    async with trio.open_nursery() as n:
        await n.start(pool.serve)
        stream, w = await _worker(pool, {})
        lines = _Lines(stream)
        await _one_call(pool, w, lines, 21)
        await pool.ack(w, 21)
        assert await lines.next() == {"ack": [21]}
        task = await _one_call(pool, w, lines, 22)
        assert "ack" not in task
        await stream.aclose()
        n.cancel_scope.cancel()


async def test_a_worker_that_goes_away_mid_task_ends_the_wait(tmp_path: Path) -> None:
    """One wait per task, no nursery (#12): the closed connection still ends it."""
    pool = WarmPool(tmp_path / "hub.sock")
    async with trio.open_nursery() as n:
        await n.start(pool.serve)
        stream, w = await _worker(pool, {"ack_on_task": True})
        lines = _Lines(stream)
        got: list[Done | None] = []

        async def run() -> None:
            got.append(await pool.run(w, 31, "/nowhere", keep_warm=30))

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(run)
                await lines.next()
                await stream.aclose()
        assert got == [None]
        n.cancel_scope.cancel()
