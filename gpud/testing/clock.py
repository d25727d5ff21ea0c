"""A clock the test moves: the daemon's timers (backoff, keep_warm) run out when the test
says so, not after a sleep."""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """Starts at ``start`` (wall) and 1000.0 (monotonic); moves only by :meth:`advance`.
    Thread-safe: the daemon reads it from worker threads too."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        with self._lock:
            return self._wall

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back: advance by a positive amount")
        with self._lock:
            self._wall += seconds
            self._mono += seconds
