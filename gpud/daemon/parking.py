"""Parking idle warm workers (#13 item 2): their GPU state goes to host memory instead of
the worker being ended when a queued job needs their GPUs.

The transitions of a warm worker (docs/architecture.md, "Parking"):

    idle --(a start needs its GPUs; park ok)--> parked --(a call of its key; GPUs free,
    or other GPUs of the type and the driver can remap)--> busy (the call, "unparked")
    idle --(park fails, checkpointing off, a container, over park_max_bytes)--> ended
    parked --(keep_warm runs out; LRU eviction over park_max_bytes; it died; the daemon
    stops; a failed unpark)--> ended

A parked worker leaves the warm pool (``WarmPool.workers``), so nothing there matches,
expires or counts it: the scheduler sees it only through :meth:`ParkingLot.offer`, which
puts it among the idle workers of a round when a job of its key is queued. Its process
stays alive and its hub connection open; it is blocked reading its next task, which makes
no CUDA call, so the lock does not stop it anywhere it matters. The call's supervisor
unparks it (restore, unlock) before sending the task: the unpark time is part of the
call's startup, which the job records with ``start_kind = "unparked"``.

A parked process is never ended by closing its connection (its exit path may make CUDA
calls, which would block while it is locked): it is SIGKILLed, which frees its host copy
in the driver. The pids of the parked workers are kept in ``<data_dir>/hub/parked.json``,
so that a daemon that died without ending them kills them at its next start (the hub they
were connected to is gone, so they could never be called again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from gpud.clock import Clock
from gpud.cudackpt import Checkpointer, CudaCheckpointError, ProcessState, Support
from gpud.daemon.gpustate import LOCK_TIMEOUT, group_pids
from gpud.domain import Gpu, Job, Wait
from gpud.executors.base import Executor, Handle
from gpud.executors.process import proc_start_time
from gpud.pending import ActiveJobs
from gpud.warm import WarmPool, WarmWorker


class DaemonCore(Protocol):
    """What the lot uses of the daemon (gpud.daemon.core.DaemonCore), without importing
    it (the core holds the lot)."""

    @property
    def warm(self) -> WarmPool | None: ...
    @property
    def executor(self) -> Executor: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def jobs(self) -> ActiveJobs[Any]: ...
    @property
    def gpus(self) -> list[Gpu]: ...
    async def get(self, job_id: int) -> Job: ...
    async def _end_warm(self, w: WarmWorker, why: str) -> None: ...


__all__ = ["ParkedWorker", "ParkingLot", "default_park_max_bytes", "kill_leftovers"]

log = logging.getLogger("gpud")


def default_park_max_bytes() -> int:
    """Half of the host's memory. Parked state is a cache (an evicted worker only costs
    its next call a cold start), while jobs need host memory to run: half leaves them the
    other half, and is still room for a few large models (a 4 GiB park per 8 GiB of RAM)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 1024**3


@dataclass(eq=False)
class ParkedWorker:
    worker: WarmWorker
    #: the processes parked (those of its process group that had CUDA state)
    pids: tuple[int, ...]
    #: host memory its GPU state takes (the driver's estimate; 0 when it could not tell)
    bytes: int
    #: when it was parked (wall clock, for `gpud gpus`)
    parked_at: float
    #: the GPUs it was parked from
    home: tuple[str, ...]
    #: its last job's function (for `gpud ps` and `gpud gpus`)
    function: str = ""
    #: this round: the GPUs it would be unparked onto, and whether they are free
    blocked: str | None = None


class ParkingLot:
    """The parked warm workers of a daemon, with the host-memory budget."""

    def __init__(
        self,
        checkpointer: Checkpointer | None,
        support: Support | None,
        max_bytes: int | None,
        state_file: Path,
    ) -> None:
        self.checkpointer = checkpointer
        self.support = support
        self.max_bytes = default_park_max_bytes() if max_bytes is None else max_bytes
        self.state_file = state_file
        #: worker id -> parked worker, least recently used first (LRU eviction)
        self.parked: dict[int, ParkedWorker] = {}
        #: queued job -> why it waits for a parked worker (this round)
        self.waits: dict[int, Wait] = {}

    # -- reading ------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return (
            self.checkpointer is not None
            and self.support is not None
            and self.support.ok
            and self.max_bytes > 0
        )

    def used_bytes(self) -> int:
        return sum(p.bytes for p in self.parked.values())

    def holds(self, w: WarmWorker) -> bool:
        return w.id in self.parked

    def wait_of(self, job_id: int) -> Wait | None:
        return self.waits.get(job_id)

    def end_all(self) -> list[Handle]:
        """The daemon stops: the parked workers' handles, to SIGKILL (their hub goes with
        the daemon, so no call could reach them again)."""
        out = [p.worker.handle for p in self.parked.values() if p.worker.handle is not None]
        self.parked.clear()  # parked.json stays until they are dead (see kill_leftovers)
        return out

    # -- parking ------------------------------------------------------------------------

    async def give_way(self, core: DaemonCore, w: WarmWorker, job_id: int) -> None:
        """An idle worker's GPUs are needed by ``job_id``: park it, or end it as before."""
        why = f"its GPUs are needed by job {job_id}"
        h = w.handle
        if not self.enabled or h is None or h.container is not None:
            await core._end_warm(w, why)
            return
        assert self.checkpointer is not None and core.warm is not None
        w.busy = -job_id  # neither idle nor matchable while its state moves
        t0 = core.clock.monotonic()
        try:
            pids, size = await trio.to_thread.run_sync(self._park, h.pid)
        except (CudaCheckpointError, OSError, RuntimeError) as e:
            log.warning(
                "parking warm worker %s (last job %s) failed: %s; ending it", w.id, w.last_job, e
            )
            w.busy = None
            await core._end_warm(w, f"{why} (it could not be parked)")
            return
        try:
            function = (await core.get(w.last_job)).function
        except Exception:  # noqa: BLE001 - a name for display only
            function = ""
        w.busy = None
        if size > self.max_bytes:
            log.info(
                "warm worker %s holds %d MiB, more than park_max_bytes (%d MiB) allows: ending it",
                w.id,
                size >> 20,
                self.max_bytes >> 20,
            )
            await self._kill(core, w)
            return
        # Out of the pool: nothing there matches, expires or counts it any more.
        core.warm.workers.pop(w.id, None)
        self.parked[w.id] = ParkedWorker(w, pids, size, core.clock.time(), w.gpus, function)
        took = core.clock.monotonic() - t0
        log.info(
            "parked warm worker %s (last job %s, pid %s): %d MiB of GPU state in host "
            "memory in %.2f s (%.1f GB/s), its GPUs %s go to job %s",
            w.id,
            w.last_job,
            h.pid,
            size >> 20,
            took,
            size / max(took, 1e-9) / 1e9,
            ",".join(w.gpus),
            job_id,
        )
        await self._evict(core, keep=w.id)
        self._save()

    def _park(self, pgid: int) -> tuple[tuple[int, ...], int]:
        """Park every process of the group with CUDA state; all or none (a failure unparks
        what was parked: the worker is then ended by the caller, never left locked)."""
        assert self.checkpointer is not None
        parked: list[int] = []
        size = 0
        try:
            for pid in group_pids(pgid):
                if self.checkpointer.state(pid) is None:
                    continue
                size += self.checkpointer.park(pid, LOCK_TIMEOUT).bytes or 0
                parked.append(pid)
        except BaseException:
            for pid in parked:
                with contextlib.suppress(CudaCheckpointError):
                    self.checkpointer.unpark(pid)
            raise
        if not parked:
            raise RuntimeError("none of its processes has CUDA state")
        return tuple(parked), size

    async def _evict(self, core: DaemonCore, keep: int) -> None:
        """End least recently parked workers until the parked ones fit in the budget."""
        while self.used_bytes() > self.max_bytes:
            victim = next((p for i, p in self.parked.items() if i != keep), None)
            if victim is None:
                break
            log.info(
                "park_max_bytes (%d MiB) is full: ending parked warm worker %s (last "
                "job %s, %d MiB), the least recently used",
                self.max_bytes >> 20,
                victim.worker.id,
                victim.worker.last_job,
                victim.bytes >> 20,
            )
            await self._kill(core, victim.worker)

    async def _kill(self, core: DaemonCore, w: WarmWorker) -> None:
        """End a parked (or half-parked) worker: SIGKILL, never a close it must exit on."""
        self.parked.pop(w.id, None)
        assert core.warm is not None
        core.warm.forget(w)
        if w.handle is not None:
            await trio.to_thread.run_sync(core.executor.reap, w.handle)
            with trio.move_on_after(5):
                await core.executor.wait(w.handle)
        if w.stream is not None:
            with contextlib.suppress(Exception):
                await w.stream.aclose()
        self._save()

    # -- the scheduling round -----------------------------------------------------------

    def offer(
        self, core: DaemonCore, holders_now: Callable[[], Mapping[str, Job]]
    ) -> list[WarmWorker]:
        """Parked workers with a queued call of their key, as idle workers for this round.
        Each goes with its own GPUs where they are free, or with free GPUs of the same
        types where the driver can remap; else with its own (held) GPUs and a reason: the
        plan then matches the call to it, and :meth:`blocked` keeps the call queued."""
        self.waits = {}
        if not self.parked:
            return []  # the common case: O(1), nothing of the round's hot path
        holders = holders_now()
        # Only keys with a call ready now: a worker offered for a call in its retry backoff
        # would hold its GPUs in the plan this round for nothing.
        now = core.clock.time()
        keys = {
            g.wkey
            for g in core.jobs.pending.groups()
            if g.wkey is not None and any(j.not_before <= now for j in g.jobs)
        }
        by_uuid = {g.uuid: g for g in core.gpus}
        taken = set(holders)
        out: list[WarmWorker] = []
        for p in self.parked.values():
            w = p.worker
            if w.busy is not None or w.gone.is_set() or w.key not in keys:
                continue
            target = self._target(p, by_uuid, taken)
            if target is None:
                p.blocked = self._why(p, by_uuid, holders)
                w.gpus = p.home
            else:
                p.blocked = None
                w.gpus = target
                taken.update(target)
            out.append(w)
        return out

    def _target(
        self, p: ParkedWorker, by_uuid: Mapping[str, Gpu], taken: set[str]
    ) -> tuple[str, ...] | None:
        if not (set(p.home) & taken):
            return p.home
        if self.support is None or not self.support.remap:
            return None
        chosen: list[str] = []
        for u in p.home:
            want = by_uuid[u].type if u in by_uuid else None
            free = next(
                (
                    g.uuid
                    for g in by_uuid.values()
                    if g.type == want and g.uuid not in taken and g.uuid not in chosen
                ),
                None,
            )
            if free is None:
                return None
            chosen.append(free)
        return tuple(chosen)

    def _why(self, p: ParkedWorker, by_uuid: Mapping[str, Gpu], holders: Mapping[str, Job]) -> str:
        u = next(u for u in p.home if u in holders)
        gpu = f"GPU {by_uuid[u].index}" if u in by_uuid else f"GPU {u}"
        who = holders[u]
        by = (
            f"job {who.id}"
            if who.function != "(warm worker)"
            else f"an idle warm worker (job {who.id})"
        )
        remap = (
            ""
            if self.support is not None and self.support.remap
            else "; this driver cannot restore it onto another GPU"
        )
        return f"waiting for {gpu} held by {by}, to unpark its warm worker{remap}"

    def blocked(self, w: WarmWorker, job_id: int, position: int) -> bool:
        """The plan matched ``job_id`` to a parked worker whose GPUs are not free: the
        job stays queued, saying why."""
        p = self.parked.get(w.id)
        if p is None or p.blocked is None:
            return False
        self.waits[job_id] = Wait(job_id, p.blocked, position)
        return True

    # -- unparking ----------------------------------------------------------------------

    async def unpark(self, core: DaemonCore, w: WarmWorker) -> str | None:
        """Bring a parked worker back for the call it was matched to (its ``gpus`` are the
        ones the plan gave it). None when it is back in the pool, busy with the call;
        else why not (the worker has been ended: the call starts cold)."""
        p = self.parked.pop(w.id, None)
        assert p is not None and self.checkpointer is not None and core.warm is not None
        gpu_map = dict(zip(p.home, w.gpus, strict=True)) if w.gpus != p.home else None
        t0 = core.clock.monotonic()
        try:
            await trio.to_thread.run_sync(self._unpark, p.pids, gpu_map)
        except (CudaCheckpointError, OSError, RuntimeError, ValueError) as e:
            log.warning("unparking warm worker %s failed: %s; ending it", w.id, e)
            await self._kill(core, w)
            return f"its parked worker could not be unparked ({e})"
        if w.gone.is_set():
            await self._kill(core, w)
            return "its parked worker had gone"
        core.warm.workers[w.id] = w
        took = core.clock.monotonic() - t0
        log.info(
            "unparked warm worker %s (pid %s): %d MiB in %.2f s (%.1f GB/s)%s",
            w.id,
            w.handle and w.handle.pid,
            p.bytes >> 20,
            took,
            p.bytes / max(took, 1e-9) / 1e9,
            f", onto {','.join(w.gpus)}" if gpu_map else "",
        )
        self._save()
        return None

    def _unpark(self, pids: Iterable[int], gpu_map: Mapping[str, str] | None) -> None:
        assert self.checkpointer is not None
        for pid in pids:
            st = self.checkpointer.state(pid)
            if st is not None and st is not ProcessState.RUNNING:
                self.checkpointer.unpark(pid, gpu_map)

    # -- housekeeping ---------------------------------------------------------------------

    async def tick(self, core: DaemonCore) -> None:
        """Every half second (the warm loop): parked workers that died or whose
        keep_warm ran out are ended."""
        now = core.clock.monotonic()
        for p in list(self.parked.values()):
            w = p.worker
            if w.busy is not None:
                continue
            if w.gone.is_set() or now - w.idle_since >= w.keep_warm:
                log.info(
                    "ending parked warm worker %s (last job %s): %s",
                    w.id,
                    w.last_job,
                    "it went away" if w.gone.is_set() else f"idle for {w.keep_warm:g} s",
                )
                await self._kill(core, w)

    def rows(self) -> list[tuple[ParkedWorker, str]]:
        """(parked worker, its owner) for `gpud gpus` and `gpud ps`."""
        return [(p, str(p.worker.key[3])) for p in self.parked.values()]

    def _save(self) -> None:
        """The parked pids, for a next daemon that finds them orphaned (see the module)."""
        rows = [
            {"pid": pid, "start": proc_start_time(pid)}
            for p in self.parked.values()
            for pid in p.pids
        ]
        try:
            if not rows:
                self.state_file.unlink(missing_ok=True)
                return
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows))
            os.replace(tmp, self.state_file)
        except OSError as e:
            log.warning("could not record the parked workers in %s: %s", self.state_file, e)


def kill_leftovers(state_file: Path) -> list[int]:
    """At start-up: kill the parked workers a previous daemon left (same pid and start
    time, so never a reused pid). Their hub is gone, so no call could reach them; killing
    frees their host copy in the driver and leaves nothing locked. The pids killed."""
    try:
        rows = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return []
    killed: list[int] = []
    for row in rows if isinstance(rows, list) else []:
        try:
            pid, start = int(row["pid"]), row.get("start")
        except (TypeError, KeyError, ValueError):
            continue
        if start is not None and proc_start_time(pid) == start:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    with contextlib.suppress(OSError):
        state_file.unlink()
    if killed:
        log.warning(
            "killed %d parked warm worker process(es) a previous gpud left: %s",
            len(killed),
            ", ".join(map(str, killed)),
        )
    return killed
