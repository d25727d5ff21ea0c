"""Running and recent jobs: one page of the ledger at a time, filtered and sorted.

The daemon filters (state, owner) and pages (newest first, by cursor), so the table holds
a page, never the ledger: 10,000 jobs or 10 million cost the same. Running jobs are
pinned on the first page, however long ago they were submitted. Sorting orders the rows
shown (the page), like `top` sorting what is on screen.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from gpud_client.models import JobInfo
from tui.data import JobsQuery, Snapshot
from tui.format import (
    fmt_clock,
    fmt_duration,
    job_gpus,
    job_info_line,
    runtime,
    start_kind,
    state_text,
)
from tui.messages import CancelRequested, OpenJob, QueryChanged
from tui.widgets.table import Cell, LiveTable

__all__ = ["FILTERS", "SORTS", "JobsTable"]

_COLUMNS = [
    ("id", "JOB"),
    ("name", "FUNCTION"),
    ("owner", "OWNER"),
    ("gpus", "GPUS"),
    ("state", "STATE"),
    ("start", "START"),
    ("runtime", "RUNTIME"),
    ("submitted", "SUBMITTED"),
    ("info", "INFO"),
]

#: The state filters `f` cycles through: (label, states or None for all).
FILTERS: list[tuple[str, tuple[str, ...] | None]] = [
    ("all states", None),
    ("active", ("queued", "starting", "running", "suspended")),
    ("running", ("starting", "running")),
    ("succeeded", ("succeeded",)),
    ("failed", ("failed", "timed_out", "lost")),
    ("cancelled", ("cancelled",)),
]

_ACTIVE_RANK = {"running": 0, "starting": 1, "suspended": 2, "queued": 3}


def _default_key(now: float) -> Callable[[JobInfo], Any]:
    # Running jobs first (they are what people look for), then newest first.
    return lambda j: (_ACTIVE_RANK.get(j.state, 4), -j.id)


#: The sorts `s` cycles through (and a click on a column header picks): name -> key.
SORTS: dict[str, Callable[[float], Callable[[JobInfo], Any]]] = {
    "default": _default_key,
    "id": lambda now: lambda j: -j.id,
    "runtime": lambda now: lambda j: -(runtime(j, now) or 0.0),
    "state": lambda now: lambda j: (j.state, -j.id),
    "owner": lambda now: lambda j: (j.owner, -j.id),
    "name": lambda now: lambda j: (j.name, -j.id),
    "submitted": lambda now: lambda j: -j.submitted_at,
}
_SORT_BY_COLUMN = {
    "id": "id",
    "name": "name",
    "owner": "owner",
    "state": "state",
    "runtime": "runtime",
    "submitted": "submitted",
}


def job_row(job: JobInfo, now: float) -> list[Cell]:
    return [
        str(job.id),
        job.name,
        job.owner,
        job_gpus(job),
        state_text(job.state),
        start_kind(job),
        fmt_duration(runtime(job, now)),
        fmt_clock(job.submitted_at, now),
        Text(job_info_line(job), overflow="ellipsis", no_wrap=True),
    ]


class JobsTable(LiveTable):
    BINDINGS = [
        Binding("c", "cancel", "Cancel job"),
        Binding("f", "cycle_filter", "State filter"),
        Binding("o", "owner", "Owner filter"),
        Binding("m", "mine", "Mine/all"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("S", "reverse", "Reverse", show=False),
        Binding("right_square_bracket", "older", "Older page", key_display="]"),
        Binding("left_square_bracket", "newer", "Newer page", key_display="["),
    ]

    def __init__(self, *, user: str | None = None, **kwargs: object) -> None:
        super().__init__(_COLUMNS, **kwargs)
        self.user = user if user is not None else _user()
        self.jobs_query = JobsQuery()
        self.sort_name = "default"
        self.reverse = False
        self._page: list[JobInfo] = []
        self._running_jobs: list[JobInfo] = []
        self._next_cursor: int | None = None
        self._jobs: dict[str, JobInfo] = {}
        self._now = 0.0

    # -- showing ----------------------------------------------------------------------

    def show(self, snap: Snapshot, now: float) -> None:
        if snap.query != self.jobs_query:
            return  # an answer to a filter or page the user has left since
        if snap.jobs is not None:
            self._page = snap.jobs.jobs
            self._next_cursor = snap.jobs.next_cursor
        if snap.running is not None:
            self._running_jobs = snap.running
        self._now = now
        self.render_rows()

    def render_rows(self) -> None:
        q = self.jobs_query
        jobs = {j.id: j for j in self._page}
        wanted = {"starting", "running"} if q.states is None else set(q.states)
        if q.page == 1:
            for j in self._running_jobs:
                if j.state in wanted:
                    jobs[j.id] = j  # the fresher copy
        ordered = sorted(jobs.values(), key=SORTS[self.sort_name](self._now), reverse=self.reverse)
        self._jobs = {str(j.id): j for j in ordered}
        self.sync([(str(j.id), job_row(j, self._now)) for j in ordered])
        self.border_title = f"Jobs: {self.describe()}"

    def describe(self) -> str:
        q = self.jobs_query
        label = next(
            (name for name, states in FILTERS if states == q.states), ",".join(q.states or ())
        )
        owner = f"owner {q.owner}" if q.owner else "all owners"
        order = self.sort_name + (" reversed" if self.reverse else "")
        more = "" if self._next_cursor is None else ", ] for older"
        return f"{label}, {owner}, sorted by {order}, page {q.page}{more}"

    def selected_job(self) -> JobInfo | None:
        key = self.selected_key()
        return self._jobs.get(key) if key else None

    # -- asking for another view ----------------------------------------------------------

    def _ask(self, query: JobsQuery) -> None:
        if query == self.jobs_query:
            return
        self.jobs_query = query
        self._next_cursor = None  # until the new page says where the next one starts
        self.border_title = f"Jobs: {self.describe()} (loading)"
        self.post_message(QueryChanged(query))

    def action_cycle_filter(self) -> None:
        states = [s for _, s in FILTERS]
        i = states.index(self.jobs_query.states) if self.jobs_query.states in states else -1
        self._ask(self.jobs_query.filtered(states=states[(i + 1) % len(states)]))

    def set_owner(self, owner: str | None) -> None:
        owner = (owner or "").strip() or None
        self._ask(self.jobs_query.filtered(owner=owner))

    def action_owner(self) -> None:
        from tui.screens.dialogs import OwnerPrompt

        def chosen(owner: str | None) -> None:
            if owner is not None:  # None: escape, leave the filter as it is
                self.set_owner(owner)

        self.app.push_screen(OwnerPrompt(self.jobs_query.owner or ""), chosen)

    def action_mine(self) -> None:
        self.set_owner(None if self.jobs_query.owner == self.user else self.user)

    def action_older(self) -> None:
        if self._next_cursor is not None:
            self._ask(self.jobs_query.older(self._next_cursor))

    def action_newer(self) -> None:
        self._ask(self.jobs_query.newer())

    def action_cycle_sort(self) -> None:
        names = list(SORTS)
        self.sort_name = names[(names.index(self.sort_name) + 1) % len(names)]
        self.render_rows()

    def action_reverse(self) -> None:
        self.reverse = not self.reverse
        self.render_rows()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        name = _SORT_BY_COLUMN.get(str(event.column_key.value))
        if name is None:
            return
        if name == self.sort_name:
            self.reverse = not self.reverse
        else:
            self.sort_name, self.reverse = name, False
        self.render_rows()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(OpenJob(int(event.row_key.value)))

    def action_cancel(self) -> None:
        job = self.selected_job()
        if job is not None:
            self.post_message(CancelRequested(job.id, job.name, job.state))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
