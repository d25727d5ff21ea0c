"""Retention (#12): finished jobs' directories and records go, so the disk never fills up.

Three settings (gpud.config): ``retention_job_dirs`` (a finished job's directory, with
its payload, log and result, is removed that long after the job ended), ``retention_jobs``
(its records in the ledger go too, their usage rolled up first: gpud.ledger.retention),
and ``retention_max_bytes`` (a cap on the jobs directory: over it, finished jobs'
directories go, the oldest first). The daemon collects every ``retention_interval``;
`gpud gc` (``POST /v1/admin/gc``, admins) collects now, or says what it would remove.

What is never removed: anything of a job that is not final (a queued retry keeps its
directory; the ledger's triggers refuse to delete a non-final job's rows), a directory
whose job the ledger does not know unless retention removed that job's records, and
for the cap, the directory of a job that ended less than a minute ago (its client may
be fetching the result).

A job's directory belongs to the user it ran as, who may fill it with anything while
gc runs: symlinks to /etc, directories made unreadable, deep trees. So removal walks
it by file descriptor, never follows a link (a link is unlinked, not its target), and
gives its owner's rights back to a directory made unreadable (through an O_PATH handle,
never by path) before it goes in. A root daemon reads any directory anyway.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from gpud.config import Config
from gpud.domain import FINAL, Job
from gpud.ledger import LedgerThread
from gpud.ledger.retention import Pruned, job_ends, prunable, prune, pruned_state
from gpud.ledger.store import Ledger
from gpud_client.duration import format_duration
from gpud_client.models import GcReport

__all__ = ["CAP_GRACE", "Retention", "files_gone", "for_daemon", "remove_tree", "run", "tree_bytes"]

log = logging.getLogger("gpud.retention")

#: The cap never takes the directory of a job that ended less than this long ago.
CAP_GRACE = 60.0
#: Deeper trees than this are left (and reported): each level holds a file descriptor.
MAX_DEPTH = 512
#: Directories per worker-thread call, and jobs per ledger transaction: small enough that
#: shutdown and other ledger work do not wait long behind gc.
_DIRS_PER_CALL = 100
_JOBS_PER_TX = 2000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class _Host(Protocol):
    """What retention needs of the daemon (gpud.service.Daemon has both)."""

    config: Config
    ledger: LedgerThread


# -- files ----------------------------------------------------------------------------------


def job_dir_ids(jobs_dir: Path) -> list[int]:
    """The job ids that have a directory under ``jobs_dir`` (named by the daemon)."""
    out = []
    try:
        with os.scandir(jobs_dir) as it:
            for e in it:
                if (
                    e.name.isdigit()
                    and str(int(e.name)) == e.name
                    and e.is_dir(follow_symlinks=False)
                ):
                    out.append(int(e.name))
    except FileNotFoundError:
        pass
    return sorted(out)


def _open_dir(parent: int, name: str, fix: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        if not fix:
            raise
    # A directory its owner made unreadable (a daemon not running as root gets here):
    # take a handle that needs no read right (O_PATH, still without following a link),
    # give the owner's rights back through it, and open it again through it: the name
    # is never looked up twice, so nothing swapped in meanwhile is touched.
    handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        # (The /proc link leads to the handle's own inode: following it is the point.)
        os.chmod(f"/proc/self/fd/{handle}", 0o700)
        return os.open(f"/proc/self/fd/{handle}", _DIR_FLAGS & ~os.O_NOFOLLOW)
    finally:
        os.close(handle)


@dataclass
class _Frame:
    fd: int
    name: str
    names: list[str]
    blocks: int


def _walk(parent: int, name: str, remove: bool) -> int:
    """Bytes (allocated blocks) of the tree ``name`` under the directory fd ``parent``,
    removed as it is walked when ``remove``. Never follows a symlink."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        if remove:
            os.unlink(name, dir_fd=parent)
        return st.st_blocks * 512
    total = 0
    fd = _open_dir(parent, name, remove)
    stack = [_Frame(fd, name, os.listdir(fd), st.st_blocks * 512)]
    try:
        while stack:
            top = stack[-1]
            if top.names:
                entry = top.names.pop()
                try:
                    est = os.stat(entry, dir_fd=top.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(est.st_mode):
                    if len(stack) >= MAX_DEPTH:
                        raise OSError(errno.ELOOP, f"deeper than {MAX_DEPTH} levels")
                    try:
                        child = _open_dir(top.fd, entry, remove)
                    except PermissionError:
                        if remove:
                            raise
                        total += est.st_blocks * 512  # measuring: what it can read
                        continue
                    except OSError as e:
                        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                            raise
                        # Swapped for a link or a file since the stat: unlink that instead.
                        if remove:
                            os.unlink(entry, dir_fd=top.fd)
                        continue
                    if remove and os.geteuid() != 0:
                        # Entries can be unlinked only from a directory we may write to.
                        os.fchmod(child, 0o700)
                    stack.append(_Frame(child, entry, os.listdir(child), est.st_blocks * 512))
                    continue
                if remove:
                    os.unlink(entry, dir_fd=top.fd)
                total += est.st_blocks * 512
                continue
            stack.pop()
            os.close(top.fd)
            total += top.blocks
            if remove:
                os.rmdir(top.name, dir_fd=stack[-1].fd if stack else parent)
    finally:
        for f in stack:
            os.close(f.fd)
    return total


def tree_bytes(jobs_dir: Path, job_id: int) -> int:
    """Disk space of one job's directory (0 if it is gone or cannot be read)."""
    fd = os.open(jobs_dir, _DIR_FLAGS)
    try:
        return _walk(fd, str(job_id), remove=False)
    except OSError:
        return 0
    finally:
        os.close(fd)


def remove_tree(jobs_dir: Path, job_id: int) -> int:
    """Remove one job's directory safely (see the module docstring); return bytes freed."""
    fd = os.open(jobs_dir, _DIR_FLAGS)
    try:
        return _walk(fd, str(job_id), remove=True)
    finally:
        os.close(fd)


def _remove_many(
    jobs_dir: Path, ids: Sequence[int], dry: bool, errors: list[str]
) -> tuple[int, int]:
    """(directories removed, bytes freed); failures go to ``errors`` and the log."""
    done = freed = 0
    for i in ids:
        try:
            freed += tree_bytes(jobs_dir, i) if dry else remove_tree(jobs_dir, i)
            done += 1
        except OSError as e:
            msg = f"could not remove {jobs_dir / str(i)}: {e}"
            log.warning("gc: %s", msg)
            errors.append(msg)
    return done, freed


# -- the collection ---------------------------------------------------------------------------


@dataclass
class _Tally:
    dirs: int = 0
    dir_bytes: int = 0
    over_cap: int = 0
    jobs_dir_bytes: int | None = None
    pruned: Pruned = field(default_factory=Pruned)
    errors: list[str] = field(default_factory=list)


def _ledger_bytes(ledger: Ledger) -> int:
    c = ledger.conn
    pages = c.execute("PRAGMA page_count").fetchone()[0]
    free = c.execute("PRAGMA freelist_count").fetchone()[0]
    size = c.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


class Retention:
    """One daemon's collector: the periodic loop and `gpud gc` share it (and its lock,
    so two collections never run at once)."""

    def __init__(self, config: Config, ledger: LedgerThread) -> None:
        self.config = config
        self.ledger = ledger
        self._lock = trio.Lock()

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    async def _dirs(self, ids: Sequence[int], dry: bool, t: _Tally) -> int:
        freed_total = 0
        for i in range(0, len(ids), _DIRS_PER_CALL):
            done, freed = await self._thread(
                _remove_many, self.config.jobs_dir, ids[i : i + _DIRS_PER_CALL], dry, t.errors
            )
            t.dirs += done
            freed_total += freed
        t.dir_bytes += freed_total
        return freed_total

    async def collect(self, *, dry_run: bool = False, now: float | None = None) -> GcReport:
        """Apply the retention settings once (``dry_run``: only count what would go)."""
        async with self._lock:
            started = time.monotonic()
            now = time.time() if now is None else now
            cfg, t = self.config, _Tally()
            ids: list[int] = await self._thread(job_dir_ids, cfg.jobs_dir)
            ends: dict[int, tuple[bool, float]] = {}
            for i in range(0, len(ids), 5000):
                ends.update(await self.ledger.call(job_ends, ids[i : i + 5000]))
            through, _ = await self.ledger.call(pruned_state)

            def due(i: int) -> bool:
                e = ends.get(i)
                if e is None:  # its records were removed by retention: an orphan
                    return i <= through
                return (
                    e[0]
                    and cfg.retention_job_dirs is not None
                    and e[1] < now - cfg.retention_job_dirs
                )

            old = [i for i in ids if due(i)]
            await self._dirs(old, dry_run, t)
            if cfg.retention_max_bytes is not None:
                await self._cap(sorted(set(ids) - set(old)), ends, now, dry_run, t)
            if cfg.retention_jobs is not None:
                before = now - cfg.retention_jobs
                if dry_run:
                    jobs, attempts, events, payloads = await self.ledger.call(prunable, before)
                    t.pruned = Pruned(jobs, attempts, events, payloads)
                else:
                    while (p := await self.ledger.call(prune, before, _JOBS_PER_TX)).jobs:
                        t.pruned = Pruned(
                            t.pruned.jobs + p.jobs,
                            t.pruned.attempts + p.attempts,
                            t.pruned.events + p.events,
                            t.pruned.blobs + p.blobs,
                            max(t.pruned.max_id, p.max_id),
                        )
            report = GcReport(
                dry_run=dry_run,
                retention_job_dirs=cfg.retention_job_dirs,
                retention_jobs=cfg.retention_jobs,
                retention_max_bytes=cfg.retention_max_bytes,
                job_dirs=t.dirs,
                job_dir_bytes=t.dir_bytes,
                over_cap_dirs=t.over_cap,
                jobs_dir_bytes=t.jobs_dir_bytes,
                jobs=t.pruned.jobs,
                attempts=t.pruned.attempts,
                events=t.pruned.events,
                payloads=t.pruned.blobs,
                ledger_bytes=await self.ledger.call(_ledger_bytes),
                seconds=round(time.monotonic() - started, 3),
                errors=t.errors[:50],
            )
        if not dry_run and (report.job_dirs or report.jobs):
            log.info(
                "gc: removed %d finished jobs' directories (%.1f MB%s) and the records "
                "of %d jobs (%d events), their usage rolled up, in %.1f s",
                report.job_dirs,
                report.job_dir_bytes / 1e6,
                f", {report.over_cap_dirs} over retention_max_bytes"
                if report.over_cap_dirs
                else "",
                report.jobs,
                report.events,
                report.seconds,
            )
        return report

    async def _cap(
        self, ids: list[int], ends: dict[int, tuple[bool, float]], now: float, dry: bool, t: _Tally
    ) -> None:
        """Remove finished jobs' directories, oldest first, until the jobs directory is
        within retention_max_bytes (what is left is measured: every directory is walked)."""
        cap = self.config.retention_max_bytes
        assert cap is not None
        sizes: dict[int, int] = {}
        for i in range(0, len(ids), _DIRS_PER_CALL):
            part = ids[i : i + _DIRS_PER_CALL]
            sizes.update(
                zip(
                    part,
                    await self._thread(
                        lambda p: [tree_bytes(self.config.jobs_dir, j) for j in p], part
                    ),
                    strict=True,
                )
            )
        total = sum(sizes.values())
        oldest = sorted(
            (ends[i][1], i)
            for i in ids
            if i in ends and ends[i][0] and ends[i][1] < now - CAP_GRACE
        )
        for _, i in oldest:
            if total <= cap:
                break
            before = t.dirs
            freed = await self._dirs([i], dry, t)
            if t.dirs > before:
                t.over_cap += 1
                total -= freed if not dry else sizes[i]
        t.jobs_dir_bytes = total


_collectors: weakref.WeakKeyDictionary[Any, Retention] = weakref.WeakKeyDictionary()


def for_daemon(daemon: _Host) -> Retention:
    """The daemon's one collector (made on first use)."""
    r = _collectors.get(daemon)
    if r is None:
        r = _collectors[daemon] = Retention(daemon.config, daemon.ledger)
    return r


async def run(daemon: _Host) -> None:
    """Collect every retention_interval, for as long as the daemon runs (a task in its
    nursery). A failed collection is logged and tried again next time."""
    interval = daemon.config.retention_interval
    if interval is None:
        return
    collector = for_daemon(daemon)
    # Not at once: a daemon that starts has jobs to recover and adopt first.
    await trio.sleep(min(interval, 60.0))
    while True:
        try:
            await collector.collect()
        except Exception:  # noqa: BLE001 - gc must never take the daemon down
            log.exception("gc failed; trying again in %s", format_duration(interval))
        await trio.sleep(interval)


def files_gone(config: Config, job: Job) -> str | None:
    """Why a finished job has no log or result to give, when its directory is gone (cheap:
    one lstat): retention removed it, or someone did by hand."""
    if job.state not in FINAL or job.attempt < 1:
        return None  # a job that never started never had a directory
    if os.path.lexists(config.jobs_dir / str(job.id)):
        return None
    keep = config.retention_job_dirs
    why = (
        f"finished jobs' directories are removed {format_duration(keep)} after they end"
        if keep is not None
        else ""
    )
    if config.retention_max_bytes is not None:
        why += (" or " if why else "") + "when the jobs directory is over retention_max_bytes"
    return (
        f"job {job.id}'s directory (its log and result) was removed"
        + (f" by retention: {why}" if why else "")
        + "; `gpud ps --all` still shows how it ended"
    )
