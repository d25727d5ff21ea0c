"""The daemon's side of container snapshots (issue #4): when to take one, restore one,
fall back, invalidate and collect.

A ``snapshot=True`` job runs in a warm worker (see :mod:`gpud.warm`). How it starts:

1. an idle warm worker of its key, if there is one (the scheduler matched it): *warm*;
2. else a container restored from its key's ready snapshot: *restored*;
3. else a cold container; if no snapshot of its key exists yet (or the last one failed
   and may be re-taken), that container is checkpointed after its setup and before it
   takes the job, and the job then runs on in it: *cold*, and the next call restores.

A restore that fails falls back to a cold start that takes the snapshot again, with the
reason in the job's events and in ``gpud snapshots``; after ``snapshot_max_failures``
failures in a row the snapshot is not used again (see :mod:`gpud.ledger.snapshots`).
A newly taken snapshot replaces the owner's older ones of the same function (whose key
changed: new code, image, ...). Snapshots live in ``<data_dir>/snapshots/<key>.<ns>/``
(a directory per take) and take at most ``snapshot_max_bytes`` together; the least
recently used go first, never one being restored.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import gpud
from gpud.domain import Job
from gpud.executors.base import Handle, LaunchSpec
from gpud.ledger import LedgerThread
from gpud.ledger import snapshots as store
from gpud.snapgpu import SnapshotGpuState
from gpud.warm import SNAPSHOT_TOKEN_PREFIX, WarmPool, WarmWorker, first_of, warm_key
from snapshots import (
    SnapshotError,
    describe_change,
    key_of,
    key_parts,
    remove_dir,
)
from snapshots.podman import NS_ROOT

__all__ = ["Plan", "Snapshotter"]

log = logging.getLogger("gpud.snapshots")

#: How long a restored (or freshly checkpointed) container has to call the hub.
REJOIN_TIMEOUT = 60.0


@dataclass(slots=True)
class Plan:
    """How a snapshot=True job starts."""

    worker: WarmWorker
    kind: str  # cold | restored
    note: str = ""  # said in the job's "running" event: why not restored, ...
    take: str | None = None  # the key to take a snapshot of before the job runs


class Snapshotter:
    def __init__(
        self,
        *,
        ledger: LedgerThread,
        executor: Any,
        pool: WarmPool,
        hub_dir: Path,
        root: Path,
        max_bytes: int,
        max_failures: int,
        driver: Callable[[], str],
        gpu_part: Callable[[Job], str],
        restore_timeout: float = 30.0,
        gpu_state: SnapshotGpuState | None = None,
    ) -> None:
        self.ledger = ledger
        #: the CUDA checkpoint around CRIU's dump and restore of GPU jobs (#13), where the
        #: driver has it; None: a GPU job's snapshot holds its host memory only
        self.gpu_state = gpu_state
        self.executor = executor  # a PodmanExecutor (supports_snapshots)
        self.pool = pool
        self.go_dir = hub_dir / "go"
        self.root = root  # <data_dir>/snapshots
        self.max_bytes = max_bytes
        self.max_failures = max_failures
        self.restore_timeout = restore_timeout
        self._driver = driver
        self._gpu_part = gpu_part
        self._in_use: collections.Counter[str] = collections.Counter()  # key -> restores now
        self._taking: dict[str, Path] = {}  # key -> the directory a take writes into

    # -- start-up ----------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Takes a stopped daemon left unfinished are retried; snapshots of another gpud
        or driver are removed; snapshot directories the ledger does not know are removed."""
        self.go_dir.mkdir(parents=True, exist_ok=True)
        self.go_dir.chmod(0o755)
        self.root.mkdir(mode=0o711, exist_ok=True)
        self.root.chmod(0o711)  # restores (as their namespace's root) reach their own dir
        await self.ledger.call(store.interrupted_takes)
        snaps = await self.ledger.call(store.list_snapshots)
        for s in snaps:
            now_parts = {"gpud": gpud.__version__, "driver": self._driver()}
            stale = {k: v for k, v in now_parts.items() if s.parts.get(k) != v}
            if stale:
                why = describe_change({k: s.parts.get(k, "") for k in stale}, stale)
                log.info("removing snapshot %s of %s: %s", s.id, s.function, why)
                await self._drop(s)
        known = {s.location for s in await self.ledger.call(store.list_snapshots) if s.location}
        for d in sorted(self.root.iterdir()):
            if str(d) not in known:
                log.info("removing snapshot directory %s that no snapshot uses", d)
                await trio.to_thread.run_sync(remove_dir, d)

    # -- keys --------------------------------------------------------------------------

    async def key(self, job: Job) -> tuple[str, dict[str, str]]:
        image = job.image or self.executor.default_image
        ex = self.executor
        parts = key_parts(
            code_hash=job.code_hash,
            image=image,
            image_id=await ex.image_id(image),
            python=job.python,
            gpus=self._gpu_part(job),
            driver=self._driver(),
            gpud_version=gpud.__version__,
            owner=job.owner,
            env=job.env,
            memory=job.memory,
            cpus=job.cpus,
            container=f"volumes={ex.volumes} network={ex.network} read_only={ex.read_only} "
            f"shm={ex.shm_size}",
        )
        return key_of(parts), parts

    def _go(self, key: str) -> Path:
        return self.go_dir / key

    def _fresh_dir(self, key: str) -> Path:
        """An empty directory for a new snapshot of this key, for the container to mount
        and for its restores (as the user namespace's root) to read. Each take gets its
        own, so a restore of an older one never reads a newer one's half-written files."""
        d = self.root / f"{key[:32]}.{time.time_ns()}"
        d.mkdir(mode=0o700)
        os.chown(d, NS_ROOT, NS_ROOT)
        return d

    # -- starting a job -----------------------------------------------------------------

    async def plan(
        self,
        job: Job,
        spec: LaunchSpec,
        cold: Callable[[Job, LaunchSpec, Path | None], Awaitable[WarmWorker]],
    ) -> Plan:
        """Start the job's worker: restored from its snapshot, or cold (``cold`` launches
        a new warm worker; its path: the directory of the snapshot to take of it)."""
        key, parts = await self.key(job)
        snap = await self.ledger.call(store.get_snapshot, key)
        note = ""
        if snap is not None and snap.state == "ready" and snap.location:
            try:
                w = await self._restore(job, key, snap.location)
            except (SnapshotError, OSError) as e:
                state = await self.ledger.call(
                    store.record_failure, key, str(e), self.max_failures, snap.location
                )
                if not self._in_use[key]:  # (concurrent restores of it may still read it)
                    await trio.to_thread.run_sync(remove_dir, Path(snap.location))
                log.warning("job %s: snapshot %s could not be restored: %s", job.id, snap.id, e)
                note = f"its snapshot could not be restored: {e}"
                if state == "failed":
                    note += (
                        f"; after {self.max_failures} failures in a row it is not used "
                        f"again (`gpud snapshots rm {snap.id}` lets gpud take a new one)"
                    )
            else:
                await self.ledger.call(store.record_restore, key, time.time())
                return Plan(w, "restored")
        elif snap is not None and snap.state == "taking":
            note = f"its snapshot is being taken (by job {snap.taken_by})"
        elif snap is not None and snap.state == "failed":
            note = f"its snapshot is not used: {snap.last_error}"
        take = await self.ledger.call(
            store.claim_take,
            key,
            parts,
            function=job.function,
            owner=job.owner,
            image=parts["image"],
            job_id=job.id,
            now=time.time(),
        )
        where: Path | None = None
        if take:
            self._go(key).unlink(missing_ok=True)
            where = self._taking[key] = await trio.to_thread.run_sync(self._fresh_dir, key)
            note = f"{note}; taking a new one" if note else "taking its snapshot"
        try:
            w = await cold(job, spec, where)
        except BaseException:
            if take:
                await self.settle(key, job.id)
            raise
        return Plan(w, "cold", note, key if take else None)

    async def _restore(self, job: Job, key: str, location: str) -> WarmWorker:
        self._in_use[key] += 1
        handle: Handle | None = None
        w = self.pool.new_worker(warm_key(job), job.gpus, job.keep_warm, busy=job.id, restored=True)
        try:
            self._go(key).touch(mode=0o644)  # a restored worker goes on at once
            t0 = time.monotonic()
            with trio.CancelScope(shield=True):
                h: Handle = await self.executor.restore(
                    Path(location), job.id, job.attempt, hang_limit=self.restore_timeout
                )
            w.handle = handle = h
            if self.gpu_state is not None and job.gpus:
                # CRIU brought back the parked state the dump caught: unpark it (#13).
                n = await self.gpu_state.after_restore(h)
                log.info("job %s: GPU state of %d restored process(es) unparked", job.id, n)
            t1 = time.monotonic()
            self.pool.expect(w, str(h.container))
            if not await self._rejoined(w, h):
                raise SnapshotError(
                    "the restored container did not call the daemon back "
                    f"within {REJOIN_TIMEOUT:g} s"
                )
            log.info(
                "job %s: restored in %.3f s, its worker called back %.3f s later",
                job.id,
                t1 - t0,
                time.monotonic() - t1,
            )
            return w
        except BaseException:
            self.pool.forget(w)
            if handle is not None:
                await trio.to_thread.run_sync(self.executor.reap, handle)
            raise
        finally:
            self._in_use[key] -= 1

    async def _rejoined(self, w: WarmWorker, handle: Handle) -> bool:
        """Wait for the worker's hello; False if its container ended or it took too long."""
        with trio.move_on_after(REJOIN_TIMEOUT):
            await first_of(w.hello.wait, lambda: self.executor.wait(handle))
        return w.hello.is_set() and w.stream is not None

    # -- taking -------------------------------------------------------------------------

    async def take(self, w: WarmWorker, job: Job, key: str, task_dir: str) -> None:
        """Checkpoint the job's new worker after its setup; it then runs the job. Whatever
        goes wrong with the snapshot, the job runs on (it is the job's cold start); if
        the worker itself is gone, running the job finds that out."""
        assert w.handle is not None and w.stream is not None
        go_in = f"{self.executor.hub_mount}/go/{key}"
        error = await self.pool.prepare(w, task_dir, go_in, SNAPSHOT_TOKEN_PREFIX + key)
        if error is not None:
            # The user's setup raised (the job will say so), or the worker died.
            log.info("job %s: no snapshot taken: %s", job.id, error)
            return  # settle() gives up the claim
        self.pool.expect(w, str(w.handle.container))
        where = self._taking[key]
        try:
            t0 = time.monotonic()
            size = await self._dump(w, job, where)
        except (SnapshotError, OSError) as e:
            del self._taking[key]
            await trio.to_thread.run_sync(remove_dir, where)
            state = await self.ledger.call(store.record_failure, key, str(e), self.max_failures)
            log.warning("job %s: snapshot not taken (%s): %s", job.id, state, e)
        else:
            log.info(
                "job %s: snapshot of %s taken in %.2f s (%d MB)",
                job.id,
                job.function,
                time.monotonic() - t0,
                size // 2**20,
            )
            del self._taking[key]
            await self.ledger.call(store.mark_ready, key, str(where), size, time.time())
            await self._after_take(job, key, where, size)
        finally:
            self._go(key).touch(mode=0o644)  # the worker (and later restores) go on
        if not await self._rejoined(w, w.handle):
            log.warning("job %s: its worker did not call back after the checkpoint", job.id)
            self.pool.forget(w)

    async def _dump(self, w: WarmWorker, job: Job, where: Path) -> int:
        """CRIU's dump, with a GPU job's CUDA state parked around it (#13): CRIU then
        dumps the GPU memory as part of the host memory; the original is unparked after."""
        assert w.handle is not None
        if self.gpu_state is None or not job.gpus:
            return int(await self.executor.checkpoint(w.handle, where))
        pids = await self.gpu_state.before_dump(w.handle)
        log.info("job %s: GPU state of %d process(es) parked for the dump", job.id, len(pids))
        try:
            return int(await self.executor.checkpoint(w.handle, where))
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.gpu_state.after_dump(pids)
                except OSError as e:
                    # Its GPU state is lost to it: end it (the job then fails as a worker
                    # that died), never leave it parked for a call to hang on.
                    log.error("job %s: after its snapshot, %s; ending its worker", job.id, e)
                    await trio.to_thread.run_sync(self.executor.reap, w.handle)

    async def settle(self, key: str, job_id: int) -> None:
        """After a taking job's start, whatever happened (it may have been cancelled or
        timed out before or during the take): a claim still open is given up, so the
        key is not left "taking" until the daemon restarts."""
        with trio.CancelScope(shield=True):
            where = self._taking.pop(key, None)
            if where is not None:
                await trio.to_thread.run_sync(remove_dir, where)
            snap = await self.ledger.call(store.get_snapshot, key)
            if snap is not None and snap.state == "taking" and snap.taken_by == job_id:
                log.info("job %s: no snapshot of it was taken", job_id)
                await self.ledger.call(store.abandon_take, key)
                self._go(key).touch(mode=0o644)  # a worker waiting for it goes on

    async def _after_take(self, job: Job, key: str, where: Path, size: int) -> None:
        snaps = await self.ledger.call(store.list_snapshots, job.owner)
        new = next(s for s in snaps if s.key == key)
        if size > self.max_bytes:
            await self.ledger.call(
                store.record_failure,
                key,
                f"its checkpoint ({size / 2**20:.0f} MB) is larger than "
                f"snapshot_max_bytes ({self.max_bytes / 2**20:.0f} MB)",
                1,
            )
            await trio.to_thread.run_sync(remove_dir, where)
            return
        for old in snaps:
            if (
                old.key != key
                and old.function == job.function
                and not self._in_use[old.key]
                and old.state != "taking"
            ):
                log.info(
                    "snapshot %s of %s replaced by %s: %s",
                    old.id,
                    old.function,
                    new.id,
                    describe_change(old.parts, new.parts),
                )
                await self._drop(old)
        await self.collect()

    # -- removal ------------------------------------------------------------------------

    async def collect(self) -> None:
        """Remove least recently used snapshots until they fit in snapshot_max_bytes."""
        ready = [
            s
            for s in await self.ledger.call(store.list_snapshots)
            if s.state == "ready" and s.location
        ]
        total = sum(s.size for s in ready)
        for s in sorted(ready, key=lambda s: s.last_used or s.created_at):
            if total <= self.max_bytes:
                break
            if self._in_use[s.key]:
                continue
            log.info(
                "removing snapshot %s of %s (%d MB): snapshots are over snapshot_max_bytes",
                s.id,
                s.function,
                s.size // 2**20,
            )
            await self._drop(s)
            total -= s.size

    def in_use(self, snap: store.Snapshot) -> bool:
        return bool(self._in_use[snap.key])

    async def _drop(self, s: store.Snapshot) -> None:
        if s.location:
            await trio.to_thread.run_sync(remove_dir, Path(s.location))
        with contextlib.suppress(OSError):
            self._go(s.key).unlink()
        await self.ledger.call(store.delete_snapshot, s.id)

    async def remove(self, s: store.Snapshot) -> None:
        """`gpud snapshots rm`: the files and the record; the next call takes a new one."""
        await self._drop(s)
