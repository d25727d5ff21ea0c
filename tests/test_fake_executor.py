"""The daemon driven through gpud.testing.FakeExecutor (#12): retries, signals, timeouts,
cancel, launch failures and adoption after a restart, each decided by the test instead
of by what a real process happens to do. The daemon, its ledger and its HTTP API are
real; only the jobs are not. (What the fake itself promises, the same as the process and
Podman executors, is in test_executor_contract.py.)"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from gpud.config import Config, load_config
from gpud.executors.base import ExecutorRefusal, LaunchSpec, Outcome
from gpud.server import Served, serve
from gpud.testing import FakeExecutor, FakeGpuInventory, FakeMachine, Script
from gpud_client import AsyncClient
from gpud_client.jobdir import EXIT_SETUP, read_status
from gpud_client.models import JobInfo, SubmitRequest

from .conftest import TEST_SETTINGS

PY = "{}.{}.{}".format(*sys.version_info[:3])


def request(name: str = "fake.job", **kw: object) -> SubmitRequest:
    # The fake runs nothing: the payload is never unpickled, by the daemon or anyone.
    return SubmitRequest(name=name, function=b"not run", args=b"not run", python=PY, **kw)  # type: ignore[arg-type]


@dataclass
class Box:
    config: Config
    machine: FakeMachine
    executor: FakeExecutor
    served: Served
    client: AsyncClient
    nursery: trio.Nursery


def _config(base: Path) -> Config:
    env = dict(TEST_SETTINGS)
    env["GPUD_DATA_DIR"] = str(base / "data")
    env["GPUD_SOCKET"] = str(base / "gpud.sock")
    return load_config(env=env)


async def _start(nursery: trio.Nursery, config: Config, executor: FakeExecutor) -> Served:
    inv = FakeGpuInventory(config.fake_gpus)
    served: Served = await nursery.start(partial(serve, config, inventory=inv, executor=executor))
    return served


@pytest.fixture
async def box(base_dir: Path) -> AsyncIterator[Box]:
    config = _config(base_dir)
    machine = FakeMachine()
    fake = FakeExecutor(machine)
    async with trio.open_nursery() as n:
        served = await _start(n, config, fake)
        async with AsyncClient(served.url) as c:
            yield Box(config, machine, fake, served, c, n)
        n.cancel_scope.cancel()


async def finished(c: AsyncClient, job_id: int) -> JobInfo:
    with trio.fail_after(20):
        while True:
            info = await c.wait(job_id, timeout=5)
            if info.state in ("succeeded", "failed", "cancelled", "timed_out", "lost"):
                return info


async def test_a_scripted_success(box: Box) -> None:
    box.executor.default = Script(after=0.0, result={"answer": 42})
    job = await box.client.submit(request())
    info = await finished(box.client, job.id)
    assert (info.state, info.exit_code, info.has_result) == ("succeeded", 0, True)
    assert [s.job_id for s in box.executor.launched] == [job.id]


async def test_deaths_by_signal_are_retried_then_it_succeeds(box: Box) -> None:
    oom = Script(after=0.0, signal=signal.SIGKILL)
    box.executor.plan(1, oom, oom, Script(after=0.0))
    job = await box.client.submit(request(retries=2))
    assert job.id == 1  # a fresh ledger
    info = await finished(box.client, job.id)
    assert (info.state, info.attempt) == ("succeeded", 3)
    assert [s.attempt for s in box.executor.launched] == [1, 2, 3]


async def test_a_death_by_signal_says_so(box: Box) -> None:
    box.executor.default = Script(after=0.0, signal=signal.SIGKILL)
    job = await box.client.submit(request())
    info = await finished(box.client, job.id)
    assert info.state == "failed"
    assert info.error is not None and "killed by signal 9 (out of memory?)" in info.error


async def test_the_jobs_error_is_retried_but_a_setup_failure_is_not(box: Box) -> None:
    box.executor.default = Script(after=0.0, error="ValueError: bad input")
    job = await box.client.submit(request(retries=2))
    info = await finished(box.client, job.id)
    assert (info.state, info.attempt, info.error) == ("failed", 3, "ValueError: bad input")
    # Exit code 3: the worker could not even load the function (no use trying again).
    box.executor.default = Script(
        after=0.0, exit_code=EXIT_SETUP, error="ModuleNotFoundError: No module named 'torch'"
    )
    job = await box.client.submit(request(retries=2))
    info = await finished(box.client, job.id)
    assert (info.state, info.attempt, info.exit_code) == ("failed", 1, EXIT_SETUP)


async def test_a_timeout_stops_a_job_that_ignores_sigterm(box: Box) -> None:
    box.executor.default = Script(after=None, on_term="ignore")
    job = await box.client.submit(request(timeout=1.0))
    info = await finished(box.client, job.id)
    assert info.state == "timed_out"
    assert box.executor.stopped == [(job.id, box.config.kill_grace)]
    assert box.machine.pids_of(job.id) == []


async def test_cancel_stops_the_job(box: Box) -> None:
    box.executor.default = Script(after=None)
    job = await box.client.submit(request())
    await box.executor.wait_launched(job.id)
    await box.client.cancel(job.id)
    info = await finished(box.client, job.id)
    assert info.state == "cancelled" and box.machine.pids_of(job.id) == []


async def test_a_failed_launch_fails_the_attempt_saying_why(box: Box) -> None:
    box.executor.default = Script(launch_error="the image store went away")
    job = await box.client.submit(request())
    info = await finished(box.client, job.id)
    assert info.state == "failed"
    assert info.error == "could not start the job: the image store went away"


async def test_a_restarted_daemon_adopts_the_running_job(base_dir: Path) -> None:
    config = _config(base_dir)
    machine = FakeMachine()
    first = FakeExecutor(machine, default=Script(after=None))
    async with trio.open_nursery() as n:
        served = await _start(n, config, first)
        async with AsyncClient(served.url) as c:
            job = await c.submit(request())
            await first.wait_launched(job.id)
            for _ in range(40):  # each wait returns after 0.5 s: the job is not final
                if (await c.wait(job.id, timeout=0.5)).state == "running":
                    break
            assert (await c.get_job(job.id)).state == "running"
        n.cancel_scope.cancel()  # the daemon goes; its job runs on
    assert machine.pids_of(job.id)
    second = FakeExecutor(machine)
    async with trio.open_nursery() as n:
        served = await _start(n, config, second)
        async with AsyncClient(served.url) as c:
            assert (await c.get_job(job.id)).state == "running"
            assert second.launched == []  # adopted, not started again
            second.finish(job.id, result="done")
            info = await finished(c, job.id)
            assert (info.state, info.has_result, info.attempt) == ("succeeded", True, 1)
        n.cancel_scope.cancel()


# -- the fake on its own, in trio's mock time ------------------------------------------------


def _spec(tmp_path: Path, job_id: int, attempt: int = 1) -> LaunchSpec:
    d = tmp_path / str(job_id)
    d.mkdir(exist_ok=True)
    return LaunchSpec(job_id=job_id, attempt=attempt, job_dir=d, log_path=d / "output.log", gpus=())


async def test_scripted_time_is_trios(tmp_path: Path, autojump_clock: object) -> None:
    """An hour-long job ends at once under a MockClock, at the hour, in order."""
    fake = FakeExecutor()
    fake.plan(1, Script(after=3600, exit_code=5))
    fake.plan(2, Script(after=60, signal=signal.SIGKILL))
    start = trio.current_time()
    h1 = await fake.launch(_spec(tmp_path, 1))
    h2 = await fake.launch(_spec(tmp_path, 2))
    assert (await fake.wait(h2)) == Outcome(exit_code=None, signal=signal.SIGKILL)
    assert trio.current_time() - start == pytest.approx(60)
    assert (await fake.wait(h1)).exit_code == 5
    assert trio.current_time() - start == pytest.approx(3600)
    status = read_status(tmp_path / "1")
    assert status is not None and not status.ok  # exit 5 without a result is a failure
    assert read_status(tmp_path / "2") is None  # killed: it wrote nothing


async def test_plans_go_one_per_attempt_and_the_last_repeats(tmp_path: Path) -> None:
    fake = FakeExecutor(default=Script(exit_code=9))
    fake.plan(7, Script(exit_code=1), Script(exit_code=0))
    codes = []
    for attempt in (1, 2, 3):
        h = await fake.launch(_spec(tmp_path, 7, attempt))
        codes.append((await fake.wait(h)).exit_code)
    h = await fake.launch(_spec(tmp_path, 8))
    assert codes == [1, 0, 0] and (await fake.wait(h)).exit_code == 9
    with pytest.raises(ExecutorRefusal):
        await fake.launch(dataclasses.replace(_spec(tmp_path, 9), serve=("hub", "token")))
