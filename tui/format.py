"""How the TUI writes things: sizes, durations, sparklines, states. Pure functions, so
the tables stay about layout and these can be tested without a terminal."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

from rich.text import Text

from gpud_client.models import GpuInfo, JobInfo

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "STATES",
    "fmt_clock",
    "fmt_duration",
    "fmt_gib",
    "gpu_holder",
    "job_gpus",
    "job_info_line",
    "runtime",
    "sparkline",
    "start_kind",
    "state_text",
]

STATES = (
    "queued",
    "starting",
    "running",
    "suspended",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
    "lost",
)
ACTIVE_STATES = ("queued", "starting", "running", "suspended")
FINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out", "lost")

_STATE_STYLE = {
    "queued": "yellow",
    "starting": "cyan",
    "running": "bold green",
    "suspended": "blue",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
    "timed_out": "red",
    "lost": "red",
}

_BLOCKS = "▁▂▃▄▅▆▇█"
_GIB = 1024**3


def sparkline(values: Sequence[float | None], width: int, top: float = 100.0) -> str:
    """``values`` (oldest first) as ``width`` block characters, newest at the right.

    More values than cells: each cell shows the highest value of its share, so a short
    spike still shows. Fewer: the line is padded on the left, where older data would be.
    Unknown values (None) are blanks.
    """
    if width <= 0:
        return ""
    if not values:
        return " " * width
    n = len(values)
    cells: list[float | None] = []
    if n <= width:
        cells = list(values)
    else:
        for i in range(width):
            share = [v for v in values[i * n // width : (i + 1) * n // width] if v is not None]
            cells.append(max(share) if share else None)
    out = []
    for v in cells:
        if v is None:
            out.append(" ")
            continue
        frac = min(max(v / top, 0.0), 1.0) if top > 0 else 0.0
        out.append(_BLOCKS[min(len(_BLOCKS) - 1, int(frac * len(_BLOCKS)))])
    return "".join(out).rjust(width)


def fmt_gib(used: int, total: int) -> str:
    return f"{used / _GIB:.1f}/{total / _GIB:.0f} GiB"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def fmt_clock(ts: float | None, now: float) -> str:
    """A time of day for today, a date and time otherwise (local time)."""
    if ts is None:
        return "-"
    t = _dt.datetime.fromtimestamp(ts)
    if t.date() == _dt.datetime.fromtimestamp(now).date():
        return t.strftime("%H:%M:%S")
    return t.strftime("%Y-%m-%d %H:%M")


def runtime(job: JobInfo, now: float) -> float | None:
    """Seconds the job has run (so far, for a running job); None if it never started."""
    if job.started_at is None:
        return None
    end = job.ended_at if job.ended_at is not None else now
    return max(0.0, end - job.started_at)


def job_gpus(job: JobInfo) -> str:
    """The GPUs it holds (or held) by index, else what it asked for, else "cpu"."""
    if job.gpu_indices:
        return ",".join(str(i) for i in job.gpu_indices)
    if job.gpu:
        return "/".join(job.gpu)
    return "cpu"


def start_kind(job: JobInfo) -> str:
    """How the job's process started: "cold", "warm" or "restored".

    The process executor starts every job from scratch, so a started job is "cold" until
    warm workers and snapshots exist; the daemon will then say which, in ``JobInfo``.
    """
    kind = getattr(job, "start_kind", None)  # a newer daemon's field, when it has one
    if isinstance(kind, str) and kind:
        return kind
    return "cold" if job.started_at is not None else "-"


def state_text(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def job_info_line(job: JobInfo) -> str:
    """The one line that says most about a job now: why it waits, or why it ended."""
    if job.state == "queued" and job.reason:
        return job.reason
    if job.error:
        return job.error
    if job.retries:
        return f"attempt {job.attempt}/{job.retries + 1}"
    return ""


def gpu_holder(gpu: GpuInfo) -> Text:
    """Who has the GPU: a gpud job and its owner, a cluster job gpud did not submit,
    processes gpud did not start, or no one."""
    if gpu.job_id is not None:
        return Text(f"job {gpu.job_id} ({gpu.owner or '?'})", style="bold")
    if gpu.cluster_job is not None:
        return Text(f"not gpud: slurm job {gpu.cluster_job} ({gpu.cluster_user})", style="bold red")
    if gpu.busy_foreign:
        pids = ",".join(str(p.pid) for p in gpu.processes if p.job_id is None)
        return Text(f"not gpud: pid {pids}", style="bold red")
    return Text("free", style="dim")
