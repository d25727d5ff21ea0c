"""The Textual app: `gpud tui`. It wires the parts together and owns the one client.

Every ``refresh`` seconds a worker polls the daemon (see :mod:`tui.data`) and posts what
it learnt; the tables update their rows in place. Nothing the daemon answers can crash
the app: a daemon that is gone turns the banner red until it is back (the poll goes on
and reconnects by itself), and an answer the app did not expect is shown in the banner.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Footer, Header

from gpud_client import AsyncClient
from gpud_client.errors import ApiError, DaemonUnavailable, GpudError
from tui.data import DaemonClient, Poller
from tui.format import FINAL_STATES
from tui.messages import (
    CancelRequested,
    ConnectionLost,
    JobCancelled,
    OpenJob,
    PollFailed,
    QueryChanged,
    SnapshotReady,
)
from tui.screens.dialogs import ConfirmCancel
from tui.screens.help import HelpScreen
from tui.screens.job import JobScreen
from tui.widgets.banner import Banner
from tui.widgets.gpus import GpuTable
from tui.widgets.jobs import JobsTable
from tui.widgets.queue import QueueTable

__all__ = ["DEFAULT_REFRESH", "GpudTui"]

DEFAULT_REFRESH = 1.0


class GpudTui(App[None]):
    TITLE = "gpud"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #main { height: 1fr; }
    GpuTable, QueueTable, JobsTable { border: round $primary-darken-2; }
    GpuTable:focus-within, QueueTable:focus, JobsTable:focus { border: round $accent; }
    /* No sideways scrolling: where the height follows the rows, a scrollbar coming and
       going would change the layout at every refresh. Long reasons and errors are cut
       at the edge; the job's screen (enter) has them whole. */
    GpuTable, QueueTable, JobsTable { overflow-x: hidden; }
    QueueTable { height: auto; min-height: 4; max-height: 14; }
    JobsTable { height: 1fr; min-height: 6; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("g", "refresh_now", "Refresh"),
    ]

    #: what is wrong with the connection, shown on every screen; None when all is well
    problem: reactive[str | None] = reactive(None)

    def __init__(
        self,
        url: str | None = None,
        *,
        refresh: float = DEFAULT_REFRESH,
        client: DaemonClient | None = None,
        clock: Callable[[], float] = time.time,
        user: str | None = None,
    ) -> None:
        super().__init__()
        if refresh <= 0:
            raise ValueError("refresh must be a positive number of seconds")
        self.refresh_every = refresh
        self.clock = clock
        # A short timeout: a daemon that hangs must show up as a problem within seconds.
        self.client: DaemonClient = (
            client if client is not None else AsyncClient(url, timeout=max(5.0, 3 * refresh))
        )
        self.poller = Poller(self.client, clock=clock)
        self._user = user
        self._polling = False
        self.sub_title = self.client.url

    def compose(self) -> ComposeResult:
        yield Header()
        yield Banner()
        with Vertical(id="main"):
            yield GpuTable(id="gpus")
            yield QueueTable(id="queue")
            yield JobsTable(id="jobs", user=self._user)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(JobsTable).focus()
        self.set_interval(self.refresh_every, self.poll_now)
        self.poll_now()

    async def on_unmount(self) -> None:
        await self.client.aclose()

    # -- polling ------------------------------------------------------------------------------

    def poll_now(self) -> None:
        # One poll at a time: a slow daemon must not pile requests up behind it.
        if not self._polling:
            self._polling = True
            self._poll()

    @work(group="poll", exit_on_error=False)
    async def _poll(self) -> None:
        try:
            snap = await self.poller.poll()
        except DaemonUnavailable as e:
            self.poller.invalidate()
            self.post_message(ConnectionLost(self.client.url, e.reason or "no answer"))
        except ApiError as e:
            self.post_message(PollFailed(f"{e.detail} ({e.status} {e.code})"))
        except GpudError as e:
            self.post_message(PollFailed(str(e)))
        except Exception as e:  # noqa: BLE001 - whatever it is, show it and keep polling
            self.post_message(PollFailed(f"{type(e).__name__}: {e}"))
        else:
            self.post_message(SnapshotReady(snap))
        finally:
            self._polling = False

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        snap = message.snapshot
        now = self.clock()
        if snap.health is not None:
            h = snap.health
            self.sub_title = (
                f"{self.client.url} - daemon {h.version}, {h.executor} executor, "
                f"GPUs: {h.gpu_source}"
            )
        if not self.screen_stack:
            return  # shutting down
        main = self.screen_stack[0]  # the tables stay there while a job screen is on top
        try:
            main.query_one(GpuTable).show(snap.gpus, snap.history)
            main.query_one(QueueTable).show(snap.queue, now)
            main.query_one(JobsTable).show(snap, now)
        except Exception as e:  # noqa: BLE001 - data we cannot show must not end the app
            self.log.error("showing a snapshot failed", exc_info=e)
            self.problem = f"Cannot show what the daemon answered: {type(e).__name__}: {e}"
            return
        self.problem = None

    def on_connection_lost(self, message: ConnectionLost) -> None:
        self.problem = (
            f"Disconnected: no gpud answers at {message.url} ({message.reason}). "
            f"Retrying every {self.refresh_every:g} s; what is shown is from "
            "before."
        )

    def on_poll_failed(self, message: PollFailed) -> None:
        self.problem = (
            f"Unexpected answer from the daemon: {message.error}. Retrying every "
            f"{self.refresh_every:g} s."
        )

    def watch_problem(self, problem: str | None) -> None:
        for screen in list(self.screen_stack):
            for banner in screen.query(Banner):
                banner.show(problem)

    # -- what the tables ask for ---------------------------------------------------------------

    def on_query_changed(self, message: QueryChanged) -> None:
        self.poller.set_query(message.query)
        self.poll_now()

    def on_open_job(self, message: OpenJob) -> None:
        self.push_screen(
            JobScreen(self.client, message.job_id, refresh=self.refresh_every, clock=self.clock)
        )

    def on_cancel_requested(self, message: CancelRequested) -> None:
        job_id = message.job_id
        if message.state in FINAL_STATES:
            self.notify(f"job {job_id} has already ended: {message.state}")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.notify(f"cancelling job {job_id}...")
                self._cancel(job_id)

        self.push_screen(ConfirmCancel(job_id, message.name), answered)

    @work(group="cancel", exit_on_error=False)
    async def _cancel(self, job_id: int) -> None:
        try:
            job = await self.client.cancel(job_id)
        except ApiError as e:
            self.post_message(JobCancelled(job_id, None, e.detail))
        except Exception as e:  # noqa: BLE001 - any failure is shown, the TUI goes on
            self.post_message(JobCancelled(job_id, None, str(e) or type(e).__name__))
        else:
            self.post_message(JobCancelled(job_id, job.state))

    def on_job_cancelled(self, message: JobCancelled) -> None:
        if message.error is not None:
            self.notify(
                f"job {message.job_id} was not cancelled: {message.error}", severity="error"
            )
        elif message.state == "cancelled":
            self.notify(f"job {message.job_id} cancelled")
        else:
            self.notify(f"job {message.job_id} had already ended: {message.state}")
        self.poller.invalidate_jobs()
        self.poll_now()

    # -- actions -------------------------------------------------------------------------------

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_refresh_now(self) -> None:
        self.poller.invalidate_jobs()
        self.poll_now()
