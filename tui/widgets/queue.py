"""The queue: pending jobs in scheduling order, each with its position and why it waits."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import DataTable

from gpud_client.models import JobInfo, QueuePage
from tui.format import fmt_duration
from tui.messages import CancelRequested, OpenJob
from tui.widgets.table import Cell, LiveTable

__all__ = ["QueueTable"]

_COLUMNS = [
    ("id", "JOB"),
    ("position", "POS"),
    ("name", "FUNCTION"),
    ("owner", "OWNER"),
    ("asks", "ASKS FOR"),
    ("priority", "PRIO"),
    ("waiting", "WAITING"),
    ("reason", "REASON"),
]


def queue_row(job: JobInfo, now: float) -> list[Cell]:
    return [
        str(job.id),
        "-" if job.position is None else str(job.position),
        job.name,
        job.owner,
        "/".join(job.gpu) if job.gpu else "cpu",
        str(job.priority),
        fmt_duration(now - job.submitted_at),
        job.reason or "not yet scheduled",
    ]


class QueueTable(LiveTable):
    BINDINGS = [
        Binding("c", "cancel", "Cancel job"),
    ]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(_COLUMNS, **kwargs)
        self._jobs: dict[str, JobInfo] = {}

    def show(self, page: QueuePage, now: float) -> None:
        self._jobs = {str(j.id): j for j in page.jobs}
        self.sync([(str(j.id), queue_row(j, now)) for j in page.jobs])
        shown = len(page.jobs)
        if page.total > shown:
            self.border_title = f"Queue: first {shown} of {page.total} queued"
        else:
            self.border_title = f"Queue: {page.total} queued"

    def selected_job(self) -> JobInfo | None:
        key = self.selected_key()
        return self._jobs.get(key) if key else None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(OpenJob(int(event.row_key.value)))

    def action_cancel(self) -> None:
        job = self.selected_job()
        if job is not None:
            self.post_message(CancelRequested(job.id, job.name, job.state))
