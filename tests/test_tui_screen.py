"""The TUI's main screen with fixed data: a snapshot, answers no daemon should send, a big
ledger, and the formatting helpers. (The behaviour against a real daemon is in
test_tui.py.)

The snapshot is an SVG from Textual's own screenshot API, compared as text with
tests/snapshots/tui_main.svg; docs/tui.svg is the same picture. After a deliberate change
to the screen (or a Textual upgrade that draws differently), look at the new picture and
accept it with ``GPUD_UPDATE_SNAPSHOTS=1 ./scripts/test tests/test_tui_screen.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from textual.pilot import Pilot
from textual.widgets import Log

from gpud_client import DaemonUnavailable
from tui.app import GpudTui
from tui.format import fmt_duration, sparkline
from tui.screens.dialogs import ConfirmCancel
from tui.screens.job import JobScreen
from tui.widgets.banner import Banner
from tui.widgets.gpus import GpuTable
from tui.widgets.jobs import JobsTable
from tui.widgets.queue import QueueTable

from .test_tui import cells, column, screen_text, until
from .tui_fake import NOW, FakeClient, demo, gpu, job, many_jobs

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "tests" / "snapshots" / "tui_main.svg"
DOCS_SHOT = ROOT / "docs" / "tui.svg"
SIZE = (150, 38)


@contextlib.contextmanager
def utc() -> Iterator[None]:
    """Times of day are local time; the snapshot must not depend on where it runs."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def run_fake(
    client: FakeClient, scenario: Callable[[GpudTui, Pilot[None]], Awaitable[None]]
) -> None:
    async def main() -> None:
        tui = GpudTui(client=client, clock=lambda: NOW, refresh=0.05, user="alice")
        async with tui.run_test(size=SIZE) as pilot:
            await scenario(tui, pilot)

    with utc():
        asyncio.run(main())


def loaded(tui: GpudTui, gpus: int, jobs: int) -> Callable[[], bool]:
    return lambda: (
        len(tui.query_one(GpuTable).keys) == gpus and len(tui.query_one(JobsTable).keys) == jobs
    )


# -- the snapshot -------------------------------------------------------------------------------


def test_main_screen_snapshot() -> None:
    shots: list[str] = []

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        await until(pilot, "the demo data", loaded(tui, 4, 10))
        # The footer fills itself in after the first refresh; then a few more polls, in
        # which nothing may move.
        await until(pilot, "the footer", lambda: bool(tui.screen.query("FooterKey")))
        await pilot.pause(0.2)
        shots.append(tui.export_screenshot(title="gpud tui", simplify=True))

    run_fake(FakeClient(*demo()), scenario)
    svg = shots[0]
    if os.environ.get("GPUD_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(svg, encoding="utf-8")
        DOCS_SHOT.write_text(svg, encoding="utf-8")
    assert SNAPSHOT.is_file(), "no snapshot yet: run with GPUD_UPDATE_SNAPSHOTS=1"
    assert svg == SNAPSHOT.read_text(encoding="utf-8"), (
        "the main screen changed: if that was meant, look at the new picture and accept it "
        "with GPUD_UPDATE_SNAPSHOTS=1 (which also updates docs/tui.svg)"
    )
    assert DOCS_SHOT.read_text(encoding="utf-8") == svg, "docs/tui.svg is not the snapshot"


def test_main_screen_content() -> None:
    """What the snapshot shows, in words: owners, reasons, foreign processes, sparklines."""

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        await until(pilot, "the demo data", loaded(tui, 4, 10))
        gpus, queue, jobs = (
            tui.query_one(GpuTable),
            tui.query_one(QueueTable),
            tui.query_one(JobsTable),
        )
        assert column(gpus, 8) == [
            "job 41 (alice)",
            "job 41 (alice)",
            "not gpud: pid 48213",
            "job 44 (bob)",
        ]
        assert cells(gpus, "0")[2:4] == ["71.3/80 GiB", "97%"]
        assert cells(gpus, "0")[6:8] == ["67°C", "612/700W"]
        assert len(cells(gpus, "0")[4]) == 24 and "█" in cells(gpus, "0")[4]
        assert column(queue, 0) == ["45", "46", "47"] and column(queue, 1) == ["1", "2", "3"]
        assert "busy with processes gpud did not start" in cells(queue, "45")[7]
        assert jobs.keys[:2] == ["44", "41"]  # running first, then newest first
        assert cells(jobs, "41")[2:7] == ["alice", "0,1", "running", "cold", "1h23m"]
        assert cells(jobs, "42")[8].startswith("RuntimeError: CUDA out of memory")
        assert "gpud — unix:///run/gpud/gpud.sock - daemon 0.1.0" in screen_text(tui)

    run_fake(FakeClient(*demo()), scenario)


# -- answers no daemon should send ------------------------------------------------------------


def test_errors_and_odd_answers_never_crash() -> None:
    gpus, history, jobs = demo()
    client = FakeClient(gpus, history, jobs)

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        banner = tui.query_one(Banner)
        await until(pilot, "the demo data", loaded(tui, 4, 10))
        client.fail = RuntimeError("something odd")
        await until(pilot, "the problem shown", lambda: banner.has_class("-shown"))
        assert "Unexpected answer from the daemon: RuntimeError: something odd" in str(
            banner.render()
        )
        client.fail = DaemonUnavailable(client.url, "connection lost: reset")
        await until(pilot, "disconnected", lambda: "Disconnected" in str(banner.render()))
        client.fail = None
        await until(pilot, "the banner to go", lambda: not banner.has_class("-shown"))

        # Sensors that say nothing, states this TUI has never heard of, times in the future.
        client.gpu_list = msgspec.structs.replace(
            client.gpu_list,
            gpus=[
                gpu(
                    0,
                    "Mystery 9000 ✨",
                    "mystery9000",
                    0,
                    utilization=None,
                    temperature=None,
                    power_w=None,
                    power_limit_w=None,
                ),
            ],
        )
        client.jobs[99] = job(
            99, "x" * 300, "", "paused", gpu_indices=[7, 8], started_at=NOW + 3600
        )
        client.latest += 1
        await until(pilot, "the odd data", lambda: loaded(tui, 1, 11)())
        assert cells(tui.query_one(GpuTable), "0")[2:4] == ["0.0/0 GiB", "-"]
        assert cells(tui.query_one(JobsTable), "99")[3:7] == ["7,8", "paused", "cold", "0.0s"]
        assert not banner.has_class("-shown")

        # Data that breaks the drawing itself (a time that is not a number) is reported.
        client.jobs[45] = msgspec.structs.replace(client.jobs[45], submitted_at=None)
        await until(pilot, "the problem shown", lambda: banner.has_class("-shown"))
        assert "Cannot show what the daemon answered" in str(banner.render())

    run_fake(client, scenario)


def test_a_job_screen_opened_while_disconnected_says_so() -> None:
    client = FakeClient(*demo())
    client.logs[44] = b"item 1 ok\nitem 2 ok\n"

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        await until(pilot, "the demo data", loaded(tui, 4, 10))
        client.fail = DaemonUnavailable(client.url, "the socket does not exist")
        await until(pilot, "disconnected", lambda: tui.query_one(Banner).has_class("-shown"))
        await pilot.press("enter")  # the selected job: 44, running
        await until(pilot, "the job screen", lambda: isinstance(tui.screen, JobScreen))
        banner = tui.screen.query_one(Banner)
        assert banner.has_class("-shown") and "Disconnected" in str(banner.render())
        client.fail = None
        await until(pilot, "the banner to go", lambda: not banner.has_class("-shown"))
        await until(
            pilot,
            "the log",
            lambda: list(tui.screen.query_one(Log).lines[:2]) == ["item 1 ok", "item 2 ok"],
        )
        await until(pilot, "the fields", lambda: "sweep.eval" in screen_text(tui))

    run_fake(client, scenario)


def test_cancel_is_not_offered_for_a_job_that_ended() -> None:
    client = FakeClient(*demo())

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        await until(pilot, "the demo data", loaded(tui, 4, 10))
        jobs = tui.query_one(JobsTable)
        jobs.move_cursor(row=jobs.keys.index("42"), animate=False)  # failed
        await pilot.press("c")
        await pilot.pause(0.2)
        assert not isinstance(tui.screen, ConfirmCancel) and "cancel" not in client.calls

    run_fake(client, scenario)


# -- a big ledger ----------------------------------------------------------------------------


def test_a_ledger_of_10000_jobs_is_read_a_page_at_a_time() -> None:
    client = FakeClient(*demo()[:2], many_jobs(10_000))

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        jobs = tui.query_one(JobsTable)
        await until(pilot, "the first page", lambda: len(jobs.keys) == 102)
        assert jobs.keys[:2] == ["8", "7"] and jobs.keys[2] == "10000"
        # Idle: polls go on, but no page of the ledger is read again.
        reads = client.calls.count("list_jobs")
        polls = client.calls.count("events")
        await until(pilot, "more polls", lambda: client.calls.count("events") > polls + 5)
        assert client.calls.count("list_jobs") == reads
        for first in ("9900", "9800", "9700"):
            await pilot.press("right_square_bracket")
            await until(pilot, f"the page from {first}", lambda f=first: jobs.keys[:1] == [f])
        assert len(jobs.keys) == 100 and jobs.jobs_query.page == 4
        await pilot.press("left_square_bracket")
        await until(pilot, "page 3", lambda: jobs.keys[:1] == ["9800"])
        await pilot.press("m")  # alice's jobs: a third of them, from the newest page again
        await until(pilot, "alice's", lambda: jobs.keys[2:3] == ["9999"])
        assert set(column(jobs, 2)) == {"alice"}

    run_fake(client, scenario)


# -- formatting ----------------------------------------------------------------------------


def test_sparkline() -> None:
    assert sparkline([], 4) == "    "
    assert sparkline([0, 50, 100], 4) == " ▁▅█"
    assert sparkline([None, 100], 2) == " █"
    # Folding 100 readings into 10 cells keeps a one-reading spike.
    values: list[float | None] = [0.0] * 100
    values[42] = 100.0
    assert sparkline(values, 10) == "▁▁▁▁█▁▁▁▁▁"
    assert sparkline([5], 0) == ""


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (-1, "0.0s"),
        (4.25, "4.2s"),
        (185, "3m05s"),
        (5025.4, "1h23m"),
        (200_000, "2d07h"),
    ],
)
def test_fmt_duration(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


def test_parked_warm_workers_show_in_the_gpu_table_title() -> None:
    """#13: idle warm workers whose GPU state is parked in host memory hold no GPU, so no
    row says so: the GPU table's title does."""
    from gpud_client.models import ParkedWorkerInfo

    gpus, history, jobs = demo()
    gpus.parked = [
        ParkedWorkerInfo(
            worker_id=3,
            job_id=41,
            function="llm.generate",
            owner="alice",
            gpus=[1],
            bytes=8 * 2**30,
            parked_at=NOW - 60,
        )
    ]

    async def scenario(tui: GpudTui, pilot: Pilot[None]) -> None:
        await until(pilot, "the demo data", loaded(tui, 4, 10))
        title = str(tui.query_one(GpuTable).border_title)
        assert "parked warm workers: 1, 8.0 GiB in host memory" in title

    run_fake(FakeClient(gpus, history, jobs), scenario)
