"""Seeing where API latency goes, and quick reads before new job starts (#12):
gpud.loopwatch (Server-Timing, loop_stall_log) and gpud.priority."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from gpud.config import ConfigError, load_config
from gpud.loopwatch import ServerTiming, StallWatch
from gpud.priority import MAX_YIELD, Interactive, QuickFirst, is_quick
from gpud.testing.daemon_proc import DaemonProc
from gpud_client import wire

# -- Server-Timing and loop_stall_log on a real daemon -------------------------------------


@pytest.fixture
def stall_logging_daemon(base_dir: Path) -> Iterator[DaemonProc]:
    # A threshold below any step's length: every step is logged, so the test does not
    # depend on how slow this machine is.
    d = DaemonProc(base_dir, env={"GPUD_LOOP_STALL_LOG": "0.000000001"})
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _get(url: str, path: str) -> wire.Response:
    t = wire.Transport(url, {})
    try:
        return t.request("GET", path, connect_timeout=10, read_timeout=30)
    finally:
        t.close()


def test_every_answer_says_how_long_the_daemon_took(stall_logging_daemon: DaemonProc) -> None:
    d = stall_logging_daemon
    for path in ("/v1/jobs", "/v1/health", "/v1/jobs/999999"):  # a 404 is timed too
        resp = _get(d.url, path)
        value = resp.headers.get("server-timing")
        assert value is not None and value.startswith("app;dur="), (path, value)
        assert float(value.removeprefix("app;dur=")) >= 0.0
    log = d.log_since()
    assert "loop stall: " in log and " in one step of task " in log and "(cpu " in log


def test_loop_stall_log_is_a_duration_or_none() -> None:
    assert load_config(env={}).loop_stall_log is None
    assert load_config(env={"GPUD_LOOP_STALL_LOG": "0.02"}).loop_stall_log == 0.02
    assert load_config(env={"GPUD_LOOP_STALL_LOG": "none"}).loop_stall_log is None
    with pytest.raises(ConfigError):
        load_config(env={"GPUD_LOOP_STALL_LOG": "soon"})


# -- StallWatch, on its own clocks ---------------------------------------------------------


class _Task:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_step_longer_than_the_threshold_is_logged_with_its_cpu_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wall, cpu = [100.0], [5.0]
    w = StallWatch(0.02, clock=lambda: wall[0], cpu_clock=lambda: cpu[0])
    t: Any = _Task("gpud.daemon.loop.SchedulingLoop._start")
    w.after_task_step(t)  # added mid-step: that step's start was not seen, nothing counted
    assert w.count == 0
    w.before_task_step(t)
    wall[0] += 0.019  # under the threshold
    w.after_task_step(t)
    assert w.count == 0
    with caplog.at_level(logging.WARNING, logger="gpud"):
        w.before_task_step(t)
        wall[0] += 0.25
        cpu[0] += 0.01  # most of it waiting for a core (or the GIL), not working
        w.after_task_step(t)
    assert w.count == 1 and w.worst == pytest.approx(0.25)
    assert "loop stall: 250.0 ms (cpu 10.0 ms) in one step of task " in caplog.text
    assert "SchedulingLoop._start" in caplog.text


# -- quick requests first ------------------------------------------------------------------


def test_which_requests_are_quick() -> None:
    for path in ("/v1/jobs", "/v1/jobs/7", "/v1/queue", "/v1/gpus", "/metrics", "/v1/batches/3"):
        assert is_quick("GET", path), path
    # Those that wait for jobs: holding a round for them would hold up their own job.
    for path in (
        "/v1/jobs/7/wait",
        "/v1/jobs/7/outcome",
        "/v1/jobs/7/logs",
        "/v1/jobs/7/stream",
        "/v1/batches/3/results",
        "/v1/events",
    ):
        assert not is_quick("GET", path), path
    assert not is_quick("POST", "/v1/jobs") and not is_quick("POST", "/v1/jobs/run")


async def test_a_round_waits_for_a_quick_answer_then_goes_on() -> None:
    gate = Interactive()
    assert await gate.yield_to_requests() == 0.0 and gate.yields == 0  # none: no wait
    done = trio.Event()

    async def answer() -> None:
        with gate.answering():
            await done.wait()

    async with trio.open_nursery() as n:
        n.start_soon(answer)
        await trio.testing.wait_all_tasks_blocked()
        assert gate.serving == 1

        waited: list[float] = []

        async def round_() -> None:
            waited.append(await gate.yield_to_requests(max_wait=3600.0))

        n.start_soon(round_)
        await trio.testing.wait_all_tasks_blocked()
        assert waited == []  # held while the answer is being made
        done.set()
    assert len(waited) == 1 and gate.serving == 0 and gate.yields == 1


async def test_a_round_never_waits_longer_than_max_yield(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = Interactive()
    with gate.answering():  # a request that is never answered
        t0 = trio.current_time()
        waited = await gate.yield_to_requests()
        assert waited == pytest.approx(MAX_YIELD) and trio.current_time() - t0 < 1.0
    assert gate.serving == 0


async def test_quick_first_holds_the_gate_until_the_answer_goes() -> None:
    gate = Interactive()
    seen: list[tuple[str, int]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(("app", gate.serving))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(("started", gate.serving))
        await send({"type": "http.response.body", "body": b"{}"})
        seen.append(("sent", gate.serving))

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    mw = ServerTiming(QuickFirst(app, gate))
    await mw({"type": "http", "method": "GET", "path": "/v1/jobs"}, receive, send)
    assert seen == [("app", 1), ("started", 1), ("sent", 0)]
    headers = dict(sent[0]["headers"])
    assert headers[b"server-timing"].startswith(b"app;dur=")
    # A long-poll never holds it: its own job must be able to start.
    seen.clear()
    await mw({"type": "http", "method": "GET", "path": "/v1/jobs/7/wait"}, receive, send)
    assert seen == [("app", 0), ("started", 0), ("sent", 0)]


async def test_quick_first_lets_go_when_the_app_fails() -> None:
    gate = Interactive()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("a bug")

    async def nothing(*_: Any) -> Any:
        return None

    with pytest.raises(RuntimeError):
        await QuickFirst(app, gate)(
            {"type": "http", "method": "GET", "path": "/v1/jobs"}, nothing, nothing
        )
    assert gate.serving == 0
