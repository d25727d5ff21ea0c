"""The ledger on real SQLite files: migrations, durability settings, the one state machine."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpud.domain import GpuRequest, IllegalTransition, JobState
from gpud.ledger import SCHEMA_VERSION, Ledger, NewJob, Step, UnknownJob
from gpud.ledger.schema import SchemaTooNew

Q, ST, R = JobState.QUEUED, JobState.STARTING, JobState.RUNNING


def new_job(**kw: object) -> NewJob:
    base = dict(
        name="m.f",
        owner="alice",
        function_hash="h" * 64,
        args=b"args",
        python="3.11.7",
        timeout=60.0,
    )
    base.update(kw)
    return NewJob(**base)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def test_fresh_ledger_is_migrated_with_wal_and_full_sync(ledger: Ledger) -> None:
    c = ledger.conn
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert ledger.integrity_check() == "ok"


def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    led = Ledger(tmp_path / "l.db")
    assert led.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    led.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "l.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match="newer than this gpud"):
        Ledger(tmp_path / "l.db")


def test_submit_stores_payload_and_event(ledger: Ledger) -> None:
    _, ids = ledger.submit(
        [new_job(gpu=GpuRequest.parse("h100:2"), env={"A": "1"})], b"function-bytes", now=100.0
    )
    job = ledger.get(ids[0])
    assert job.state is Q and job.gpu == GpuRequest.parse("h100:2") and job.env == {"A": "1"}
    assert ledger.payload(ids[0]) == (b"function-bytes", b"args")
    [ev] = ledger.events(ids[0])
    assert ev.from_state is None and ev.to_state is Q and ev.at == 100.0


def test_batch_shares_one_function_blob(ledger: Ledger) -> None:
    batch, ids = ledger.submit([new_job(args=bytes([i])) for i in range(5)], b"fn", 1.0, batch=True)
    assert batch is not None and len(ids) == 5 and ids == sorted(ids)
    assert ledger.conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 1
    assert [ledger.payload(i)[1] for i in ids] == [bytes([i]) for i in range(5)]
    assert {ledger.get(i).batch_id for i in ids} == {batch}


def test_full_lifecycle_records_attempt_and_events(ledger: Ledger) -> None:
    _, [jid] = ledger.submit([new_job()], b"fn", 1.0)
    ledger.advance(jid, [Step(ST, fields={"gpus": ("GPU-a", "GPU-b")})], 2.0)
    ledger.advance(jid, [Step(R, fields={"pid": 42, "pid_start": 7, "started_at": 2.5})], 2.5)
    job = ledger.advance(
        jid,
        [Step(JobState.SUCCEEDED, fields={"ended_at": 3.0, "exit_code": 0, "has_result": True})],
        3.0,
    )
    assert job.state is JobState.SUCCEEDED and job.gpus == ("GPU-a", "GPU-b")
    assert job.attempt == 1 and job.has_result and job.pid == 42
    [att] = ledger.attempts(jid)
    assert att["state"] == "succeeded" and att["pid"] == 42 and att["ended_at"] == 3.0
    assert [e.to_state for e in ledger.events(jid)] == [Q, ST, R, JobState.SUCCEEDED]


def test_retry_is_one_transaction_and_counts_attempts(ledger: Ledger) -> None:
    _, [jid] = ledger.submit([new_job(retries=1)], b"fn", 1.0)
    ledger.advance(jid, [Step(ST), Step(R)], 2.0)
    job = ledger.advance(
        jid,
        [
            Step(JobState.FAILED, "boom", {"error": "boom"}),
            Step(Q, "retry", {"not_before": 9.0, "gpus": ()}),
        ],
        3.0,
    )
    assert job.state is Q and job.attempt == 1 and job.not_before == 9.0
    ledger.advance(jid, [Step(ST)], 10.0)
    assert ledger.get(jid).attempt == 2
    assert [a["state"] for a in ledger.attempts(jid)] == ["failed", None]


@pytest.mark.parametrize("path", [[R], [ST, Q], [JobState.SUCCEEDED], [ST, R, R]])
def test_illegal_transitions_are_refused_and_change_nothing(
    ledger: Ledger, path: list[JobState]
) -> None:
    _, [jid] = ledger.submit([new_job()], b"fn", 1.0)
    before = ledger.events(jid)
    with pytest.raises(IllegalTransition):
        ledger.advance(jid, [Step(s) for s in path], 2.0)
    assert ledger.get(jid).state is Q  # the whole transaction rolled back
    assert ledger.events(jid) == before


def test_final_states_are_final(ledger: Ledger) -> None:
    _, [jid] = ledger.submit([new_job()], b"fn", 1.0)
    ledger.advance(jid, [Step(JobState.CANCELLED)], 2.0)
    for s in JobState:
        with pytest.raises(IllegalTransition):
            ledger.advance(jid, [Step(s)], 3.0)


def test_unknown_job(ledger: Ledger) -> None:
    with pytest.raises(UnknownJob):
        ledger.get(99)
    with pytest.raises(UnknownJob):
        ledger.advance(99, [Step(ST)], 1.0)


def test_events_are_append_only(ledger: Ledger) -> None:
    _, [jid] = ledger.submit([new_job()], b"fn", 1.0)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        ledger.conn.execute("UPDATE events SET reason = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        ledger.conn.execute("DELETE FROM events")


def test_list_pages_newest_first(ledger: Ledger) -> None:
    _, ids = ledger.submit([new_job() for _ in range(7)], b"fn", 1.0)
    ledger.advance(ids[0], [Step(JobState.CANCELLED)], 2.0)
    page1 = ledger.list_jobs(limit=3)
    assert [j.id for j in page1] == ids[::-1][:3]
    page2 = ledger.list_jobs(limit=3, before=page1[-1].id)
    assert [j.id for j in page2] == ids[::-1][3:6]
    assert [j.id for j in ledger.list_jobs([JobState.CANCELLED])] == [ids[0]]
    assert [j.id for j in ledger.active()] == ids[1:]


def test_acknowledged_submit_survives_sigkill(tmp_path: Path) -> None:
    """A process that commits a submit and is SIGKILLed right after loses nothing."""
    db = tmp_path / "l.db"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from gpud.ledger import Ledger, NewJob
        led = Ledger({str(db)!r})
        jobs = [NewJob(name="m.f", owner="a", function_hash="h", args=b"x" * 1000,
                       python="3.11.7", timeout=5.0) for _ in range(50)]
        _, ids = led.submit(jobs, b"fn", 1.0, batch=True)
        print(ids[-1], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == -9, out.stderr
    last = int(out.stdout.strip())
    led = Ledger(db)
    assert led.integrity_check() == "ok"
    assert len(led.active()) == 50 and led.get(last).state is Q
    led.close()


def test_ledger_files_are_private(tmp_path: Path) -> None:
    """Payloads and env values live in the ledger: no other user may read it."""
    led = Ledger(tmp_path / "l.db")
    led.submit([new_job()], b"fn", 1.0)
    for name in ("l.db", "l.db-wal", "l.db-shm"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    led.close()


def test_a_batchs_jobs_read_back_at_once_are_what_get_returns(ledger: Ledger) -> None:
    """Daemon.submit reads a big batch back in one pass (#12): ``get_many`` (one query,
    alike rows parsed once) and ``get_alike`` (the first row, copied) return what ``get``
    returns for each job, each job with an env dict of its own."""
    from gpud.ledger.store import all_alike

    gpu = GpuRequest.parse("1")
    ledger.submit([new_job()], b"fn", 1.0)  # a job before, of another shape
    made = [new_job(args=b"%d" % i, gpu=gpu, env={"A": "1"}, notify="http://h/") for i in range(50)]
    assert all_alike(made)
    assert not all_alike([made[0], new_job(args=b"x", gpu=gpu, env={"A": "2"})])
    _, ids = ledger.submit(made, b"fn", 2.0, batch=True)
    one_by_one = [ledger.get(i) for i in ids]
    assert ledger.get_many(ids) == one_by_one
    alike = ledger.get_alike(ids)
    assert alike == one_by_one
    assert len({id(j.env) for j in alike}) == len(ids)
    alike[1].env["B"] = "2"
    assert alike[2].env == {"A": "1"}
    scattered = [ids[3], 1, ids[0]]
    assert ledger.get_many(scattered) == [ledger.get(i) for i in scattered]
    with pytest.raises(UnknownJob):
        ledger.get_many([ids[0], ids[-1] + 1])
