"""A short history of every GPU's utilisation and memory, for sparklines.

The daemon already reads the GPU inventory every ``gpu_poll_interval``; each reading is
also appended here, to a ring buffer per GPU that keeps the last ``window`` seconds. The
TUI asks for the samples newer than the last one it has (``GET /v1/gpus/history?since=``),
so a refresh costs a few samples, not the whole window.

Plain data and no I/O: the clock is passed in, as in the scheduler.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from gpud.domain import Gpu

__all__ = ["DEFAULT_WINDOW", "GpuSamples", "HistoryBuffer", "Sample"]

#: Seconds of history kept per GPU: enough for a sparkline to show a job's ramp-up.
DEFAULT_WINDOW = 300.0
#: The ring is sized as if polls came at least this far apart (a gpu_poll_interval of 0
#: means "as fast as NVML answers").
_MIN_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # Unix time of the reading
    utilization: int | None  # percent; None where the GPU does not report it
    memory_used: int  # bytes


@dataclass(frozen=True, slots=True)
class GpuSamples:
    index: int
    uuid: str
    memory_total: int
    samples: list[Sample]


class HistoryBuffer:
    """The last ``window`` seconds of readings, per GPU (by UUID, never by index)."""

    def __init__(self, window: float = DEFAULT_WINDOW, interval: float = 2.0) -> None:
        if window <= 0:
            raise ValueError("the history window must be positive")
        self.window = window
        self.interval = interval
        # Sized from the poll interval, with one spare slot; the time check in since()
        # keeps the window exact when polls come late (a slow NVML read).
        self._maxlen = math.ceil(window / max(interval, _MIN_INTERVAL)) + 1
        self._series: dict[str, deque[Sample]] = {}
        self._gpus: dict[str, tuple[int, int]] = {}  # uuid -> (index, memory_total)

    def record(self, gpus: Iterable[Gpu], now: float) -> None:
        """Append one reading of every GPU; forget GPUs that are gone."""
        seen: set[str] = set()
        for g in gpus:
            seen.add(g.uuid)
            self._gpus[g.uuid] = (g.index, g.memory_total)
            series = self._series.get(g.uuid)
            if series is None:
                series = self._series[g.uuid] = deque(maxlen=self._maxlen)
            series.append(Sample(now, g.utilization, g.memory_used))
        for uuid in list(self._series):
            if uuid not in seen:  # unplugged, or fallen off the bus: its history is moot
                del self._series[uuid]
                del self._gpus[uuid]

    def since(self, after: float | None, now: float) -> list[GpuSamples]:
        """Each GPU's samples taken after ``after`` (all of the window when None), by index."""
        oldest = now - self.window
        floor = oldest if after is None else max(after, oldest)
        out = []
        for uuid, series in self._series.items():
            index, total = self._gpus[uuid]
            # Newest at the right end: walk back only as far as needed.
            picked: list[Sample] = []
            for s in reversed(series):
                if s.at <= floor:
                    break
                picked.append(s)
            picked.reverse()
            out.append(GpuSamples(index=index, uuid=uuid, memory_total=total, samples=picked))
        out.sort(key=lambda s: s.index)
        return out
