"""Warm workers: a job's worker process stays alive after its call and takes the next
call of the same function without a new process (issue: fast cold starts).

A function submitted with ``keep_warm=N`` runs in a worker started in *serve* mode
(``gpud_worker.py --serve``). The worker connects back to the daemon's hub, a Unix
socket in the data directory, and announces itself with the one-time token it was
started with. The hub then sends it job directories, one at a time, and the worker
answers with each job's exit code; results travel through the job directory exactly as
for a cold job. An idle worker is ended when its keep_warm runs out, or at once when a
queued job needs the GPUs it holds (the scheduler's eviction).

Matching is strict: a warm worker serves only jobs with the same key (code hash, image,
GPU request, owner), so no one's code ever runs in another's process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gpud.domain import Job
from gpud.executors.base import Handle

__all__ = ["WarmKey", "WarmPool", "WarmWorker", "warm_key"]

log = logging.getLogger("gpud.warm")

WarmKey = tuple[str, str, str, str]


def warm_key(job: Job) -> WarmKey:
    gpu = ",".join(job.gpu.to_spec()) if job.gpu else ""
    return (job.code_hash, job.image or "", gpu, job.owner)


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
    idle_since: float = field(default_factory=time.monotonic)
    stream: trio.SocketStream | None = None
    hello: trio.Event = field(default_factory=trio.Event)
    gone: trio.Event = field(default_factory=trio.Event)
    _done: trio.MemorySendChannel[int | None] | None = None
    _results: trio.MemoryReceiveChannel[int | None] | None = None

    def __post_init__(self) -> None:
        self._done, self._results = trio.open_memory_channel(1)

    @property
    def idle(self) -> bool:
        """Connected and neither running nor promised to a job."""
        return self.busy is None and not self.gone.is_set() and self.stream is not None


class WarmPool:
    """The hub socket and the warm workers behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.workers: dict[int, WarmWorker] = {}
        self._by_token: dict[str, WarmWorker] = {}
        self._ids = 0
        self._expired = trio.Event()

    # -- the hub ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
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
                    if worker is None:
                        worker = self._by_token.pop(str(msg.get("hello", "")), None)
                        if worker is None:
                            return  # not a worker we started
                        worker.stream = stream
                        worker.hello.set()
                    elif "done" in msg:
                        code = msg.get("code")
                        assert worker._done is not None
                        await worker._done.send(code if isinstance(code, int) else None)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if worker is not None:
                worker.stream = None
                worker.gone.set()
                self.workers.pop(worker.id, None)

    # -- workers ------------------------------------------------------------------------

    def new_worker(self, key: WarmKey, gpus: tuple[str, ...], keep_warm: float) -> WarmWorker:
        self._ids += 1
        w = WarmWorker(id=self._ids, key=key, gpus=gpus, keep_warm=keep_warm,
                       token=secrets.token_urlsafe(24))
        self.workers[w.id] = w
        self._by_token[w.token] = w
        return w

    def forget(self, w: WarmWorker) -> None:
        self.workers.pop(w.id, None)
        self._by_token.pop(w.token, None)
        w.gone.set()

    def idle(self) -> list[WarmWorker]:
        return [w for w in self.workers.values() if w.idle]

    def find(self, key: WarmKey, exclude: Iterable[WarmWorker] = ()) -> WarmWorker | None:
        skip = set(map(id, exclude))
        for w in self.workers.values():
            if w.idle and w.key == key and id(w) not in skip:
                return w
        return None

    async def run(self, w: WarmWorker, job_id: int, job_dir: str, *,
                  keep_warm: float) -> int | None:
        """Send one job to the worker and wait for its exit code (None: the worker died).
        Afterwards the worker stays for ``keep_warm`` seconds (the latest job's word)."""
        assert w.stream is not None and w._results is not None
        w.busy, w.last_job, w.keep_warm = job_id, job_id, keep_warm
        msg = json.dumps({"job_id": job_id, "dir": job_dir}).encode() + b"\n"
        try:
            await w.stream.send_all(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        async with trio.open_nursery() as n:
            result: list[int | None] = []

            async def _result() -> None:
                assert w._results is not None
                result.append(await w._results.receive())
                n.cancel_scope.cancel()

            async def _death() -> None:
                await w.gone.wait()
                result.append(None)
                n.cancel_scope.cancel()

            n.start_soon(_result)
            n.start_soon(_death)
        w.busy = None
        w.idle_since = time.monotonic()
        return result[0] if result else None

    def expired(self, now: float) -> list[WarmWorker]:
        return [w for w in self.workers.values()
                if w.idle and now - w.idle_since >= w.keep_warm]

    async def close(self, w: WarmWorker) -> None:
        """Ask an idle worker to leave (it exits when its connection closes)."""
        self.forget(w)
        if w.stream is not None:
            with contextlib.suppress(Exception):
                await w.stream.aclose()
