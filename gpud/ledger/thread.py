"""The bridge between the trio daemon and the ledger's one thread.

sqlite3 connections belong to the thread that made them, and aiosqlite is asyncio-only,
so the daemon owns a single dedicated thread that opens the :class:`Ledger` and runs
every query. Trio tasks hand it work and wait on a trio Event that the thread's
completion callback sets through the trio token; the loop never blocks on SQLite.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from gpud.ledger.store import Ledger

__all__ = ["LedgerThread"]

T = TypeVar("T")


class LedgerThread:
    def __init__(self, path: str | Path) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gpud-ledger"
        )
        self._ledger: Ledger | None = None
        # Open the connection on the ledger thread itself; it is never used elsewhere.
        self._ledger = self._pool.submit(Ledger, path).result()

    @property
    def path(self) -> Path:
        assert self._ledger is not None
        return self._ledger.path

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(ledger, *args, **kwargs)`` on the ledger thread and return its result.

        Shielded from cancellation: a write that started is seen through, so the daemon's
        memory never disagrees with what the ledger committed.
        """
        ledger = self._ledger
        assert ledger is not None, "ledger is closed"
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        fut = self._pool.submit(fn, ledger, *args, **kwargs)
        fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):
            await done.wait()
        return fut.result()

    def call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """For start-up and shutdown code outside trio."""
        assert self._ledger is not None
        return self._pool.submit(fn, self._ledger, *args, **kwargs).result()

    def close(self) -> None:
        if self._ledger is not None:
            self._pool.submit(self._ledger.close).result()
            self._ledger = None
        self._pool.shutdown(wait=True)
