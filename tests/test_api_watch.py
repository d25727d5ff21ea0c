"""The endpoints a live view polls (events, queue, GPU history, outcome), against a daemon
in the test's nursery, through the async client; and the history ring buffer itself."""

from __future__ import annotations

import sys
from typing import Any

import cloudpickle
import pytest
import trio

from gpud.domain import Gpu, GpuProcess
from gpud.metrics import HistoryBuffer
from gpud_client import ApiError, AsyncClient
from gpud_client.models import SubmitRequest

PY = "{}.{}.{}".format(*sys.version_info[:3])


def _sleep(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "slept"


def _raise(message: str) -> None:
    raise ValueError(message)


def _request(fn: Any, *args: Any, gpu: str | None = None, priority: int = 0) -> SubmitRequest:
    mod = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(mod)
    try:
        function = cloudpickle.dumps(fn)
    finally:
        cloudpickle.unregister_pickle_by_value(mod)
    return SubmitRequest(
        name=f"watch.{fn.__name__}",
        function=function,
        args=cloudpickle.dumps((args, {})),
        python=PY,
        gpu=gpu,
        priority=priority,
    )


@pytest.fixture
async def client(served):  # type: ignore[no-untyped-def]
    async with AsyncClient(served.url) as c:
        yield c


async def _until(predicate: Any, within: float = 20.0) -> None:
    with trio.fail_after(within):
        while True:
            if await predicate():
                return
            await trio.sleep(0.05)


async def test_events_are_a_cursor_over_the_ledger(client: AsyncClient) -> None:
    start = await client.events()
    assert start.events == [] and start.cursor == 0 and start.latest == 0
    job = await client.submit(_request(_sleep, 0.0))
    first = await client.events(0)
    assert [(e.job_id, e.from_state, e.to_state) for e in first.events][:1] == [
        (job.id, None, "queued")
    ]
    assert first.cursor == first.events[-1].id and first.latest >= first.cursor
    done = await client.wait(job.id)
    assert done.state == "succeeded"
    rest = await client.events(first.cursor)
    assert [e.to_state for e in rest.events][-1] == "succeeded"
    assert all(e.id > first.cursor for e in rest.events)
    # Nothing new: the same cursor comes back, and an empty page.
    idle = await client.events(rest.cursor)
    assert idle.events == [] and idle.cursor == rest.cursor == idle.latest
    other = await client.submit(_request(_sleep, 0.0))
    mine = await client.events(0, job_id=other.id, limit=1)
    assert [e.job_id for e in mine.events] == [other.id]
    await client.wait(other.id)
    with pytest.raises(ApiError) as e:
        await client.events(0, limit=0)
    assert e.value.code == "invalid_parameter"


async def test_queue_is_in_scheduling_order_and_paged(client: AsyncClient) -> None:
    blocker = await client.submit(_request(_sleep, 30.0, gpu="h100:2"))
    low = await client.submit(_request(_sleep, 0.0, gpu="h100", priority=-5))
    high = await client.submit(_request(_sleep, 0.0, gpu="h100", priority=5))
    mid = await client.submit(_request(_sleep, 0.0, gpu="h100"))

    async def ranked() -> bool:
        page = await client.queue()
        return len(page.jobs) == 3 and all(j.position for j in page.jobs)

    await _until(ranked)
    page = await client.queue()
    assert page.total == 3 and page.offset == 0
    assert [j.id for j in page.jobs] == [high.id, mid.id, low.id]
    assert [j.position for j in page.jobs] == [1, 2, 3]
    assert all(j.reason and f"job {blocker.id}" in j.reason for j in page.jobs)
    second = await client.queue(offset=1, limit=1)
    assert [j.id for j in second.jobs] == [mid.id] and second.total == 3
    await client.cancel(blocker.id)
    for j in (low, high, mid):  # none left starting when the daemon stops
        assert (await client.wait(j.id)).state == "succeeded"


async def test_gpu_history_keeps_recent_readings(served, client: AsyncClient) -> None:  # type: ignore[no-untyped-def]
    async def three_readings() -> bool:
        h = await client.gpu_history()
        return len(h.gpus) == 3 and all(len(g.at) >= 3 for g in h.gpus)

    await _until(three_readings)
    hist = await client.gpu_history()
    assert hist.interval == pytest.approx(0.2) and hist.window > 0
    assert [g.index for g in hist.gpus] == [0, 1, 2]
    for g in hist.gpus:
        assert len(g.at) == len(g.utilization) == len(g.memory_used)
        assert g.at == sorted(g.at) and g.memory_total > 0
    last = max(g.at[-1] for g in hist.gpus)
    served.daemon.inventory.set_processes(1, [GpuProcess(pid=999_999, used_memory=5 << 30)])

    async def new_reading() -> bool:
        h = await client.gpu_history(since=last)
        return any(h.gpus[1].memory_used)

    await _until(new_reading)
    newer = await client.gpu_history(since=last)
    assert all(t > last for g in newer.gpus for t in g.at)
    assert newer.gpus[1].memory_used[-1] == 5 << 30


async def test_outcome_has_the_remote_traceback(client: AsyncClient) -> None:
    job = await client.submit(_request(_raise, "boom"))
    with pytest.raises(ApiError) as early:
        await client.outcome(job.id)
    assert early.value.code in ("not_finished", "no_outcome")
    await client.wait(job.id)
    out = await client.outcome(job.id)
    assert out.ok is False and out.state == "failed"
    assert out.type is not None and out.type.endswith("ValueError") and out.message == "boom"
    assert out.traceback is not None and "_raise" in out.traceback
    ok = await client.submit(_request(_sleep, 0.0))
    await client.wait(ok.id)
    assert (await client.outcome(ok.id)).ok is True


async def test_outcome_of_a_job_that_never_ran(client: AsyncClient) -> None:
    blocker = await client.submit(_request(_sleep, 30.0, gpu="h100:2"))
    queued = await client.submit(_request(_sleep, 0.0, gpu="h100"))
    await client.cancel(queued.id)
    with pytest.raises(ApiError) as e:
        await client.outcome(queued.id)
    assert e.value.status == 404 and e.value.code == "no_outcome"
    await client.cancel(blocker.id)


async def test_list_jobs_by_owner(client: AsyncClient) -> None:
    job = await client.submit(_request(_sleep, 0.0))
    await client.wait(job.id)
    assert [j.id for j in (await client.list_jobs(owner=job.owner)).jobs] == [job.id]
    assert (await client.list_jobs(owner="no-such-user")).jobs == []


# -- the ring buffer -------------------------------------------------------------------


def _gpu(index: int, util: int, used: int = 0) -> Gpu:
    return Gpu(
        index=index,
        uuid=f"GPU-{index}",
        name="X",
        type="h100",
        memory_total=100,
        memory_used=used,
        utilization=util,
    )


def test_history_keeps_the_window_and_returns_what_is_new() -> None:
    h = HistoryBuffer(window=10.0, interval=1.0)
    for t in range(30):
        h.record([_gpu(1, t), _gpu(0, t, used=t)], now=float(t))
    series = h.since(None, now=29.0)
    assert [s.index for s in series] == [0, 1]
    # The last 10 s, newest last; older readings fell off the ring.
    assert [s.at for s in series[0].samples] == [float(t) for t in range(20, 30)]
    assert series[0].samples[-1].memory_used == 29
    assert [s.at for s in h.since(27.0, now=29.0)[1].samples] == [28.0, 29.0]
    assert h.since(29.0, now=29.0)[0].samples == []
    # Readings older than the window are not returned even when polls stopped.
    assert h.since(None, now=100.0)[0].samples == []


def test_history_forgets_a_gpu_that_is_gone() -> None:
    h = HistoryBuffer(window=10.0, interval=1.0)
    h.record([_gpu(0, 1), _gpu(1, 1)], now=0.0)
    h.record([_gpu(0, 2)], now=1.0)
    assert [s.uuid for s in h.since(None, now=1.0)] == ["GPU-0"]
    with pytest.raises(ValueError):
        HistoryBuffer(window=0)
    # gpu_poll_interval = 0 (poll as fast as NVML answers) is a valid setting.
    fast = HistoryBuffer(window=1.0, interval=0.0)
    for t in range(100):
        fast.record([_gpu(0, t)], now=t / 100)
    assert 10 <= len(fast.since(None, now=0.99)[0].samples) <= 100
