"""The daemon's one source of time, injected so that tests can move it (gpud.testing.clock).

Wall time (``time()``) is what the ledger records and what backoffs and fair share are
computed in; ``monotonic()`` measures how long warm workers stay idle. trio's own deadlines
(cancel scopes, sleeps) stay on trio's clock.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (wall clock)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
