"""The Prometheus text exposition format (0.0.4), written here rather than with
``prometheus_client`` (#16).

Why not the library: the daemon's figures already live in its own structures (the queue
index, the active jobs, counters kept as jobs end), so what is left is formatting, about a
hundred lines. ``prometheus_client`` would add a dependency to every install (the wheel and
the zipapp an air-gapped box copies) and a process-global registry the tests would have to
reset, for no figure we could not produce as cheaply. ``promtool check metrics`` checks the
output in tests/test_metrics.py, which is what the library would have guaranteed.

Plain data and no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["CONTENT_TYPE", "Family", "Histogram", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Family:
    """One metric: its name, type, help, label names and samples.

    A sample is (suffix, label values, value); the suffix is "" except for a histogram's
    ``_bucket`` (whose last label is ``le``), ``_sum`` and ``_count``."""

    name: str
    kind: str  # "gauge", "counter" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    samples: list[tuple[str, tuple[str, ...], float]] = field(default_factory=list)

    def add(self, value: float, *labels: str) -> None:
        if len(labels) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {labels}")
        self.samples.append(("", labels, value))


class Histogram:
    """A histogram kept live in the daemon: cumulative bucket counts per label set."""

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...], buckets: Sequence[float]
    ) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("histogram buckets must be given in increasing order")
        self.name, self.help, self.labels = name, help, labels
        self.buckets = tuple(buckets)
        # label values -> [count per bucket (not cumulative)..., +Inf count, sum]
        self._series: dict[tuple[str, ...], list[float]] = {}
        if not labels:
            # Its one series exists from the start, at zero (as Prometheus' clients do):
            # a scrape before the first observation has it too, and rate() sees it begin.
            self._series[()] = [0.0] * (len(self.buckets) + 2)

    def observe(self, value: float, *labels: str) -> None:
        row = self._series.get(labels)
        if row is None:
            row = self._series[labels] = [0.0] * (len(self.buckets) + 2)
        i = next((n for n, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        row[i] += 1
        row[-1] += value

    def family(self) -> Family:
        f = Family(self.name, "histogram", self.help, self.labels)
        for labels, row in sorted(self._series.items()):
            running = 0.0
            for b, n in zip((*self.buckets, math.inf), row[:-1], strict=True):
                running += n
                f.samples.append(("_bucket", (*labels, _number(b)), running))
            f.samples.append(("_sum", labels, row[-1]))
            f.samples.append(("_count", labels, running))
        return f


def render(families: Iterable[Family]) -> bytes:
    out: list[str] = []
    for f in families:
        out.append(f"# HELP {f.name} {_escape_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.kind}")
        for suffix, values, value in f.samples:
            names = (*f.labels, "le") if suffix == "_bucket" else f.labels
            if names:
                pairs = ",".join(
                    f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)
                )
                out.append(f"{f.name}{suffix}{{{pairs}}} {_number(value)}")
            else:
                out.append(f"{f.name}{suffix} {_number(value)}")
    out.append("")
    return "\n".join(out).encode()


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")
