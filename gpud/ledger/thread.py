"""The bridge between the trio daemon and the ledger's one thread, with group commit.

sqlite3 connections belong to the thread that made them, and aiosqlite is asyncio-only,
so the daemon owns a single dedicated thread that opens the :class:`Ledger` and runs
every query. Trio tasks hand it work and wait on a trio Event that the thread's
completion callback sets through the trio token; the loop never blocks on SQLite.

Group commit (#12). A job costs about four writes, and each write alone is a COMMIT
with its own fsync, which is what bounded the daemon's throughput. So the thread takes
every call queued at the moment it is free (up to :data:`MAX_GROUP`) and runs them as one
group: the first write opens ``BEGIN IMMEDIATE``, each call runs in its own SAVEPOINT (a
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
"""

from __future__ import annotations

import concurrent.futures
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from gpud.ledger.store import Ledger

__all__ = ["MAX_GROUP", "LedgerThread"]

T = TypeVar("T")

#: The most calls in one group: bounds how long the first of them waits for its answer.
MAX_GROUP = 512


@dataclass(slots=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    result: Any = None
    error: BaseException | None = None
    wrote: bool = False  #: opened a savepoint or changed a row


class LedgerThread:
    """The ledger's own thread. ``group_commit=False`` runs each call in its own
    transaction, as before #12 (the benchmark's baseline)."""

    def __init__(self, path: str | Path, *, group_commit: bool = True) -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._max = MAX_GROUP if group_commit else 1
        self._ledger: Ledger | None = None
        #: Groups committed and calls run in them, for the benchmark and the tests.
        self.groups = 0
        self.grouped_calls = 0
        opened: concurrent.futures.Future[Ledger] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(path, opened),
                                        name="gpud-ledger", daemon=True)
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
        assert self._ledger is not None, "ledger is closed"
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        c = _Call(fn, args, kwargs)
        c.future.add_done_callback(lambda _f: token.run_sync_soon(done.set))
        self._queue.put(c)
        with trio.CancelScope(shield=True):
            await done.wait()
        return c.future.result()  # type: ignore[no-any-return]

    def call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """For start-up and shutdown code outside trio."""
        assert self._ledger is not None, "ledger is closed"
        c = _Call(fn, args, kwargs)
        self._queue.put(c)
        return c.future.result()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Run what is queued, then close the connection and end the thread."""
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
        while True:
            first = self._queue.get()
            if first is None:
                ledger.close()
                return
            group = [first]
            while len(group) < self._max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this group
                    break
                group.append(nxt)
            self._run_group(ledger, group)

    def _run_group(self, ledger: Ledger, group: list[_Call]) -> None:
        conn = ledger.conn
        if self._max == 1:  # no group commit: each call alone, as before #12
            for c in group:
                try:
                    c.result = c.fn(ledger, *c.args, **c.kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    c.error = e
                _answer(c)
            return
        pending: list[_Call] = []  # ran inside the group's transaction: answered after it
        ledger.begin_group()
        for c in group:
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
        try:
            ledger.end_group()
        except sqlite3.Error as e:
            self._fail(ledger, pending, e)
            return
        if pending:
            self.groups += 1
            self.grouped_calls += len(pending)
        for c in pending:
            _answer(c)

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
