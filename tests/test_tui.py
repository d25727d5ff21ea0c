"""The TUI, driven by Textual's Pilot against a real `gpud serve` (fake GPUs, real jobs).

Textual runs on asyncio and the test suite on trio (pytest-trio's trio_mode), so these
tests are plain functions that run each scenario with ``asyncio.run``; the daemon is a
subprocess, and jobs are submitted with the synchronous client.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import Log, Static

import gpud_client as gpud
from gpud_client import Client
from tui.app import GpudTui
from tui.screens.dialogs import ConfirmCancel
from tui.screens.job import JobScreen
from tui.widgets.banner import Banner
from tui.widgets.gpus import GpuTable
from tui.widgets.jobs import JobsTable
from tui.widgets.queue import QueueTable
from tui.widgets.table import LiveTable

from .conftest import DaemonProc

app = gpud.App("tui")
SIZE = (160, 45)


@app.function()
def hold(flag: str) -> str:
    import os
    import time

    deadline = time.monotonic() + 120
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "released"


@app.function()
def ticker(flag: str) -> int:
    import os
    import time

    i = 0
    deadline = time.monotonic() + 120
    while not os.path.exists(flag) and time.monotonic() < deadline:
        print(f"tick {i}", flush=True)
        i += 1
        time.sleep(0.1)
    print("done ticking", flush=True)
    return i


@app.function()
def boom(message: str) -> None:
    raise ValueError(message)


# -- driving the app ------------------------------------------------------------------------

Scenario = Callable[[GpudTui, Pilot[None]], Awaitable[None]]


def run_tui(url: str, scenario: Scenario, *, refresh: float = 0.2, **kwargs: Any) -> None:
    async def main() -> None:
        tui = GpudTui(url, refresh=refresh, **kwargs)
        async with tui.run_test(size=SIZE) as pilot:
            await scenario(tui, pilot)

    asyncio.run(main())


def screen_text(tui: GpudTui) -> str:
    """The screen as plain text, for failure messages."""
    width, height = tui.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        record=True,
        force_terminal=True,
        color_system=None,
    )
    console.print(tui.screen._compositor.render_update(full=True))
    return console.export_text()


async def until(
    pilot: Pilot[None], what: str, predicate: Callable[[], bool], within: float = 30.0
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}; the screen:\n{screen_text(pilot.app)}"
            )  # type: ignore[arg-type]
        await pilot.pause(0.05)


def cells(table: LiveTable, key: str) -> list[str]:
    return [c.plain if isinstance(c, Text) else str(c) for c in table.get_row(key)]


def column(table: LiveTable, index: int) -> list[str]:
    return [cells(table, k)[index] for k in table.keys]


def state_of(table: LiveTable, job_id: int) -> str | None:
    return cells(table, str(job_id))[4] if str(job_id) in table.keys else None


def select(table: LiveTable, job_id: int) -> None:
    table.focus()
    table.move_cursor(row=table.get_row_index(str(job_id)), animate=False)


def log_text(tui: GpudTui) -> str:
    return "\n".join(tui.screen.query_one(Log).lines)


def end_text(tui: GpudTui) -> str:
    return str(tui.screen.query_one("#end-text", Static).render())


def banner(tui: GpudTui) -> Banner:
    return tui.screen.query_one(Banner)


# -- the acceptance ---------------------------------------------------------------------------


def test_gpu_table_shows_the_configured_gpus(daemon: DaemonProc) -> None:
    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        gpus = tui.query_one(GpuTable)
        await until(
            pilot,
            "three GPUs with history",
            lambda: len(gpus.keys) == 3 and cells(gpus, "2")[4].strip() != "",
        )
        assert column(gpus, 1) == ["h100 fake", "h100 fake", "l4 fake"]
        assert column(gpus, 2) == ["0.0/80 GiB", "0.0/80 GiB", "0.0/24 GiB"]
        assert column(gpus, 8) == ["free", "free", "free"]
        assert "fake" in str(gpus.border_title) and "FAKE" in str(gpus.border_subtitle)
        assert not banner(tui).has_class("-shown")
        assert f"daemon {gpud.__version__}" in tui.sub_title

    run_tui(daemon.url, scenario)


def test_job_is_queued_then_runs_and_its_log_streams(
    process_daemon: DaemonProc, shared_dir: Path
) -> None:
    url = process_daemon.url
    blocker = hold.with_options(gpu="h100:2", url=url).spawn(str(shared_dir / "release"))
    job = ticker.with_options(gpu="h100", url=url).spawn(str(shared_dir / "stop"))
    holder = f"job {blocker.id} ({blocker.status().owner})"

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        queue, jobs, gpus = (
            tui.query_one(QueueTable),
            tui.query_one(JobsTable),
            tui.query_one(GpuTable),
        )
        key = str(job.id)
        # Each table comes from its own request, so each is waited for on its own.
        await until(
            pilot,
            "the job in the queue with its reason",
            lambda: key in queue.keys and cells(queue, key)[1] == "1",
        )
        row = cells(queue, key)
        assert f"job {blocker.id}" in row[7] and row[4] == "h100:1"
        await until(
            pilot, "the job queued in the jobs table", lambda: state_of(jobs, job.id) == "queued"
        )
        await until(pilot, "the blocker on the GPUs", lambda: column(gpus, 8)[:2] == [holder] * 2)

        (shared_dir / "release").touch()
        await until(pilot, "the job running", lambda: state_of(jobs, job.id) == "running")
        assert cells(jobs, key)[5] == "cold"
        await until(
            pilot,
            "the queue empty",
            lambda: key not in queue.keys and "0 queued" in str(queue.border_title),
        )
        await until(pilot, "the job on a GPU", lambda: f"job {job.id}" in " ".join(column(gpus, 8)))

        select(jobs, job.id)
        await pilot.press("enter")
        await until(pilot, "the job screen", lambda: isinstance(tui.screen, JobScreen))
        await until(pilot, "log lines", lambda: "tick 3" in log_text(tui))
        seen = len(tui.screen.query_one(Log).lines)
        await until(
            pilot, "more log lines", lambda: len(tui.screen.query_one(Log).lines) > seen + 5
        )
        (shared_dir / "stop").touch()
        await until(pilot, "the end of the job", lambda: "Succeeded" in end_text(tui))
        assert log_text(tui).rstrip().endswith("done ticking")
        ticks = log_text(tui).count("tick ")
        assert log_text(tui).splitlines()[:3] == ["tick 0", "tick 1", "tick 2"]
        await pilot.press("r")
        await until(pilot, "the return value", lambda: "Returned:" in end_text(tui))
        assert end_text(tui).endswith(str(ticks))
        await pilot.press("escape")
        await until(pilot, "the main screen", lambda: not isinstance(tui.screen, JobScreen))
        await until(pilot, "succeeded in the table", lambda: state_of(jobs, job.id) == "succeeded")

    run_tui(url, scenario)
    assert job.get(timeout=30) > 0


def test_cancel_from_the_tui_cancels_in_the_ledger(
    process_daemon: DaemonProc, shared_dir: Path
) -> None:
    url = process_daemon.url
    flag = str(shared_dir / "never")
    running = ticker.with_options(url=url).spawn(flag)
    other = ticker.with_options(url=url).spawn(flag)

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        jobs = tui.query_one(JobsTable)
        await until(
            pilot,
            "both running",
            lambda: (
                state_of(jobs, running.id) == "running" and state_of(jobs, other.id) == "running"
            ),
        )
        # "n" keeps the job.
        select(jobs, running.id)
        await pilot.press("c")
        await until(pilot, "the confirmation", lambda: isinstance(tui.screen, ConfirmCancel))
        await pilot.press("n")
        await pilot.pause(0.5)
        assert not isinstance(tui.screen, ConfirmCancel)
        assert state_of(jobs, running.id) == "running"
        # "y" cancels it, and the table says so.
        await pilot.press("c")
        await until(pilot, "the confirmation", lambda: isinstance(tui.screen, ConfirmCancel))
        await pilot.press("y")
        await until(
            pilot, "cancelled in the table", lambda: state_of(jobs, running.id) == "cancelled"
        )
        assert process_daemon.ledger().get(running.id).state.value == "cancelled"
        # From the job screen, with the mouse on the dialog's button.
        select(jobs, other.id)
        await pilot.press("enter")
        await until(pilot, "the job screen", lambda: isinstance(tui.screen, JobScreen))
        await until(pilot, "log lines", lambda: "tick 1" in log_text(tui))
        await pilot.press("c")
        await until(pilot, "the confirmation", lambda: isinstance(tui.screen, ConfirmCancel))
        await pilot.click("#yes")
        await until(
            pilot,
            "the job screen to say cancelled",
            lambda: isinstance(tui.screen, JobScreen) and "Cancelled" in end_text(tui),
        )

    run_tui(url, scenario)
    assert process_daemon.ledger().get(other.id).state.value == "cancelled"
    # #14: it says which signal ended it ("cancelled: ended by SIGTERM after cancel")
    assert Client(url).get_job(running.id).error.startswith("cancelled: ")


def test_failed_job_shows_the_remote_traceback(daemon: DaemonProc) -> None:
    job = boom.with_options(url=daemon.url).spawn("kaboom")
    assert job.wait(timeout=30).state == "failed"

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        jobs = tui.query_one(JobsTable)
        await until(pilot, "the failed job", lambda: state_of(jobs, job.id) == "failed")
        assert cells(jobs, str(job.id))[8] == "ValueError: kaboom"
        select(jobs, job.id)
        await pilot.press("enter")
        await until(pilot, "the traceback", lambda: "Remote traceback" in end_text(tui))
        text = end_text(tui)
        assert "ValueError: kaboom" in text and "in boom" in text

    run_tui(daemon.url, scenario)


def test_daemon_down_shows_disconnected_and_recovers(
    process_daemon: DaemonProc, shared_dir: Path
) -> None:
    url = process_daemon.url
    job = ticker.with_options(url=url).spawn(str(shared_dir / "stop"))

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        jobs = tui.query_one(JobsTable)
        await until(pilot, "the job running", lambda: state_of(jobs, job.id) == "running")
        select(jobs, job.id)
        await pilot.press("enter")
        await until(pilot, "log lines", lambda: "tick 2" in log_text(tui))

        await asyncio.to_thread(process_daemon.stop)  # jobs keep running without it
        await until(pilot, "the disconnected banner", lambda: banner(tui).has_class("-shown"))
        assert "Disconnected" in str(banner(tui).render())
        assert isinstance(tui.screen, JobScreen)  # still there, still usable

        (process_daemon.log).write_bytes(b"")  # so start() waits for the new daemon
        await asyncio.to_thread(process_daemon.start)
        await until(pilot, "the banner to go", lambda: not banner(tui).has_class("-shown"))
        (shared_dir / "stop").touch()
        await until(pilot, "the end of the job", lambda: "Succeeded" in end_text(tui))
        # The log resumed where it stopped: every tick once, in order, none lost.
        lines = [x for x in log_text(tui).splitlines() if x.startswith("tick ")]
        assert lines == [f"tick {i}" for i in range(len(lines))]
        await pilot.press("escape")
        await until(pilot, "succeeded in the table", lambda: state_of(jobs, job.id) == "succeeded")

    run_tui(url, scenario)


def test_the_app_starts_without_a_daemon_and_connects_later(base_dir: Path) -> None:
    proc = DaemonProc(base_dir)

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        await until(pilot, "the disconnected banner", lambda: banner(tui).has_class("-shown"))
        assert "the socket does not exist" in str(banner(tui).render())
        await asyncio.to_thread(proc.start)
        gpus = tui.query_one(GpuTable)
        await until(pilot, "the GPUs", lambda: len(gpus.keys) == 3)
        assert not banner(tui).has_class("-shown")

    try:
        run_tui(proc.url, scenario)
    finally:
        proc.stop()


def test_ten_thousand_jobs_are_paged(process_daemon: DaemonProc, shared_dir: Path) -> None:
    """The TUI reads pages, never the ledger (paging itself: test_tui_screen.py)."""
    url = process_daemon.url
    blocker = hold.with_options(gpu="h100:2", url=url).spawn(str(shared_dir / "release"))
    with Client(url) as c:
        batch = c.submit_batch(
            hold.with_options(gpu="h100").batch_request(
                [((str(shared_dir / "release"),), {})] * 10_000
            )
        )
    newest = max(batch.job_ids)

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        jobs, queue = tui.query_one(JobsTable), tui.query_one(QueueTable)
        await until(
            pilot,
            "the queue in order",
            lambda: (
                "of 10000 queued" in str(queue.border_title)
                and column(queue, 1)[:3] == ["1", "2", "3"]
            ),
        )
        assert len(queue.keys) == 100
        assert column(queue, 0)[0] == str(batch.job_ids[0])
        # One page of the ledger, and the running job pinned on top of it.
        await until(pilot, "a page of jobs", lambda: len(jobs.keys) == 101)
        assert jobs.keys[0] == str(blocker.id)
        assert str(newest - 99) in jobs.keys and str(newest - 100) not in jobs.keys
        await pilot.press("right_square_bracket")
        await until(pilot, "the second page", lambda: str(newest - 120) in jobs.keys)
        assert str(newest) not in jobs.keys and len(jobs.keys) == 100
        assert str(blocker.id) not in jobs.keys  # pinned on the first page only

    # Slower polls: Pilot waits for the app to be idle after each key, and redrawing two
    # tables of 100 rows five times a second never is.
    run_tui(url, scenario, refresh=0.5)


def test_owner_filter_and_sort(daemon: DaemonProc) -> None:
    job = boom.with_options(url=daemon.url).spawn("x")
    job.wait(timeout=30)
    me = job.status().owner

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        jobs = tui.query_one(JobsTable)
        await until(pilot, "jobs", lambda: str(job.id) in jobs.keys)
        await pilot.press("o")
        await pilot.press(*"nobody-here", "enter")
        await until(pilot, "no jobs", lambda: jobs.keys == [])
        assert "owner nobody-here" in str(jobs.border_title)
        await pilot.press("o", "ctrl+u", *me, "enter")
        await until(pilot, "my jobs", lambda: str(job.id) in jobs.keys)
        assert set(column(jobs, 2)) == {me}
        await pilot.press("s", "s")  # default -> id -> runtime
        assert "sorted by runtime" in str(jobs.border_title)
        await pilot.click("#jobs", offset=(4, 1))  # the JOB header: sort by id
        await until(pilot, "sorted by id", lambda: "sorted by id" in str(jobs.border_title))
        ids = [int(k) for k in jobs.keys]
        assert ids == sorted(ids, reverse=True)
        await pilot.press("S")
        await until(pilot, "reversed", lambda: [int(k) for k in jobs.keys] == sorted(ids))

    run_tui(daemon.url, scenario)


def test_help_screen(daemon: DaemonProc) -> None:
    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        await pilot.press("question_mark")
        await until(pilot, "help", lambda: type(tui.screen).__name__ == "HelpScreen")
        assert "cancel the selected job" in screen_text(tui)
        await pilot.press("escape")
        await until(pilot, "back", lambda: type(tui.screen).__name__ != "HelpScreen")

    run_tui(daemon.url, scenario)


def test_refresh_must_be_positive() -> None:
    with pytest.raises(ValueError, match="refresh"):
        GpudTui("unix:///nonexistent.sock", refresh=0)


def test_cli_reports_a_bad_url() -> None:
    from .conftest import gpud_cli

    r = gpud_cli("tui", "--url", "ftp://nowhere")
    assert r.returncode == 1 and r.stderr.startswith("Error: invalid gpud URL"), r.stderr
    r = gpud_cli("tui", "--refresh", "0")
    assert r.returncode == 2
