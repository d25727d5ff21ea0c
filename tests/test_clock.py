"""The daemon's timers on an injected clock (gpud.testing.FakeClock): keep_warm and retry
backoff run out when the test moves the clock, not after a sleep. In-process daemon."""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import cloudpickle
import httpx
import msgspec
import pytest
import trio

from gpud_client.models import SubmitRequest

from .conftest import TEST_SETTINGS, kill_instance_jobs

PY = "{}.{}.{}".format(*sys.version_info[:3])


def _pid() -> int:
    import os

    return os.getpid()


def _boom() -> None:
    raise ValueError("boom")


def _body(fn: object, **kw: object) -> bytes:
    mod = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(mod)
    try:
        req = SubmitRequest(
            name="t.fn", function=cloudpickle.dumps(fn), args=cloudpickle.dumps(((), {})), python=PY
        )
    finally:
        cloudpickle.unregister_pickle_by_value(mod)
    body = msgspec.to_builtins(req)
    body.update(kw)
    return msgspec.json.encode(body)


@pytest.fixture
async def clocked(base_dir: Path, nursery):  # type: ignore[no-untyped-def]
    from gpud.config import load_config
    from gpud.server import serve
    from gpud.testing import FakeClock, FakeGpuInventory

    env = dict(TEST_SETTINGS)
    env["GPUD_DATA_DIR"] = str(base_dir / "data")
    env["GPUD_SOCKET"] = str(base_dir / "gpud.sock")
    cfg = load_config(env=env)
    clock = FakeClock(start=time.time())
    s = await nursery.start(
        partial(
            serve,
            cfg,
            inventory=FakeGpuInventory(cfg.fake_gpus),
            kill_jobs_on_exit=True,
            clock=clock,
        )
    )
    transport = httpx.AsyncHTTPTransport(uds=str(s.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://gpud") as http:
        yield http, clock
    kill_instance_jobs(cfg.data_dir)


async def _run(http: httpx.AsyncClient, body: bytes) -> dict:  # type: ignore[type-arg]
    job = (await http.post("/v1/jobs", content=body)).json()
    done = (await http.get(f"/v1/jobs/{job['id']}/wait", params={"timeout": 30})).json()
    assert done["state"] == "succeeded", done
    done["value"] = cloudpickle.loads((await http.get(f"/v1/jobs/{job['id']}/result")).content)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_keep_warm_runs_out_when_the_clock_says_so(clocked) -> None:  # type: ignore[no-untyped-def]
    http, clock = clocked
    first = await _run(http, _body(_pid, keep_warm=1))
    pid = first["value"]["value"]
    # Longer than keep_warm in real time, but the daemon's clock stands still: still warm.
    await trio.sleep(1.2)
    second = await _run(http, _body(_pid, keep_warm=1))
    assert second["value"]["value"] == pid and second["start_kind"] == "warm"
    clock.advance(2.0)
    with trio.fail_after(10):  # the warm loop looks twice a second
        while _alive(pid):  # noqa: ASYNC110 - waiting for a process of the daemon's to end
            await trio.sleep(0.05)
    third = await _run(http, _body(_pid, keep_warm=1))
    assert third["value"]["value"] != pid and third["start_kind"] == "cold"
    clock.advance(2.0)  # and that one ends too (collected by the daemon, not left behind)
    with trio.fail_after(10):
        while _alive(third["value"]["value"]):  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_retry_backoff_waits_for_the_clock(clocked) -> None:  # type: ignore[no-untyped-def]
    http, clock = clocked
    job = (await http.post("/v1/jobs", content=_body(_boom, retries=1))).json()
    with trio.fail_after(20):

        def waiting(j: dict[str, Any]) -> bool:
            return j["attempt"] >= 1 and j["state"] == "queued"

        # Polling over HTTP: there is no event to wait on in another process.
        while not waiting(j := (await http.get(f"/v1/jobs/{job['id']}")).json()):  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert "backoff for another 0.2 s (attempt 2 of 2)" in j["reason"], j
    await trio.sleep(0.6)  # three times the backoff in real time: the clock stands still
    still = (await http.get(f"/v1/jobs/{job['id']}")).json()
    assert still["state"] == "queued" and "another 0.2 s" in still["reason"], still
    clock.advance(0.2)
    done = (await http.get(f"/v1/jobs/{job['id']}/wait", params={"timeout": 30})).json()
    assert done["state"] == "failed" and done["attempt"] == 2, done
