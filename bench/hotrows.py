"""One row of the hot-path table (#12): a measure, its figure, the baseline measured in the
same run, the target, and whether the figure meets it.

Every hot-path benchmark module (``bench/hot_*.py``) exposes
``rows(quick: bool, progress) -> list[Row]``; ``bench/hotpath.py`` runs them all and prints
one table. A row whose figure misses its target says "MISSED", never hides it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Row:
    measure: str  #: what was measured, e.g. "decide(), 10,000 queued on 8 GPUs, 16 shapes"
    figure: str  #: the measured number with its unit, e.g. "3.1 ms"
    baseline: str  #: what it is compared with in the same run, e.g. "full decide 412 ms"
    target: str  #: the issue's target, e.g. "< 10 ms"
    ok: bool  #: does the figure meet the target?
    numbers: dict[str, float] = dataclasses.field(default_factory=dict)  #: raw, for --json


Progress = Callable[[str], None]


def render(rows: Sequence[Row]) -> str:
    """The table, one line per row, "ok" or "MISSED" in the last column."""
    head = ("measure", "figure", "baseline (same run)", "target", "")
    lines = [head] + [
        (r.measure, r.figure, r.baseline, r.target, "ok" if r.ok else "MISSED") for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
