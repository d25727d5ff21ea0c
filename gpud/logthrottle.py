"""Rate-limit repeated tracebacks in the daemon's log (issue #10).

A client that finds a way to make a request fail can repeat it: 3,185 fuzz requests that
each logged two 30-line tracebacks grew the log to 22 MB. A bug should still be seen, so
the first traceback from a place is logged in full; the same exception from the same
place (its type and the innermost frame of its traceback) is then dropped for ``interval``
seconds, and the next one that gets through says how many were left out.

Only records that carry a traceback are limited: warnings and refusals (401/403) have
their own value line by line. The clock is passed in, so tests run in no real time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["TracebackThrottle", "install"]

Site = tuple[str, str, int]  # exception type, file, line


def _site(exc: tuple[type[BaseException], BaseException, TracebackType | None]) -> Site | None:
    typ, _, tb = exc
    if tb is None:
        return None
    while tb.tb_next is not None:  # the innermost frame: where it was raised
        tb = tb.tb_next
    return (typ.__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno)


class TracebackThrottle(logging.Filter):
    """A logging filter: at most one traceback per exception site every ``interval``
    seconds, with a count of those left out."""

    def __init__(
        self,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_sites: int = 1000,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.max_sites = max_sites
        #: site -> (when its last traceback was logged, how many were dropped since)
        self._sites: dict[Site, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        if not exc or exc[0] is None:
            return True
        site = _site(exc)
        if site is None:
            return True
        now = self.clock()
        seen = self._sites.get(site)
        if seen is not None and now - seen[0] < self.interval:
            self._sites[site] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            # Said on the record itself, so every handler and formatter shows it.
            record.msg = (
                f"{record.msg} [{seen[1]} more like this in the last "
                f"{now - seen[0]:.0f} s were not logged]"
            )
        if len(self._sites) >= self.max_sites and site not in self._sites:
            # Bounded: a flood of distinct sites must not grow memory without end.
            oldest = min(self._sites, key=lambda s: self._sites[s][0])
            del self._sites[oldest]
        self._sites[site] = (now, 0)
        return True


def install(interval: float = 60.0, logger: logging.Logger | None = None) -> TracebackThrottle:
    """Put one throttle on every handler of ``logger`` (the root logger by default):
    handler filters see records from every logger that propagates to it (gpud's own,
    hypercorn's), where a logger's filter would see only its own."""
    throttle = TracebackThrottle(interval)
    for h in (logger or logging.getLogger()).handlers:
        h.addFilter(throttle)
    return throttle
