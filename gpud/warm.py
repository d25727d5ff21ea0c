"""Warm workers: a job's worker process stays alive after its call and takes the next
call of the same function without a new process (issue: fast cold starts).

A function submitted with ``keep_warm=N`` runs in a worker started in *serve* mode
(``gpud_worker.py --serve``). The worker connects back to the daemon's hub, a Unix
socket in the data directory, and announces itself with the one-time token it was
started with. The hub then sends it jobs, one at a time, each with its function's and
arguments' pickles on the connection (#12), and the worker answers with each job's exit
code, start time and status; it writes (and syncs) result.pkl and status.json into the
job directory first, as a cold job does, so a restarted daemon can still collect them.
An idle worker is ended when its keep_warm runs out, or at once when a
queued job needs the GPUs it holds (the scheduler's eviction).

Matching is strict: a warm worker serves only jobs with the same key (code hash, image,
GPU request, owner, env=, limits), so no one's code ever runs in another's process.

Snapshots (issue #4) use the same hub. A snapshot-taking worker is sent ``prepare``,
runs its setup, says ``ready`` and hangs up; after the checkpoint it, and every
container restored from the checkpoint, reconnects with the snapshot's token. Those
copies are identical down to their memory, so the hub tells them apart by what the
kernel says: the peer's pid (SO_PEERCRED) and that pid's cgroup, which names its
container; the daemon registers each container it restores with :meth:`expect`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gpud.clock import Clock, SystemClock
from gpud.domain import WarmKey, warm_key  # re-exported: the key is pure (#12)
from gpud.executors.base import Handle, container_of
from gpud.peercred import read_peercred

__all__ = [
    "RESULT_INLINE_MAX",
    "SNAPSHOT_TOKEN_PREFIX",
    "Done",
    "WarmKey",
    "WarmPool",
    "WarmWorker",
    "first_of",
    "warm_key",
]

log = logging.getLogger("gpud.warm")

#: A snapshot's workers say hello with this and the snapshot's key; the hub knows them
#: by their container (they are copies of one process, token and all).
SNAPSHOT_TOKEN_PREFIX = "snap-"

#: A warm job's result pickle up to this size comes back over the hub and is stored in the
#: ledger with the job's end (#12): no file and no fsync in the worker. A larger one is
#: written (and synced) to result.pkl as before: the ledger is not a store for big blobs.
RESULT_INLINE_MAX = 64 * 1024


async def first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Run the waits side by side; return as soon as one of them has returned."""
    async with trio.open_nursery() as n:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            n.cancel_scope.cancel()

        for wait in waits:
            n.start_soon(one, wait)


@dataclass(frozen=True, slots=True)
class Done:
    """A worker's answer to a task: its exit code (None: not a number), and, for a task
    sent inline, when the user's code began and the status it wrote (plain JSON, never
    the pickle) - so the daemon reads no file back (#12)."""

    code: int | None
    started: float | None = None
    status: dict[str, object] | None = None
    #: the result pickle, sent after the answer's line instead of written to a file (#12);
    #: the worker keeps it until :meth:`WarmPool.ack`
    result: bytes | None = None


@dataclass(eq=False)
class WarmWorker:
    id: int
    key: WarmKey
    gpus: tuple[str, ...]
    keep_warm: float
    token: str
    handle: Handle | None = None
    last_job: int = 0
    busy: int | None = None  # the job it runs now
    idle_since: float = 0.0  # on the pool's clock (set when made and after each job)
    stream: trio.SocketStream | None = None
    hello: trio.Event = field(default_factory=trio.Event)
    gone: trio.Event = field(default_factory=trio.Event)
    #: snapshots: the container it runs in, set when the hub is to expect it by container
    container: str | None = None
    prepared: trio.Event = field(default_factory=trio.Event)
    prepare_error: str | None = None
    #: it hung up for its checkpoint and will call again: that is not its end
    rejoining: bool = False
    #: the identity (gpud.executors.process.JobIdentity) it runs as: its key's owner's,
    #: looked up once when it was started
    ident: object | None = None
    #: one sender at a time on the stream: a task and an ack can be sent side by side
    sending: trio.Lock = field(default_factory=trio.Lock)
    #: jobs whose inline results are stored, not yet told to the worker: the ack rides on
    #: its next task, or is sent alone once it is idle (:meth:`WarmPool.flush_acks`)
    acks: list[int] = field(default_factory=list)
    #: it said in its hello that an ack may ride on a task (a worker runtime from before
    #: #12's change, e.g. restored from an older snapshot, would skip such a task)
    ack_rides: bool = False
    _done: trio.MemorySendChannel[Done] | None = None
    _results: trio.MemoryReceiveChannel[Done] | None = None

    def __post_init__(self) -> None:
        self._done, self._results = trio.open_memory_channel(1)

    def end(self) -> None:
        """It is gone for good: whoever waits for its answer gets none (the answer it
        sent before it went is still taken first)."""
        self.gone.set()
        if self._done is not None:
            self._done.close()

    @property
    def idle(self) -> bool:
        """Connected and neither running nor promised to a job."""
        return self.busy is None and not self.gone.is_set() and self.stream is not None


class WarmPool:
    """The hub socket and the warm workers behind it."""

    def __init__(self, path: Path, clock: Clock | None = None) -> None:
        self.path = path
        self.clock: Clock = clock or SystemClock()
        self.workers: dict[int, WarmWorker] = {}
        self._by_token: dict[str, WarmWorker] = {}
        self._ids = 0
        self._expired = trio.Event()
        self._expecting: dict[str, WarmWorker] = {}  # container id -> worker
        self._lost: list[Handle] = []  # idle workers that went away: to be reaped
        self._registered = trio.Event()

    # -- the hub ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Job users (and containers, which get this directory mounted) must reach it.
        os.chmod(self.path.parent, 0o755)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        # Job users connect here; a worker proves itself with its token, nothing else.
        os.chmod(self.path, 0o666)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        worker: WarmWorker | None = None
        try:
            async for chunk in stream:
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        return
                    if not isinstance(msg, dict):
                        return
                    if worker is None:
                        worker = await self._identify(stream, str(msg.get("hello", "")))
                        if worker is None:
                            return  # not a worker we started
                        worker.stream = stream
                        worker.ack_rides = msg.get("ack_on_task") is True
                        worker.hello.set()
                    elif "done" in msg:
                        code = msg.get("code")
                        started, status = msg.get("started"), msg.get("status")
                        size = msg.get("result")
                        result: bytes | None = None
                        if isinstance(size, int) and 0 <= size <= RESULT_INLINE_MAX:
                            while len(buf) < size:  # the result's bytes follow the line
                                more = await stream.receive_some()
                                if not more:
                                    return
                                buf += more
                            result, buf = buf[:size], buf[size:]
                        elif size is not None:
                            return  # not what this daemon asked for: not a worker of ours
                        assert worker._done is not None
                        await worker._done.send(
                            Done(
                                code if isinstance(code, int) else None,
                                float(started) if isinstance(started, (int, float)) else None,
                                status if isinstance(status, dict) else None,
                                result,
                            )
                        )
                    elif "ready" in msg:
                        worker.prepare_error = (
                            None
                            if msg.get("ready") is True
                            else str(msg.get("error") or "setup failed")
                        )
                        worker.rejoining = worker.prepare_error is None
                        worker.prepared.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if worker is not None and worker.stream is stream:
                worker.stream = None
                if not worker.rejoining:
                    worker.end()
                    if (
                        self.workers.pop(worker.id, None) is not None
                        and worker.busy is None
                        and worker.handle is not None
                    ):
                        # Nobody waits on an idle worker: its container is left to reap.
                        self._lost.append(worker.handle)

    async def _identify(self, stream: trio.SocketStream, token: str) -> WarmWorker | None:
        """The worker saying hello: by its one-time token, or, for a snapshot's token, by
        the container its process is in (waiting a little for the daemon to register a
        container it has just restored: the restored process can be quicker)."""
        worker = self._by_token.pop(token, None)
        if worker is not None or not token.startswith(SNAPSHOT_TOKEN_PREFIX):
            return worker
        peer = read_peercred(stream.socket)
        if peer is None:
            return None
        with trio.move_on_after(60):
            while True:
                cid = container_of(peer.pid, self._expecting)
                if cid is not None:
                    w = self._expecting.pop(cid)
                    w.rejoining = False
                    return w
                self._registered = trio.Event() if self._registered.is_set() else self._registered
                await self._registered.wait()
        return None

    # -- workers ------------------------------------------------------------------------

    def new_worker(
        self,
        key: WarmKey,
        gpus: tuple[str, ...],
        keep_warm: float,
        *,
        busy: int | None = None,
        restored: bool = False,
    ) -> WarmWorker:
        """A worker about to be started (or restored: it then says hello with its
        snapshot's token, and :meth:`expect` names its container). ``busy``: the job it
        is started for, so that no other job is matched to it meanwhile."""
        self._ids += 1
        w = WarmWorker(
            id=self._ids,
            key=key,
            gpus=gpus,
            keep_warm=keep_warm,
            token=secrets.token_urlsafe(24),
            busy=busy,
            rejoining=restored,
            idle_since=self.clock.monotonic(),
        )
        self.workers[w.id] = w
        if not restored:
            self._by_token[w.token] = w
        return w

    def forget(self, w: WarmWorker) -> None:
        self.workers.pop(w.id, None)
        self._by_token.pop(w.token, None)
        if w.container is not None and self._expecting.get(w.container) is w:
            del self._expecting[w.container]
        w.end()

    # -- snapshots ------------------------------------------------------------------------

    def expect(self, w: WarmWorker, container: str) -> None:
        """The next hello with a snapshot token from inside ``container`` is ``w``."""
        w.container = container
        w.hello = trio.Event()
        self._expecting[container] = w
        self._registered.set()

    async def prepare(self, w: WarmWorker, job_dir: str, go: str, token: str) -> str | None:
        """Have the worker load its function and run its snapshot setup; None when it is
        ready for its checkpoint (and has hung up), else why it is not."""
        assert w.stream is not None
        w.prepared = trio.Event()
        msg = json.dumps({"prepare": job_dir, "go": go, "token": token}).encode() + b"\n"
        try:
            await w.stream.send_all(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return "the worker went away"
        await first_of(w.prepared.wait, w.gone.wait)
        if not w.prepared.is_set():
            return "the worker ended during its setup"
        return w.prepare_error

    def take_lost(self) -> list[Handle]:
        """The handles of idle workers that went away on their own (to reap)."""
        lost, self._lost = self._lost, []
        return lost

    def idle(self) -> list[WarmWorker]:
        return [w for w in self.workers.values() if w.idle]

    def find(self, key: WarmKey, exclude: Iterable[WarmWorker] = ()) -> WarmWorker | None:
        skip = set(map(id, exclude))
        for w in self.workers.values():
            if w.idle and w.key == key and id(w) not in skip:
                return w
        return None

    async def run(
        self,
        w: WarmWorker,
        job_id: int,
        job_dir: str,
        *,
        keep_warm: float,
        env: dict[str, str] | None = None,
        payload: tuple[dict[str, object], bytes, bytes] | None = None,
    ) -> Done | None:
        """Send one job to the worker and wait for its answer (None: the worker died).
        Afterwards the worker stays for ``keep_warm`` seconds (the latest job's word).

        ``payload``: the job's description (job.json's content) and its function's and
        arguments' pickles, sent on the connection after the task's line instead of
        through files in the job directory (#12). The daemon passes the bytes through; it
        never unpickles them."""
        assert w._results is not None
        if w.stream is None:
            return None  # it went away (e.g. its container died during a snapshot take)
        w.busy, w.last_job, w.keep_warm = job_id, job_id, keep_warm
        task: dict[str, object] = {"job_id": job_id, "dir": job_dir, "env": env or {}}
        if w.acks:
            # Stored results ride on the task: no message (and wake-up) of their own (#12).
            task["ack"], w.acks = w.acks, []
        tail = b""
        if payload is not None:
            meta, function, args = payload
            task["job"], task["payload"] = meta, [len(function), len(args)]
            task["result_max"] = RESULT_INLINE_MAX
            tail = function + args
        msg = json.dumps(task).encode() + b"\n" + tail
        try:
            async with w.sending:
                await w.stream.send_all(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        # One wait, no nursery per call (#12): a worker that goes away closes the
        # channel (WarmWorker.end), which ends this wait.
        try:
            done: Done | None = await w._results.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            done = None
        w.busy = None
        w.idle_since = self.clock.monotonic()
        return done

    async def ack(self, w: WarmWorker, job_id: int) -> None:
        """The job's inline result is stored (committed with its end): the worker may
        forget it. Until it hears so it would write the result to files should the
        connection end, for the next daemon to collect (#12), which is harmless for a job
        that is final already. So the word waits for the worker's next task, or for
        :meth:`flush_acks` once it is idle: one message per call instead of two. A
        worker that did not say it takes acks on tasks is told at once, alone."""
        w.acks.append(job_id)
        if not w.ack_rides:
            await self._send_acks(w)

    async def flush_acks(self) -> None:
        """Send the idle workers the acks that no task took along."""
        for w in list(self.workers.values()):
            if w.acks and w.idle:
                await self._send_acks(w)

    async def _send_acks(self, w: WarmWorker) -> None:
        stream, acks = w.stream, w.acks
        if stream is None or not acks:
            return
        w.acks = []
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with w.sending:
                await stream.send_all(json.dumps({"ack": acks}).encode() + b"\n")

    def expired(self, now: float) -> list[WarmWorker]:
        return [w for w in self.workers.values() if w.idle and now - w.idle_since >= w.keep_warm]

    async def close(self, w: WarmWorker) -> None:
        """Ask an idle worker to leave (it exits when its connection closes)."""
        self.forget(w)
        await self._send_acks(w)  # or it writes files for jobs that are over
        if w.stream is not None:
            with contextlib.suppress(Exception):
                await w.stream.aclose()
