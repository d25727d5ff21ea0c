"""The hot path's client side (#12): ``.remote()`` in one request, ``.map`` results over one
stream (input or completion order, ``return_exceptions``), ``.starmap``, ``BatchHandle``
(reattach, progress, cancel), ``max_concurrency``, ``gpud cancel --batch``, and batches
kept private, against a real `gpud serve` (process executor)."""

from __future__ import annotations

import io
import shutil
import socket
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import httpx
import msgspec
import pytest

import gpud_client as gpud
from gpud.batches import limit_concurrency
from gpud.domain import Job, JobState
from gpud_client import BatchHandle, JobCancelled
from gpud_client.models import BatchSubmitRequest
from gpud_client.payload import load_result

from .conftest import (
    DaemonProc,
    _run_daemon,
    gpud_cli,
    kill_instance_jobs,
    make_base_dir,
    wait_for,
)
from .test_auth import (  # noqa: F401 - fixtures used by the privacy test
    PY,
    _nap,
    bearer,
    people,
    tcp,
    unix_users_or_names,
)

app = gpud.App("batch")


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    base = make_base_dir()
    try:
        yield from _run_daemon(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_app(daemon: DaemonProc) -> None:
    app.close()


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def add(a: int, b: int, *, c: int = 0) -> int:
    return a + b + c


@app.function()
def maybe_fail(x: int) -> int:
    if x % 3 == 1:
        raise ValueError(f"no {x}")
    return x


@app.function()
def talk(n: int) -> str:
    for i in range(n):
        print(f"said {i}", flush=True)
    return "done"


@app.function()
def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@app.function()
def big(n: int) -> bytes:
    return b"x" * n


@app.function(keep_warm=30)
def warm_square(x: int) -> int:
    return x * x


@app.function(keep_warm=30)
def warm_nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@app.function(keep_warm=30, retries=1)
def warm_flaky(x: int) -> int:
    if x % 4 == 1:
        raise ValueError(f"no {x}")
    return x


def _hand_offs(d: DaemonProc) -> float:
    from .test_metrics import curl_metrics, parse, value

    return value(parse(curl_metrics(d)), "gpud_warm_handoffs_total")


class _Counter:
    """Counts the HTTP requests a Client sends (its transport's request hook), but for
    the once-per-function check of the daemon's Python (GET /v1/health, with the tests'
    GPUD_JOB_PYTHON=daemon)."""

    def __init__(self, client: gpud.Client) -> None:
        self.requests: list[str] = []

        def seen(method: str, path: str) -> None:
            if path != "/v1/health":
                self.requests.append(f"{method} {path}")

        client._http.on_request.append(seen)


# -- .remote() -----------------------------------------------------------------------------


def test_remote_is_one_request_and_still_streams_the_log(
    daemon: DaemonProc, capsys: pytest.CaptureFixture[str]
) -> None:
    counter = _Counter(app.client)
    assert square.remote(7) == 49
    assert counter.requests == ["POST /v1/jobs/run"]
    assert talk.remote(3) == "done"
    assert counter.requests[1:] == ["POST /v1/jobs/run"]
    err = capsys.readouterr().err
    assert "said 0\nsaid 1\nsaid 2\n" in err


def test_remote_raises_the_jobs_exception_and_fetches_a_large_result(daemon: DaemonProc) -> None:
    with pytest.raises(ValueError, match="no 1"):
        maybe_fail.remote(1)
    counter = _Counter(app.client)
    # Over the inline limit (1 MiB): the end event names its size, the client fetches it.
    assert big.remote(3 << 20) == b"x" * (3 << 20)
    assert counter.requests == ["POST /v1/jobs/run", f"GET /v1/jobs/{_last_job(daemon)}/result"]


def test_a_repeated_run_follows_the_first_ones_job(daemon: DaemonProc) -> None:
    """``/v1/jobs/run`` no longer reads the key before its submit (#12): the submit itself
    finds a key used before and the retry follows the first try's job; the same key on
    another request is refused."""
    request = msgspec.structs.replace(
        square.submit_request((6,), {}), idempotency_key="run-retry-1"
    )
    first = list(app.client.run(request, logs=False))
    again = list(app.client.run(request, logs=False))
    assert first[0].kind == again[0].kind == "job"
    assert first[0].job is not None and again[0].job is not None
    assert again[0].job.id == first[0].job.id == _last_job(daemon)
    assert again[-1].kind == "end" and again[-1].job is not None
    assert again[-1].job.state == "succeeded"
    other = msgspec.structs.replace(square.submit_request((7,), {}), idempotency_key="run-retry-1")
    with pytest.raises(gpud.GpudError, match="idempotency"):
        list(app.client.run(other, logs=False))


def _last_job(d: DaemonProc) -> int:
    con = sqlite3.connect(f"file:{d.data_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT max(id) FROM jobs").fetchone()[0])
    finally:
        con.close()


def test_job_stream_resumes_at_a_log_offset(daemon: DaemonProc) -> None:
    handle = talk.spawn(2)
    events = list(app.client.job_stream(handle.id, offset=len("said 0\n")))
    assert [e.kind for e in events][0] == "job" and events[-1].kind == "end"
    assert b"".join(e.data for e in events if e.kind == "log") == b"said 1\n"
    end = events[-1]
    assert end.job is not None and end.result is not None
    assert load_result(end.result, end.job) == "done"


# -- .map, .starmap ------------------------------------------------------------------------


def test_map_results_stream_in_input_order_by_default(daemon: DaemonProc) -> None:
    counter = _Counter(app.client)
    batch = square.spawn_map(range(30))
    assert list(batch) == [i * i for i in range(30)]
    assert counter.requests == ["POST /v1/jobs/batch", f"GET /v1/batches/{batch.id}/results"]
    assert list(square.map(range(30))) == [i * i for i in range(30)]
    assert len(counter.requests) == 4


def test_map_in_completion_order(daemon: DaemonProc) -> None:
    # The first input sleeps longest: it ends last, so it comes last.
    out = list(nap.map([1.5, 0.1, 0.1], order_outputs=False))
    assert out[-1] == 1.5 and sorted(out) == [0.1, 0.1, 1.5]
    assert list(nap.map([1.0, 0.1])) == [1.0, 0.1]  # input order waits for the first


def test_map_return_exceptions_and_starmap(daemon: DaemonProc) -> None:
    out = list(maybe_fail.map(range(6), return_exceptions=True))
    assert [x if not isinstance(x, Exception) else str(x) for x in out] == [
        0,
        "no 1",
        2,
        3,
        "no 4",
        5,
    ]
    with pytest.raises(ValueError, match="no 1"):
        list(maybe_fail.map(range(3)))
    assert list(add.starmap([(1, 2), (3, 4)], kwargs={"c": 10})) == [13, 17]
    assert list(add.starmap([])) == []


def test_progress_bar_only_on_a_terminal(
    daemon: DaemonProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    assert list(square.map(range(12))) == [i * i for i in range(12)]
    assert pipe.getvalue() == ""
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(square.map(range(12))) == [i * i for i in range(12)]
    assert "12/12" in tty.getvalue() and "batch.square" in tty.getvalue()
    tty.seek(0), tty.truncate()
    assert list(square.map(range(3))) == [0, 1, 4]  # a few inputs: no bar
    assert tty.getvalue() == ""


# -- BatchHandle ----------------------------------------------------------------------------


def test_reattach_by_batch_id_and_progress(daemon: DaemonProc) -> None:
    batch = square.spawn_map(range(8))
    again = BatchHandle.from_id(batch.id, url=daemon.url)
    assert list(again) == [i * i for i in range(8)]
    info = again.status()
    assert info.size == 8 and info.done == 8 and info.counts.succeeded == 8
    assert info.name == "batch.square" and info.max_concurrency is None
    ids = again.job_ids()
    assert len(ids) == 8 and ids == sorted(ids)
    assert [h.get() for h in again.handles()] == [i * i for i in range(8)]
    with pytest.raises(gpud.ApiError) as e:
        BatchHandle.from_id(10**9, url=daemon.url)
    assert e.value.status == 404


def _overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_max_concurrency_is_never_exceeded(daemon: DaemonProc) -> None:
    batch = nap.spawn_map([0.3] * 8, max_concurrency=2)
    assert list(batch) == [0.3] * 8
    assert batch.status().max_concurrency == 2
    jobs = [h.status() for h in batch.handles()]
    spans = [(j.started_at, j.ended_at) for j in jobs]
    assert all(a is not None and b is not None for a, b in spans)
    # 4 CPU slots, so without the limit all 8 would overlap in pairs of 4.
    assert _overlap(spans) == 2  # type: ignore[arg-type]
    free = nap.spawn_map([0.5] * 4)
    list(free)
    assert (
        _overlap(
            [
                (j.started_at, j.ended_at)
                for j in (h.status() for h in free.handles())  # type: ignore[misc]
            ]
        )
        > 2
    )
    with pytest.raises(ValueError, match="max_concurrency"):
        nap.spawn_map([1], max_concurrency=0)


def test_cancel_the_rest_from_the_cli(daemon: DaemonProc) -> None:
    batch = nap.spawn_map([30.0] * 5, max_concurrency=1)
    wait_for(lambda: batch.progress().running == 1, timeout=20)
    # The jobs held back by the limit say so (the round never sees them).
    held = [s for s in (h.status() for h in batch.handles()) if s.state == "queued"]
    assert len(held) == 4
    assert {s.reason for s in held} == {f"batch {batch.id} at its max_concurrency of 1"}
    positions = [s.position for s in held]
    assert None not in positions and len(set(positions)) == 4
    out = gpud_cli("cancel", "--batch", str(batch.id))
    assert out.returncode == 0, out.stderr
    assert f"batch {batch.id}: 5 cancelled" in out.stderr
    counts = batch.progress()
    assert counts.cancelled == 5 and counts.running == counts.queued == 0
    results = list(batch.results(return_exceptions=True))
    assert all(isinstance(r, JobCancelled) for r in results) and len(results) == 5
    bad = gpud_cli("cancel", "--batch", "999999999")
    assert bad.returncode != 0 and "no batch" in bad.stderr
    none = gpud_cli("cancel")
    assert none.returncode != 0 and "--batch" in none.stderr


def test_a_reader_that_hangs_up_mid_stream_does_not_hurt_the_daemon(daemon: DaemonProc) -> None:
    batch = nap.spawn_map([0.2] * 6)
    path = str(daemon.socket)
    for request in (
        f"GET /v1/batches/{batch.id}/results HTTP/1.1\r\nHost: gpud\r\n\r\n",
        f"GET /v1/batches/{batch.id}/results?order=completion HTTP/1.1\r\nHost: gpud\r\n\r\n",
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(request.encode())
            assert s.recv(64).startswith(b"HTTP/1.1 200")
    # A .remote() whose caller goes away before the job ends: the job still ends well.
    req = nap.submit_request((0.5,), {})
    with (
        httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://gpud") as c,
        c.stream("POST", "/v1/jobs/run", content=msgspec.json.encode(req)) as r,
    ):
        first = next(r.iter_lines())
    job_id = msgspec.json.decode(first)["job"]["id"]
    assert gpud.JobHandle(job_id, app.client).get(timeout=30) == 0.5
    assert list(batch) == [0.2] * 6
    assert app.client.health().status == "ok"
    log = daemon.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log


# -- privacy ---------------------------------------------------------------------------------


def _nap_pickle() -> bytes:
    """test_auth's ``_nap``, pickled by value (the daemon's worker cannot import tests)."""
    mod = sys.modules["tests.test_auth"]
    cloudpickle.register_pickle_by_value(mod)
    try:
        return bytes(cloudpickle.dumps(_nap))
    finally:
        cloudpickle.unregister_pickle_by_value(mod)


def _batch_body() -> bytes:
    fn = _nap_pickle()
    req = BatchSubmitRequest(
        name="t.nap", function=fn, python=PY, inputs=[cloudpickle.dumps(((0.1,), {}))] * 2
    )
    return msgspec.json.encode(req)


async def test_another_users_batch_is_not_there(people: Any, tcp: httpx.AsyncClient) -> None:  # noqa: F811 - fixtures
    (_, a_tok), (_, b_tok), (_, c_tok) = people["alice"], people["bob"], people["carol"]
    r = await tcp.post("/v1/jobs/batch", content=_batch_body(), headers=bearer(a_tok))
    assert r.status_code == 201, r.text
    bid = r.json()["batch_id"]
    as_bob = bearer(b_tok)
    for method, path in [
        ("GET", f"/v1/batches/{bid}"),
        ("GET", f"/v1/batches/{bid}/results"),
        ("POST", f"/v1/batches/{bid}/cancel"),
    ]:
        resp = await tcp.request(method, path, headers=as_bob)
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"] == "not_found" and "no batch" in resp.json()["detail"]
    # alice reads hers; an admin may too.
    lines = (await tcp.get(f"/v1/batches/{bid}/results", headers=bearer(a_tok))).text
    assert [msgspec.json.decode(x)["index"] for x in lines.splitlines()] == [0, 1]
    assert (await tcp.get(f"/v1/batches/{bid}", headers=bearer(c_tok))).status_code == 200
    assert (await tcp.get("/v1/batches/abc", headers=bearer(a_tok))).status_code == 404


# -- the rule itself -------------------------------------------------------------------------


def _job(i: int, batch: int | None, state: JobState = JobState.QUEUED) -> Job:
    return Job(id=i, function="f", state=state, submitted_at=0.0, owner="u", batch_id=batch)


def test_limit_concurrency_keeps_the_oldest_within_the_room_left() -> None:
    pending = [_job(i, 1) for i in (5, 3, 4, 6)] + [_job(7, 2), _job(8, None)]
    running = [_job(1, 1, JobState.RUNNING)]
    kept = limit_concurrency(pending, running, {1: 3, 2: None})
    assert [j.id for j in kept] == [3, 4, 7, 8]  # batch 1: 3 - 1 running = 2 oldest
    assert [j.id for j in limit_concurrency(pending, running * 3, {1: 3})] == [7, 8]
    assert limit_concurrency(pending, running, {}) == pending


def test_a_stream_file_path_is_not_followed(tmp_path: Path) -> None:
    from gpud.api_batch import _read_result

    target = tmp_path / "secret"
    target.write_bytes(b"private")
    link = tmp_path / "result.pkl"
    link.symlink_to(target)
    assert _read_result(link) == (None, 0)
    target.write_bytes(b"")
    assert _read_result(target) == (None, 0)


def test_remote_and_map_ride_out_a_daemon_restart(process_daemon: DaemonProc) -> None:
    import threading

    f = nap.with_options(url=process_daemon.url)
    batch = f.spawn_map([2.0, 2.0])
    got: list[Any] = []
    call = threading.Thread(target=lambda: got.append(f.remote(2.0)))
    call.start()
    wait_for(lambda: batch.progress().running == 2, timeout=20)
    process_daemon.stop()  # the jobs keep running; the next daemon adopts them
    process_daemon.start()
    assert list(batch) == [2.0, 2.0]
    call.join(60)
    assert got == [2.0]


def test_a_stream_with_a_timeout_ends_early_and_is_resumed(daemon: DaemonProc) -> None:
    handle = nap.spawn(1.5)
    early = list(
        app.client._ndjson(
            gpud.client._Call(
                "GET",
                f"/jobs/{handle.id}/stream",
                gpud.models.JobEvent,
                {"timeout": "0.2"},
                read_timeout=None,
            )
        )
    )
    assert [e.kind for e in early] == ["job"]  # no end: the job is still running
    batch = nap.spawn_map([1.5, 0.1])
    lines = _results_now(app.client, batch.id)
    assert len(lines) <= 1  # the short one at most
    assert list(batch) == [1.5, 0.1] and handle.get(timeout=30) == 1.5


def test_jobs_held_back_by_max_concurrency_have_their_batchs_reason() -> None:
    from gpud.batches import held_back, limit_concurrency
    from gpud.domain import Job, JobState

    def job(i: int, batch: int | None, state: JobState = JobState.QUEUED) -> Job:
        return Job(id=i, function="m:f", state=state, submitted_at=float(i), batch_id=batch)

    pending = [job(i, 7) for i in range(2, 7)] + [job(9, None), job(10, 8)]
    running = [job(1, 7, JobState.RUNNING)]
    limits = {7: 2, 8: None}
    admitted = limit_concurrency(pending, running, limits)
    assert [j.id for j in admitted] == [2, 9, 10]
    held = held_back(pending, admitted, limits)
    assert {i: place for i, (_, place) in held.items()} == {3: 1, 4: 2, 5: 3, 6: 4}
    assert len({id(why) for why, _ in held.values()}) == 1  # one reason per batch
    assert held[3][0].text(3) == "batch 7 at its max_concurrency of 2"


def test_a_batch_of_several_chunks_is_whole_and_in_input_order(daemon: DaemonProc) -> None:
    """The daemon builds a big batch's jobs in chunks, letting the event loop go between
    them (gpud.api_submit, #12): every input still makes one job, in input order."""
    from gpud.api_submit import _CHUNK
    from gpud_client.client import Client

    fn = _nap_pickle()
    n = 2 * _CHUNK + 3
    inputs = [cloudpickle.dumps(((60.0 + i,), {})) for i in range(n)]
    # max_concurrency 1: one nap runs, the rest stay queued until cancelled.
    req = BatchSubmitRequest(
        name="t.chunks", function=fn, python=PY, inputs=inputs, max_concurrency=1
    )
    with Client(daemon.url) as c:
        made = c.submit_batch(req)
        try:
            assert len(made.job_ids) == n
            assert made.job_ids == list(range(made.job_ids[0], made.job_ids[0] + n))
            info = c.batch(made.batch_id)
            assert info.size == n
            first, last = c.get_job(made.job_ids[0]), c.get_job(made.job_ids[-1])
            assert first.name == last.name == "t.chunks"
        finally:
            c.cancel_batch(made.batch_id)


# -- warm hand-offs (#12): a worker's next call without a scheduling round --------------------


def test_a_warm_map_hands_each_worker_its_next_call(daemon: DaemonProc) -> None:
    """Each warm worker is handed the next input as its call ends: the results are all
    there, in order, and the daemon counts the hand-offs; max_concurrency and retries
    hold as they do with rounds."""
    before = _hand_offs(daemon)
    assert list(warm_square.map(range(60))) == [i * i for i in range(60)]
    assert _hand_offs(daemon) > before
    # A batch's limit: a hand-off keeps the batch's count (a call of it ends, the next
    # starts), never more at once than the limit.
    batch = warm_nap.spawn_map([0.2] * 8, max_concurrency=2)
    assert list(batch) == [0.2] * 8
    spans = [(j.started_at, j.ended_at) for j in (h.status() for h in batch.handles())]
    assert _overlap(spans) == 2  # type: ignore[arg-type]
    # Retries: a call that raised is queued again (a round starts it after its backoff),
    # and runs twice; the others once.
    flaky = warm_flaky.spawn_map(range(12))
    out = list(flaky.results(return_exceptions=True))
    assert [str(x) if isinstance(x, Exception) else x for x in out] == [
        f"no {i}" if i % 4 == 1 else i for i in range(12)
    ]
    attempts = [h.status().attempt for h in flaky.handles()]
    assert attempts == [2 if i % 4 == 1 else 1 for i in range(12)]


def test_cancelling_a_warm_batch_during_hand_offs_leaves_nothing_running(
    daemon: DaemonProc,
) -> None:
    batch = warm_nap.spawn_map([0.05] * 400)
    wait_for(lambda: batch.progress().succeeded >= 10, timeout=60)
    batch.cancel()
    wait_for(lambda: (c := batch.progress()).running == c.starting == c.queued == 0, timeout=30)
    counts = batch.progress()
    assert counts.succeeded + counts.cancelled == 400 and counts.cancelled > 0, counts
    # The workers are free for the next call.
    assert warm_nap.remote(0.0) == 0.0


def _results_now(c: Any, batch_id: int) -> list[Any]:
    """The lines a completion-order results stream sends within 0.3 s."""
    return list(
        c._ndjson(
            gpud.client._Call(
                "GET",
                f"/batches/{batch_id}/results",
                gpud.models.BatchResult,
                {"timeout": "0.3", "order": "completion"},
                read_timeout=None,
            )
        )
    )


def test_requests_racing_a_big_batchs_filing_see_every_job(base_dir: Path) -> None:
    """A big batch enters the daemon's memory a chunk at a time after its COMMIT (#12).
    Held half-way (GPUD_TEST_PAUSE_AT), requests about its last job, not filed yet, see
    it as committed: a get says queued, a results stream sends nothing for it until it
    is over, and its cancel sticks (no stale queued copy is filed after it). Then the
    batch's cancel ends every job and nothing stays in the queue."""
    from gpud.daemon.service import FILE_CHUNK
    from gpud_client.client import Client

    from .test_durability import _final_events

    release = base_dir / "release"
    d = DaemonProc(base_dir, env={"GPUD_TEST_PAUSE_AT": f"mid_filing={release}"})
    d.start()
    fn = _nap_pickle()
    n = 2 * FILE_CHUNK + 3
    req = BatchSubmitRequest(
        name="t.filing",
        function=fn,
        python=PY,
        inputs=[cloudpickle.dumps(((60.0,), {}))] * n,
        max_concurrency=1,
    )
    out: dict[str, Any] = {}

    def submit() -> None:
        with Client(d.url) as c:
            try:
                out["made"] = c.submit_batch(req)
            except Exception as e:  # noqa: BLE001 - reported below
                out["error"] = e

    t = threading.Thread(target=submit)
    t.start()
    try:
        with Client(d.url) as c:

            def committed() -> bool:
                # The listing reads the ledger: the batch is there once committed.
                page = c.list_jobs(limit=1).jobs
                return bool(page) and page[0].name == "t.filing"

            wait_for(committed, 60)
            newest = c.list_jobs(limit=1).jobs
            last, batch_id = newest[0].id, newest[0].batch_id
            assert batch_id is not None
            assert c.get_job(last).state == "queued"
            assert all(r.index != n - 1 for r in _results_now(c, batch_id))
            assert c.cancel(last).state == "cancelled"
            sent = _results_now(c, batch_id)
            assert [r.index for r in sent] == [n - 1], [(r.index, r.job.state) for r in sent]
            assert sent[0].job.state == "cancelled"
            assert t.is_alive(), "the submit answered before its jobs were all filed"
            release.touch()
            t.join(60)
            assert "error" not in out, out
            made = out["made"]
            assert made.batch_id == batch_id and made.job_ids[-1] == last
            assert c.get_job(last).state == "cancelled"
            info = c.cancel_batch(batch_id)
            assert info.counts.cancelled == n, info
            assert c.queue().total == 0
        assert _final_events(d, last) == ["cancelled"]
    finally:
        release.touch()
        t.join(60)
        d.stop()
        kill_instance_jobs(d.data_dir)
