"""One job: its fields, its history, its live log, and how it ended.

The log is followed with ``GET /v1/jobs/{id}/logs?follow=true``; when the connection
drops (the daemon restarts) it resumes from the byte offset already shown, so nothing
is lost or repeated. When the job ends, the screen shows its error and the remote
traceback, read from ``/outcome`` (plain JSON). The return value is a pickle and is
loaded only when asked (`r`): unpickling runs code of the job's author.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import time
import traceback
from collections.abc import Callable

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Log, Static

from gpud_client.errors import ApiError, DaemonUnavailable, GpudError
from gpud_client.models import EventInfo, JobInfo, JobOutcome
from tui.data import DaemonClient
from tui.format import (
    FINAL_STATES,
    fmt_clock,
    fmt_duration,
    job_gpus,
    runtime,
    start_kind,
    state_text,
)
from tui.messages import CancelRequested
from tui.widgets.banner import Banner

__all__ = ["JobScreen"]

#: Lines of log kept on screen; older ones scroll away (`gpud logs ID` has them all).
MAX_LOG_LINES = 20_000
#: Characters of a return value's repr shown.
MAX_REPR = 5_000


def fields_table(job: JobInfo, now: float) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    rows: list[tuple[str, str | Text]] = [
        ("job", f"{job.id}  {job.name}"),
        ("state", state_text(job.state)),
        ("owner", job.owner),
        ("gpus", job_gpus(job) + (f"  ({', '.join(job.gpus)})" if job.gpus else "")),
        ("asked for", "/".join(job.gpu) if job.gpu else "cpu only"),
        ("started", f"{start_kind(job)}, attempt {job.attempt} of {job.retries + 1}"),
        ("submitted", fmt_clock(job.submitted_at, now)),
        (
            "ran",
            "not yet"
            if job.started_at is None
            else f"{fmt_clock(job.started_at, now)} to "
            f"{'now' if job.ended_at is None else fmt_clock(job.ended_at, now)}, "
            f"{fmt_duration(runtime(job, now))} (timeout {fmt_duration(job.timeout)})",
        ),
        ("priority", str(job.priority)),
        ("python", job.python + (f", image {job.image}" if job.image else "")),
    ]
    if job.batch_id is not None:
        rows.append(("batch", str(job.batch_id)))
    if job.state == "queued":
        pos = "-" if job.position is None else str(job.position)
        rows.append(("waiting", f"position {pos}: {job.reason or 'not yet scheduled'}"))
    if job.exit_code is not None:
        rows.append(("exit code", str(job.exit_code)))
    if job.error:
        rows.append(("error", Text(job.error, style="red")))
    for k, v in rows:
        t.add_row(k, v)
    return t


def history_table(events: list[EventInfo], now: float) -> Table:
    t = Table.grid(padding=(0, 1))
    for e in events[-12:]:
        t.add_row(fmt_clock(e.at, now), state_text(e.to_state), Text(e.reason or "", "dim"))
    return t


def outcome_text(job: JobInfo, outcome: JobOutcome | None) -> Text:
    if job.state == "succeeded":
        return Text.assemble(
            ("Succeeded", "bold green"), " - press r to load its return value (this unpickles it)."
        )
    out = Text.assemble(
        (job.state.replace("_", " ").capitalize(), "bold red"), f": {job.error or job.state}"
    )
    if outcome is not None and outcome.traceback:
        out.append("\n\nRemote traceback:\n", style="bold")
        out.append(outcome.traceback.rstrip())
    return out


class JobScreen(Screen[None]):
    DEFAULT_CSS = """
    JobScreen #top { height: auto; max-height: 16; }
    JobScreen #fields { width: 2fr; padding: 0 1; }
    JobScreen #history { width: 1fr; padding: 0 1; border-left: solid $primary; }
    JobScreen #log { height: 1fr; border: round $primary; }
    JobScreen #end { height: auto; max-height: 40%; border: round $secondary; }
    JobScreen #end.-empty { display: none; }
    """
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "cancel", "Cancel job"),
        Binding("f", "follow", "Follow log"),
        Binding("r", "result", "Load result"),
    ]

    def __init__(
        self,
        client: DaemonClient,
        job_id: int,
        *,
        refresh: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.client = client
        self.job_id = job_id
        self.refresh_every = refresh
        self.clock = clock
        self.job: JobInfo | None = None
        self.log_offset = 0
        self.log_done = False
        self._ended_shown = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Banner()
        with Horizontal(id="top"):
            yield Static("loading...", id="fields")
            yield Static("", id="history")
        yield Log(id="log", max_lines=MAX_LOG_LINES)
        with VerticalScroll(id="end", classes="-empty"):
            yield Static("", id="end-text")
        yield Footer()

    def on_mount(self) -> None:
        log = self.query_one(Log)
        log.border_title = f"output of job {self.job_id} (following)"
        self.sub_title = f"job {self.job_id}"
        self._follow()
        self._refresh_soon()
        self.set_interval(self.refresh_every, self._tick)

    def _tick(self) -> None:
        if not self.log_done or not self._ended_shown:
            self._refresh_soon()

    # Workers are started with @work, which hands Textual the function rather than a
    # coroutine: a worker replaced before it starts then leaves no coroutine unawaited.
    @work(group="job", exclusive=True, exit_on_error=False)
    async def _refresh_soon(self) -> None:
        await self._refresh()

    # -- the job's fields and history ---------------------------------------------------------

    async def _refresh(self) -> None:
        try:
            job = await self.client.get_job(self.job_id)
            events = (await self.client.events(0, job_id=self.job_id, limit=1000)).events
        except DaemonUnavailable:
            return  # the main poll says so in the banner, and retries
        except Exception as e:  # noqa: BLE001 - show it, never crash
            self.query_one("#fields", Static).update(
                Text(f"cannot read job {self.job_id}: {_why(e)}", style="red")
            )
            return
        self.job = job
        now = self.clock()
        self.query_one("#fields", Static).update(fields_table(job, now))
        self.query_one("#history", Static).update(history_table(events, now))
        if job.state in FINAL_STATES and self.log_done and not self._ended_shown:
            await self._show_end(job)

    async def _show_end(self, job: JobInfo) -> None:
        outcome = None
        if job.state != "succeeded":
            with contextlib.suppress(ApiError):  # no outcome: killed, cancelled, lost
                outcome = await self.client.outcome(job.id)
        self._show_end_text(outcome_text(job, outcome))
        self._ended_shown = True

    def _show_end_text(self, text: Text) -> None:
        self.query_one("#end", VerticalScroll).remove_class("-empty")
        self.query_one("#end-text", Static).update(text)

    # -- the log ------------------------------------------------------------------------------

    @work(group="log", exit_on_error=False)
    async def _follow(self) -> None:
        log = self.query_one(Log)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                chunks = self.client.log_bytes(self.job_id, follow=True, offset=self.log_offset)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        self.log_offset += len(chunk)
                        if text := decoder.decode(chunk):
                            log.write(text)
                break  # the stream ends once the job is final and all was sent
            except ApiError as e:  # e.g. no such job: nothing to follow
                log.border_title = f"output of job {self.job_id}: {e.detail}"
                return
            except GpudError:
                # Gone, restarting or slow: resume from what we have once it answers.
                log.border_title = f"output of job {self.job_id} (waiting for the daemon)"
                await asyncio.sleep(self.refresh_every)
                log.border_title = f"output of job {self.job_id} (following)"
            except Exception as e:  # noqa: BLE001 - shown in the title; the TUI goes on
                log.border_title = f"output of job {self.job_id}: {_why(e)}"
                return
        if tail := decoder.decode(b"", final=True):
            log.write(tail)
        size = f"{self.log_offset} bytes" if self.log_offset else "no output"
        log.border_title = f"output of job {self.job_id} (ended, {size})"
        self.log_done = True
        await self._refresh()

    # -- actions ------------------------------------------------------------------------------

    def action_cancel(self) -> None:
        job = self.job
        self.post_message(
            CancelRequested(self.job_id, job.name if job else "", job.state if job else None)
        )

    def action_follow(self) -> None:
        log = self.query_one(Log)
        log.auto_scroll = not log.auto_scroll
        if log.auto_scroll:
            log.scroll_end(animate=False)
        self.notify("following the log" if log.auto_scroll else "not following the log")

    def action_result(self) -> None:
        if self.job is None or not self.job.has_result:
            self.notify("this job has no result (yet)", severity="warning")
            return
        self._load_result(self.job)

    @work(group="result", exclusive=True, exit_on_error=False)
    async def _load_result(self, job: JobInfo) -> None:
        from gpud_client.payload import load_result

        try:
            data = await self.client.result(job.id)
            # Unpickling may import big modules: not on the UI's thread.
            value = await asyncio.to_thread(load_result, data, job)
        except Exception as e:  # noqa: BLE001 - the job's own exception, or a load failure
            text = Text("".join(traceback.format_exception_only(e)).rstrip(), style="red")
            for note in getattr(e, "__notes__", []):
                text.append("\n" + note)
            self._show_end_text(text)
            return
        shown = repr(value)
        if len(shown) > MAX_REPR:
            shown = shown[:MAX_REPR] + f"... ({len(shown)} characters; gpud result {job.id})"
        self._show_end_text(Text.assemble(("Returned: ", "bold green"), shown))


def _why(e: BaseException) -> str:
    if isinstance(e, ApiError):
        return e.detail
    return str(e) or type(e).__name__
