"""The GPU table: one row per GPU, with sparklines of its recent utilisation and memory."""

from __future__ import annotations

from rich.text import Text

from gpud_client.models import GpuInfo, GpuList
from tui.data import Series
from tui.format import fmt_gib, gpu_holder, sparkline
from tui.widgets.table import Cell, LiveTable

__all__ = ["GpuTable"]

#: Characters per sparkline: at the default 2 s poll, 24 cells show the last 48 s one
#: reading a cell, and longer histories are folded (peaks kept).
SPARK_WIDTH = 24

_COLUMNS = [
    ("index", "GPU"),
    ("type", "TYPE"),
    ("memory", "MEMORY"),
    ("util", "UTIL"),
    ("util_hist", "UTIL HISTORY"),
    ("mem_hist", "MEMORY HISTORY"),
    ("temp", "TEMP"),
    ("power", "POWER"),
    ("holder", "HELD BY"),
]


def gpu_row(g: GpuInfo, series: Series | None) -> list[Cell]:
    kind = Text(g.type)
    if g.fake:
        kind.append(" fake", style="italic dim")
    util = "-" if g.utilization is None else f"{g.utilization}%"
    temp = "-" if g.temperature is None else f"{g.temperature}°C"
    if g.power_w is None:
        power = "-"
    elif g.power_limit_w:
        power = f"{g.power_w:.0f}/{g.power_limit_w:.0f}W"
    else:
        power = f"{g.power_w:.0f}W"
    util_hist = sparkline(list(series.utilization) if series else [], SPARK_WIDTH)
    mem_hist = sparkline(list(series.memory) if series else [], SPARK_WIDTH)
    return [
        str(g.index),
        kind,
        fmt_gib(g.memory_used, g.memory_total),
        util,
        Text(util_hist, style="green"),
        Text(mem_hist, style="blue"),
        temp,
        power,
        gpu_holder(g),
    ]


class GpuTable(LiveTable):
    """GPUs by index. Fake GPUs say so; GPUs busy with processes gpud did not start are
    marked in red, since the scheduler will not hand them out."""

    DEFAULT_CSS = """
    GpuTable { height: auto; max-height: 12; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(_COLUMNS, **kwargs)
        self.show_cursor = False  # nothing to pick here; a highlight would hide the colours
        self.note: str | None = None

    def show(self, gpus: GpuList, history: dict[str, Series]) -> None:
        self.sync([(str(g.index), gpu_row(g, history.get(g.uuid))) for g in gpus.gpus])
        self.note = gpus.note
        title = f"GPUs ({len(gpus.gpus)}, {gpus.source})"
        if gpus.parked:  # idle warm workers parked in host memory (#13)
            size = sum(p.bytes for p in gpus.parked) / 2**30
            title += f" - parked warm workers: {len(gpus.parked)}, {size:.1f} GiB in host memory"
        self.border_title = title if gpus.gpus else f"{title}: none, CPU-only jobs run"
        self.border_subtitle = gpus.note or ""
