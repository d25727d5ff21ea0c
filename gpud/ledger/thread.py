"""The bridge between the trio daemon and the ledger's one thread, with group commit.

sqlite3 connections belong to the thread that made them, and aiosqlite is asyncio-only,
so the daemon owns a single dedicated thread that opens the :class:`Ledger` and runs
every query. Trio tasks hand it work and wait on a trio Event that the thread's
completion callback sets through the trio token; the loop never blocks on SQLite.

Group commit (#12). A job costs about four writes, and each write alone is a COMMIT
with its own fsync, which is what bounded the daemon's throughput. So the thread takes
every call queued at the moment it is free (up to :data:`MAX_GROUP`) and runs them as one
group (taking on calls that come meanwhile, up to :data:`GROUP_SECONDS`): the first
write opens ``BEGIN IMMEDIATE``, each call runs in its own SAVEPOINT (a
call that raises, e.g. IllegalTransition, is undone alone and its error goes to its
caller only), and one COMMIT, one fsync, ends the group. Nobody who ran inside the group's
transaction is answered before that COMMIT returns, so an acknowledged submit is still on
disk before the client hears "ok", and nobody is shown a row that might yet vanish.

If the COMMIT fails (a full disk, a lock held by another process), nothing of the group
is kept and every call that wrote gets that error, exactly as a lone write would: the
callers' retry policy (:func:`gpud.storage.persist`) sees the same exceptions as before.
A call that only read inside the group is run again after the rollback, so it answers
from what is committed. Calls that ran before the group's first write (reads, mostly)
are answered at once: they saw only committed rows.

Durability per transaction (#12). :meth:`LedgerThread.call` is synced: its caller is
answered after a ``synchronous=FULL`` COMMIT, on disk. :meth:`LedgerThread.call_unsynced`
(a job's STARTING, RUNNING and end, which the daemon records on its own) is answered after
a ``synchronous=NORMAL`` COMMIT: written to the WAL, so a kill -9 of the daemon keeps it,
but not yet synced. A group takes the level of the call that opens its transaction; an
unsynced call joins a synced group (and is synced with it), while a synced call that finds
an unsynced transaction open first commits it and opens a synced group of its own. The WAL
is sequential and its frames' checksums chain: a power cut keeps a prefix of the commits,
and a synced COMMIT makes every earlier unsynced one durable too. So an acknowledged
submit is on disk; a job's later step is on disk by the next synced commit.
"""

from __future__ import annotations

import concurrent.futures
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from gpud.ledger.store import Ledger

__all__ = ["GROUP_SECONDS", "MAX_GROUP", "LedgerThread"]

T = TypeVar("T")

#: The most calls in one group, and the longest a group takes on new calls: together
#: they bound how long the first call of a group (a submit, a read behind it) waits for
#: its answer, while a group still carries far more writes than its one fsync costs.
MAX_GROUP = 512
GROUP_SECONDS = 0.025


@dataclass(slots=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    result: Any = None
    error: BaseException | None = None
    wrote: bool = False  #: opened a savepoint or changed a row
    synced: bool = True  #: answered only after a synchronous=FULL COMMIT


class LedgerThread:
    """The ledger's own thread. ``group_commit=False`` runs each call in its own
    transaction, as before #12 (the benchmark's baseline)."""

    def __init__(
        self, path: str | Path, *, group_commit: bool = True, group_seconds: float = GROUP_SECONDS
    ) -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._max = MAX_GROUP if group_commit else 1
        self._seconds = group_seconds
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._read_ledger: Ledger | None = None
        self._ledger: Ledger | None = None
        #: Groups committed and calls run in them, for the benchmark and the tests.
        self.groups = 0
        self.grouped_calls = 0
        opened: concurrent.futures.Future[Ledger] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(path, opened), name="gpud-ledger", daemon=True
        )
        self._thread.start()
        # Open the connection on the ledger thread itself; it is never used elsewhere.
        self._ledger = opened.result()

    @property
    def path(self) -> Path:
        assert self._ledger is not None
        return self._ledger.path

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(ledger, *args, **kwargs)`` on the ledger thread and return its result,
        once what it wrote is committed.

        Shielded from cancellation: a write that started is seen through, so the daemon's
        memory never disagrees with what the ledger committed.
        """
        result: T = await self._call(_Call(fn, args, kwargs))
        return result

    async def call_unsynced(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """As :meth:`call`, answered once committed with ``synchronous=NORMAL``: kept by a
        crash of any process, on disk by the next synced commit (see the module's text).
        For what the daemon can lose to a power cut: a job's steps after its submit."""
        result: T = await self._call(_Call(fn, args, kwargs, synced=False))
        return result

    async def _call(self, c: _Call) -> Any:
        assert self._ledger is not None, "ledger is closed"
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        c.future.add_done_callback(lambda _f: token.run_sync_soon(done.set))
        self._queue.put(c)
        with trio.CancelScope(shield=True):
            await done.wait()
        return c.future.result()

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a read-only ``fn(ledger, *args, **kwargs)`` on a second connection, on a
        thread of its own, so that it never waits behind a group of writes: it sees what
        was committed when it starts (WAL readers are not blocked by the writer). The
        connection is ``query_only``: a write there fails. Opened on first use."""
        assert self._ledger is not None, "ledger is closed"
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="gpud-ledger-read"
            )
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        fut = self._reader.submit(self._read, fn, args, kwargs)
        fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):
            await done.wait()
        return fut.result()

    def _read(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if self._read_ledger is None:
            self._read_ledger = Ledger(self.path, query_only=True)
        return fn(self._read_ledger, *args, **kwargs)

    def call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """For start-up and shutdown code outside trio."""
        assert self._ledger is not None, "ledger is closed"
        c = _Call(fn, args, kwargs)
        self._queue.put(c)
        result: T = c.future.result()
        return result

    def close(self) -> None:
        """Run what is queued, then close the connection and end the thread."""
        if self._reader is not None:

            def close_reader() -> None:
                if self._read_ledger is not None:
                    self._read_ledger.close()
                    self._read_ledger = None

            self._reader.submit(close_reader).result()
            self._reader.shutdown(wait=True)
            self._reader = None
        if self._ledger is not None:
            self._ledger = None
            self._queue.put(None)
            self._thread.join()

    # -- the ledger thread ---------------------------------------------------------------

    def _run(self, path: str | Path, opened: concurrent.futures.Future[Ledger]) -> None:
        try:
            ledger = Ledger(path)
        except BaseException as e:  # noqa: BLE001 - handed to the opener, who raises it
            opened.set_exception(e)
            return
        opened.set_result(ledger)
        nxt: _Call | None = None
        while True:
            first, nxt = (nxt if nxt is not None else self._queue.get()), None
            if first is None:
                ledger.close()
                return
            if self._max == 1:  # no group commit: each call alone, as before #12
                try:
                    first.result = first.fn(ledger, *first.args, **first.kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    first.error = e
                _answer(first)
                continue
            nxt = self._run_group(ledger, first)

    def _more(self, count: int, deadline: float) -> _Call | None:
        """The next call queued now, if the group has room and time left for it."""
        if count >= self._max or time.monotonic() >= deadline:
            return None
        try:
            nxt = self._queue.get_nowait()
        except queue.Empty:
            return None
        if nxt is None:
            self._queue.put(None)  # stop after this group
        return nxt

    def _run_group(self, ledger: Ledger, first: _Call) -> _Call | None:
        """Run a group from ``first``; return a call that must start the next group (a
        synced one that found this group's transaction unsynced), if any."""
        conn = ledger.conn
        deadline = time.monotonic() + self._seconds
        pending: list[_Call] = []  # ran inside the group's transaction: answered after it
        ledger.begin_group()
        c: _Call | None = first
        leftover: _Call | None = None
        count = 0
        while c is not None:
            if not conn.in_transaction:
                ledger.set_synced(c.synced)  # the transaction it may open takes its level
            elif c.synced and not ledger.synced:
                leftover = c  # it must not be answered after an unsynced COMMIT
                break
            count += 1
            was_open = conn.in_transaction
            before = conn.total_changes
            try:
                c.result = c.fn(ledger, *c.args, **c.kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                c.error = e
            c.wrote = ledger._call_savepoint or conn.total_changes != before
            try:
                ledger.end_call(c.error is None)
            except sqlite3.Error as e:
                c.error, c.result = e, None
            if was_open and not conn.in_transaction:
                # SQLite rolled the whole transaction back under this call (SQLITE_FULL,
                # an I/O error): the earlier calls' writes are gone with it.
                cause = c.error or sqlite3.OperationalError("the group's transaction was lost")
                self._fail(ledger, pending, cause)
                pending = []
                if c.error is None and c.wrote:
                    c.error, c.result = cause, None
            if conn.in_transaction:
                pending.append(c)
            else:
                _answer(c)
            c = self._more(count, deadline)
        try:
            ledger.end_group()
        except sqlite3.Error as e:
            self._fail(ledger, pending, e)
            return leftover
        if pending:
            self.groups += 1
            self.grouped_calls += len(pending)
        for c in pending:
            _answer(c)
        return leftover

    @staticmethod
    def _fail(ledger: Ledger, calls: list[_Call], cause: BaseException) -> None:
        """The group's transaction is rolled back: writers get ``cause``, failed calls
        their own error (their changes were undone anyway), readers are run again."""
        for c in calls:
            if c.error is None and c.wrote:
                c.error, c.result = cause, None
            elif c.error is None:
                try:
                    c.result = c.fn(ledger, *c.args, **c.kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    c.error = e
            _answer(c)


def _answer(c: _Call) -> None:
    if c.error is not None:
        c.future.set_exception(c.error)
    else:
        c.future.set_result(c.result)
