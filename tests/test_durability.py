"""Issue #10: a job reaches exactly one final state and runs once, whenever the daemon
dies (kill -9 of a real `gpud serve`, at each step of a job's life, the narrow windows
hit with the test-only GPUD_TEST_CRASH_AT hook), and a submit retried after its answer
was lost makes one job, not two."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import gpud_client as gpud
from gpud.domain import FINAL, JobState
from gpud_client import Client
from gpud_client.models import SubmitRequest

from .conftest import EXECUTORS, DaemonProc, executor_env, kill_instance_jobs, wait_for

app = gpud.App("durability")


@app.function(retries=1)
def counted(path: str, seconds: float) -> str:
    """Append a line per run (a second run shows), then take ``seconds``."""
    import time

    with open(path, "a") as fh:
        fh.write("run\n")
    time.sleep(seconds)
    return "done"


@app.function(retries=1, keep_warm=30)
def counted_warm(path: str, seconds: float) -> str:
    import time

    with open(path, "a") as fh:
        fh.write("run\n")
    time.sleep(seconds)
    return "done"


@pytest.fixture
def crashable(request: pytest.FixtureRequest, base_dir: Path) -> Iterator[DaemonProc]:
    """A `gpud serve` of the test's own that it kills and restarts (not started yet)."""
    d = DaemonProc(base_dir, env=executor_env(getattr(request, "param", "process")))
    try:
        yield d
    finally:
        d.stop()
        kill_instance_jobs(d.data_dir)
        if d.executor == "podman":
            from .conftest import containers_of

            left = containers_of(d)
            if left:
                subprocess.run(["podman", "rm", "-f", *left], capture_output=True)


def _died(d: DaemonProc) -> None:
    """The daemon killed itself at its crash point (or the test killed it): reap it."""
    assert d.proc is not None
    d.proc.wait(timeout=60)
    assert d.proc.returncode == -signal.SIGKILL, d.log.read_text()[-3000:]
    d.proc = None


def _final_events(d: DaemonProc, job_id: int) -> list[str]:
    led = d.ledger()
    try:
        assert led.integrity_check() == "ok"
        return [e.to_state.value for e in led.events(job_id) if e.to_state in FINAL]
    finally:
        led.close()


# Where the daemon dies: the crash points of gpud/crashpoint.py, and "running" (the
# test kills it while the job runs).
POINTS = ["before_launch", "after_mark_launched", "after_launch", "running", "before_finish"]


# A warm job's launch is its RUNNING record (no separate launch windows).
CASES = [(p, False) for p in POINTS] + [
    ("warm_worker_ready", True),
    ("running", True),
    ("before_finish", True),
]


@pytest.mark.parametrize("crashable", EXECUTORS, indirect=True)
@pytest.mark.parametrize(
    ("point", "warm"), CASES, ids=[f"{p}-{'warm' if w else 'cold'}" for p, w in CASES]
)
def test_kill_9_at_each_step_runs_the_job_once(
    crashable: DaemonProc, shared_dir: Path, point: str, warm: bool
) -> None:
    d = crashable
    if point != "running":
        d.env["GPUD_TEST_CRASH_AT"] = point
    d.start()
    count = shared_dir / "runs"
    fn = counted_warm if warm else counted
    # Short enough to end while the daemon is down: the case that was marked lost.
    seconds = 3.0 if point == "running" else 0.3
    handle = fn.with_options(url=d.url).spawn(str(count), seconds)
    if point == "running":
        wait_for(lambda: count.exists(), timeout=20)
        d.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    _died(d)
    if point in ("after_launch", "before_finish", "running"):
        # The job goes on without its daemon and writes its outcome meanwhile.
        wait_for(
            lambda: (d.data_dir / "jobs" / str(handle.id) / "status.json").exists(), timeout=60
        )
    d.env.pop("GPUD_TEST_CRASH_AT", None)
    d.start()
    assert handle.get(timeout=60) == "done"
    info = handle.status()
    assert info.state == "succeeded" and info.attempt == 1, info
    assert count.read_text() == "run\n", "the job ran more than once"
    assert _final_events(d, handle.id) == ["succeeded"]
    # ... and recovery took the path meant for that point.
    said = {
        "before_launch": "had not been launched",
        "warm_worker_ready": "had not been launched",
        "after_mark_launched": "was launched but never began",
        "after_launch": "finished while the daemon was down",
        "before_finish": "finished while the daemon was down",
    }
    if point in said:
        assert said[point] in d.log.read_text()


def test_an_earlier_attempts_outcome_is_never_taken_for_this_ones(
    crashable: DaemonProc, shared_dir: Path
) -> None:
    """The daemon died with attempt 2 launched but not started, attempt 1's status.json
    and result (from some older layout) still there: attempt 2 runs, and its own value
    is returned, not attempt 1's."""

    crashable.start()
    _rewound_attempt_runs(crashable, shared_dir)


def _rewound_attempt_runs(d: DaemonProc, shared_dir: Path) -> None:
    from gpud.ledger import Step

    count = shared_dir / "runs"
    handle = counted.with_options(url=d.url, retries=1).spawn(str(count), 0.0)
    assert handle.get(timeout=60) == "done"
    d.stop()
    jobdir = d.data_dir / "jobs" / str(handle.id)
    status = json.loads((jobdir / "status.json").read_text())
    assert status["ok"] is True and status["attempt"] == 1
    led = d.ledger()
    try:
        # Rewind the job by hand to "attempt 2 launched": a fresh STARTING after a retry.
        led.conn.execute("UPDATE jobs SET state = 'failed' WHERE id = ?", (handle.id,))
        led.advance(handle.id, [Step(JobState.QUEUED, "retry")], time.time())
        led.advance(handle.id, [Step(JobState.STARTING)], time.time())
        led.mark_launched(handle.id, 2, time.time())
    finally:
        led.close()
    (jobdir / "started").unlink()  # attempt 2's worker never began
    count.write_text("")
    d.start()
    wait_for(lambda: handle.status().state == "succeeded", timeout=60)
    assert handle.status().attempt == 2
    assert count.read_text() == "run\n"  # attempt 2 really ran
    assert json.loads((jobdir / "status.json").read_text())["attempt"] == 2


# -- idempotent submits -----------------------------------------------------------------


def _request(count: Path, key: str | None = None) -> SubmitRequest:
    req = counted.submit_request((str(count), 0.0), {})
    import msgspec

    return msgspec.structs.replace(req, idempotency_key=key)


def _job_count(d: DaemonProc) -> int:
    led = d.ledger()
    try:
        return int(led.conn.execute("SELECT count(*) FROM jobs").fetchone()[0])
    finally:
        led.close()


def test_submit_retried_after_the_daemon_died_past_its_commit_makes_one_job(
    crashable: DaemonProc, shared_dir: Path
) -> None:
    d = crashable
    d.env["GPUD_TEST_CRASH_AT"] = "after_submit"
    d.start()
    count = shared_dir / "runs"
    out: dict[str, object] = {}

    def submit() -> None:
        with Client(d.url) as c:
            try:
                out["info"] = c.submit(_request(count))
            except Exception as e:  # noqa: BLE001 - reported below
                out["error"] = e

    t = threading.Thread(target=submit)
    t.start()
    _died(d)  # committed, then killed before it answered
    assert _job_count(d) == 1
    d.env.pop("GPUD_TEST_CRASH_AT")
    d.start()  # the client retries meanwhile, with the same key
    t.join(60)
    assert "error" not in out, out
    info = out["info"]
    assert _job_count(d) == 1, "the retry made a second job"
    with Client(d.url) as c:
        assert c.wait(info.id, 30).state == "succeeded"  # type: ignore[attr-defined]
    assert count.read_text() == "run\n"


def test_idempotency_keys_per_request(crashable: DaemonProc, shared_dir: Path) -> None:
    d = crashable
    d.start()
    count = shared_dir / "runs"
    with Client(d.url) as c:
        first = c.submit(_request(count, "key-0001"))
        again = c.submit(_request(count, "key-0001"))
        assert again.id == first.id
        other = c.submit(_request(count, "key-0002"))
        assert other.id != first.id
        # The same key for another submit is the client's bug: refused, said so.
        with pytest.raises(gpud.ApiError) as e:
            c.submit(_request(shared_dir / "elsewhere", "key-0001"))
        assert e.value.status == 422 and "idempotency key" in str(e.value)
        # Keys are checked at the edge: length and characters.
        for bad in ("short", "x" * 129, "has space1", "slash/in/it"):
            with pytest.raises(gpud.ApiError) as e:
                c.submit(_request(count, bad))
            assert e.value.status == 422
        batch = counted.batch_request([((str(count), 0.0), {})] * 3)
        import msgspec

        batch = msgspec.structs.replace(batch, idempotency_key="batch-key-1")
        b1 = c.submit_batch(batch)
        b2 = c.submit_batch(batch)
        assert (b2.batch_id, b2.job_ids) == (b1.batch_id, b1.job_ids)
    # A replay answers with the original, marked as such.
    body = _request(count, "key-0001")
    transport = httpx.HTTPTransport(uds=str(d.socket))
    with httpx.Client(transport=transport, base_url="http://gpud") as h:
        import msgspec

        r = h.post(
            "/v1/jobs",
            content=msgspec.json.encode(body),
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 201 and r.json()["id"] == first.id
    assert r.headers["idempotent-replayed"] == "true"
    assert _job_count(d) == 2 + 3


def test_idempotency_keys_are_per_owner_and_expire(tmp_path: Path) -> None:
    """Another user's key collision neither returns nor reveals their jobs; a key is
    forgotten after IDEMPOTENCY_TTL."""
    from gpud.ledger import IdempotencyKey, Ledger, NewJob, Replay
    from gpud.ledger.store import IDEMPOTENCY_TTL

    led = Ledger(tmp_path / "ledger.db")

    def job(owner: str) -> NewJob:
        return NewJob(
            name="f", owner=owner, function_hash="h", args=b"a", python="3.11.0", timeout=60
        )

    now = 1_000_000.0
    _, (a,) = led.submit(
        [job("alice")], b"fn", now, idempotency=IdempotencyKey("alice", "k" * 8, "fp")
    )
    _, (b,) = led.submit([job("bob")], b"fn", now, idempotency=IdempotencyKey("bob", "k" * 8, "fp"))
    assert a != b
    with pytest.raises(Replay) as r:
        led.submit(
            [job("alice")], b"fn", now + 1, idempotency=IdempotencyKey("alice", "k" * 8, "fp")
        )
    assert r.value.ids == [a]
    later = now + IDEMPOTENCY_TTL + 1
    _, (c,) = led.submit(
        [job("alice")], b"fn", later, idempotency=IdempotencyKey("alice", "k" * 8, "fp")
    )
    assert c not in (a, b)
    assert led.integrity_check() == "ok"
    led.close()


def test_attempts_open_at_the_upgrade_count_as_launched(tmp_path: Path) -> None:
    """A ledger of schema 5 with a STARTING job: the older daemon may have launched it,
    so after the upgrade the next start looks for it instead of starting it again."""
    import sqlite3

    from gpud.ledger import Ledger, NewJob, Step
    from gpud.ledger.schema import MIGRATIONS, _split

    path = tmp_path / "ledger.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:5]:
        for statement in _split(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    conn.close()
    led = Ledger(path)  # migrates to the newest schema
    try:
        assert led.conn.execute("PRAGMA user_version").fetchone()[0] >= 6
        _, (j,) = led.submit(
            [NewJob(name="f", owner="o", function_hash="h", args=b"", python="3.11.0", timeout=60)],
            b"fn",
            time.time(),
        )
        led.advance(j, [Step(JobState.STARTING)], time.time())
        assert not led.launched(j, 1)
        led.mark_launched(j, 1, time.time())
        assert led.launched(j, 1)
    finally:
        led.close()
    # The same, with the STARTING attempt made before the upgrade.
    path2 = tmp_path / "old.db"
    conn = sqlite3.connect(path2, isolation_level=None)
    for script in MIGRATIONS[:5]:
        for statement in _split(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    conn.execute(
        "INSERT INTO jobs (name, owner, state, timeout, python, function_hash, "
        "args, submitted_at, attempt) VALUES ('f', 'o', 'starting', 60, '3.11.0', "
        "'h', x'', 0, 1)"
    )
    conn.execute("INSERT INTO attempts (job_id, attempt, started_at) VALUES (1, 1, 5.0)")
    conn.close()
    led = Ledger(path2)
    try:
        assert led.launched(1, 1)
    finally:
        led.close()
