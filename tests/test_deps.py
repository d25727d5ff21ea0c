"""Dependencies and webhooks end to end (#14): `gpud serve` in a subprocess, real jobs,
a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import gpud_client as gpud
from gpud_client import ApiError, Client

from .conftest import (
    EXECUTORS,
    DaemonProc,
    _run_daemon,
    executor_env,
    gpud_cli,
    make_base_dir,
    wait_for,
)

app = gpud.App("deps")
WEBHOOK_ENV = {"GPUD_WEBHOOKS": "127.0.0.1", "GPUD_WEBHOOK_BACKOFF": "0.2"}


@pytest.fixture(scope="module", params=EXECUTORS)
def daemon(request: pytest.FixtureRequest) -> Iterator[DaemonProc]:
    env = {**executor_env(request.param), **WEBHOOK_ENV}
    base = make_base_dir()
    try:
        yield from _run_daemon(base, env)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_connection() -> None:
    app.close()


@app.function()
def prepare(gate: str, fail: bool = False) -> dict:
    import os
    import time

    while not os.path.exists(gate):  # the test opens the gate: no race with its checks
        time.sleep(0.02)
    if fail:
        raise RuntimeError("no data")
    return {"rows": 3, "t": time.time()}


@app.function()
def train(data: dict, epochs: int) -> dict:
    import time

    return {"model": data["rows"] * epochs, "after": data["t"], "t": time.time()}


@app.function()
def evaluate(model: dict) -> str:
    return f"score {model['model']}"


@app.function()
def ok(x: int) -> int:
    return x


@app.function()
def boom() -> None:
    raise ValueError("boom")


def test_pipeline_runs_in_order_with_no_client(daemon: DaemonProc, shared_dir: Path) -> None:
    gate = shared_dir / "go"
    p = prepare.spawn(str(gate))
    t = train.spawn(gpud.result_of(p), epochs=2)  # after=[p] is implied by result_of
    e = evaluate.spawn(gpud.result_of(t), after=[t])
    assert t.client.get_job(t.id).after == [p.id]
    out = gpud_cli("ps", env=daemon.client_env())
    assert f"waiting for job {p.id}" in out.stdout and f"waiting for job {t.id}" in out.stdout
    app.close()  # nobody is connected while the pipeline runs
    gate.touch()
    with Client(daemon.url) as c:
        done = c.wait(e.id, timeout=120)
        assert done.state == "succeeded", done.error
        jobs = {j: c.get_job(j) for j in (p.id, t.id, e.id)}
        assert jobs[p.id].ended_at <= jobs[t.id].started_at  # type: ignore[operator]
        assert jobs[t.id].ended_at <= jobs[e.id].started_at  # type: ignore[operator]
        assert gpud.JobHandle(e.id, c).get(timeout=30) == "score 6"
        trained = gpud.JobHandle(t.id, c).get(timeout=30)
        assert trained["after"] == gpud.JobHandle(p.id, c).get(timeout=30)["t"]


def test_a_failed_prepare_cancels_the_rest(daemon: DaemonProc, shared_dir: Path) -> None:
    gate = shared_dir / "go"
    p = prepare.spawn(str(gate), fail=True)
    t = train.spawn(gpud.result_of(p), epochs=2)
    e = evaluate.spawn(gpud.result_of(t))
    gate.touch()
    with Client(daemon.url) as c:
        ended = c.wait(e.id, timeout=120)
        assert c.get_job(p.id).state == "failed"
        assert c.get_job(t.id).state == "cancelled"
        assert c.get_job(t.id).error == f"dependency job {p.id} failed"
    assert ended.state == "cancelled"
    assert ended.error == f"dependency job {t.id} was cancelled (dependency job {p.id} failed)"
    out = gpud_cli("ps", "--all", env=daemon.client_env())
    assert f"dependency job {p.id} failed" in out.stdout


def test_after_any_goes_on_after_a_failure(daemon: DaemonProc) -> None:
    b = boom.spawn()
    after = ok.with_options(after=[b.id], after_any=True).spawn(5)
    assert after.get(timeout=120) == 5
    # .remote() takes after= too, and waits through the dependency
    assert ok.remote(7, after=[after]) == 7


def test_unknown_and_future_ids_are_refused(daemon: DaemonProc, tmp_path: Path) -> None:
    with Client(daemon.url) as c:
        newest = c.list_jobs(limit=1).jobs
        future = (newest[0].id if newest else 0) + 1000
    for bad in (future, 10**12):
        with pytest.raises(ApiError) as err:
            ok.spawn(1, after=[bad])
        assert err.value.status == 400 and f"no job of yours with id {bad}" in str(err.value)
    script = tmp_path / "pipe.py"
    script.write_text("def ok(x: int) -> int:\n    return x\n")
    out = gpud_cli(
        "run", f"{script}::ok", "--x", "1", "--after", str(future), env=daemon.client_env()
    )
    assert out.returncode != 0 and "no job of yours" in out.stderr
    first = ok.spawn(1)
    out = gpud_cli(
        "run",
        f"{script}::ok",
        "--x",
        "4",
        "--after",
        str(first.id),
        "--notify",
        "bell",
        env=daemon.client_env(),
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "4", out.stderr
    assert "\agpud job" in out.stderr and "succeeded" in out.stderr


# -- webhooks ------------------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it."""

    def __init__(self, port: int = 0) -> None:
        self.bodies: list[dict] = []
        seen = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                n = int(self.headers["content-length"])
                seen.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def of(self, job_id: int) -> list[dict]:
        return [b for b in self.bodies if b["job_id"] == job_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_one_post_per_chosen_final_state(
    daemon: DaemonProc, receiver: Receiver, shared_dir: Path
) -> None:
    chosen = {"notify": receiver.url, "notify_on": ("failed", "succeeded")}
    skipped = prepare.with_options(**chosen).spawn(str(shared_dir / "never"))
    skipped.cancel()  # cancelled: not a chosen state
    good = ok.with_options(**chosen).spawn(1)
    bad = boom.with_options(**chosen).spawn()
    last = ok.with_options(notify=receiver.url).spawn(2)  # all final states by default
    wait_for(
        lambda: receiver.of(good.id) and receiver.of(bad.id) and receiver.of(last.id), timeout=120
    )
    assert [b["state"] for b in receiver.of(good.id)] == ["succeeded"]
    assert [b["state"] for b in receiver.of(bad.id)] == ["failed"]
    assert receiver.of(skipped.id) == []
    b = receiver.of(bad.id)[0]
    assert b["owner"] and b["name"].endswith("boom") and "boom" in b["error"]
    assert b["ended_at"] >= b["started_at"] >= b["submitted_at"]
    assert "args" not in b and "result" not in b


def test_a_receiver_down_at_first_gets_it_later(daemon: DaemonProc) -> None:
    with socket.socket() as s:  # a free port, closed: the first POSTs are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = ok.with_options(notify=f"http://127.0.0.1:{port}/hook").spawn(3)
    assert job.get(timeout=120) == 3
    wait_for(
        lambda: f"webhook for job {job.id} not delivered" in daemon.log.read_text(), timeout=30
    )
    late = Receiver(port)
    try:
        wait_for(lambda: late.of(job.id), timeout=30)
        assert [b["state"] for b in late.of(job.id)] == ["succeeded"]
    finally:
        late.close()


def test_the_admin_restricts_webhooks(daemon: DaemonProc, process_daemon: DaemonProc) -> None:
    with pytest.raises(ApiError) as err:
        ok.with_options(notify="http://localhost:9/x", url=daemon.url).spawn(1)
    assert err.value.status == 400 and "only to 127.0.0.1, not to localhost" in str(err.value)
    # the default: off
    with pytest.raises(ApiError) as err:
        ok.with_options(notify="http://127.0.0.1:9/x", url=process_daemon.url).spawn(1)
    assert err.value.status == 400 and "webhooks are off" in str(err.value)


# -- a restart --------------------------------------------------------------------------


@pytest.fixture
def restartable(base_dir: Path) -> Iterator[DaemonProc]:
    yield from _run_daemon(base_dir, dict(WEBHOOK_ENV))


def test_a_restart_keeps_the_dependencies(restartable: DaemonProc, shared_dir: Path) -> None:
    d = restartable
    gate = shared_dir / "go"
    p = prepare.spawn(str(gate))
    t = train.spawn(gpud.result_of(p), epochs=5)
    doomed = boom.spawn()
    never = ok.spawn(0, after=[doomed])
    with Client(d.url) as c:
        c.wait(doomed.id, timeout=120)
        assert c.wait(never.id, timeout=60).state == "cancelled"
    app.close()
    d.stop()
    d.start()
    with Client(d.url) as c:
        info = c.get_job(t.id)
        assert info.state == "queued" and info.reason == f"waiting for job {p.id}"
        assert info.after == [p.id]
        gate.touch()
        assert c.wait(t.id, timeout=120).state == "succeeded"
        assert gpud.JobHandle(t.id, c).get(timeout=30)["model"] == 15
