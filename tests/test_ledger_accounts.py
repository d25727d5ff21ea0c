"""The ledger's users, tokens, quotas and accounting (issue #5), on real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gpud.domain import GpuRequest, JobState, Quota
from gpud.ledger import Ledger, Step
from gpud.ledger.schema import MIGRATIONS, SCHEMA_VERSION, _split
from gpud.ledger.usage import attempts_between, finished_gpu_intervals, to_ds
from gpud.ledger.users import (
    UnknownUser,
    UserExists,
    add_user,
    get_user,
    list_users,
    remove_user,
    set_admin,
    set_quota,
    set_token,
)

from .test_ledger import new_job

Q, ST, R = JobState.QUEUED, JobState.STARTING, JobState.RUNNING


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def test_users_add_list_update_remove(ledger: Ledger) -> None:
    add_user(ledger, "alice", admin=False, token_hash="a" * 64, now=1.0)
    add_user(ledger, "root-ish", admin=True, token_hash=None, now=2.0)
    assert [u.name for u in list_users(ledger)] == ["alice", "root-ish"]
    with pytest.raises(UserExists):
        add_user(ledger, "alice", admin=True, token_hash=None, now=3.0)
    with pytest.raises(ValueError, match="invalid user name"):
        add_user(ledger, "../etc", admin=False, token_hash=None, now=3.0)
    assert set_token(ledger, "alice", "b" * 64).token_hash == "b" * 64
    assert set_admin(ledger, "alice", True).admin
    q = Quota(max_gpus=2, max_queued=100, max_timeout=7200.0)
    assert set_quota(ledger, "alice", q).quota == q
    assert get_user(ledger, "alice").quota == q
    remove_user(ledger, "alice")
    with pytest.raises(UnknownUser):
        get_user(ledger, "alice")
    with pytest.raises(UnknownUser):
        remove_user(ledger, "alice")
    with pytest.raises(UnknownUser):
        set_quota(ledger, "nobody-here", Quota())


def test_token_hashes_are_unique(ledger: Ledger) -> None:
    add_user(ledger, "alice", admin=False, token_hash="a" * 64, now=1.0)
    with pytest.raises(sqlite3.IntegrityError):
        add_user(ledger, "bob", admin=False, token_hash="a" * 64, now=1.0)


def test_to_ds_is_100ms_granularity() -> None:
    assert [to_ds(x) for x in (0.0, 0.04, 0.05, 0.149, 1.25, 3600.0, -2.0)] == [
        0,
        0,
        1,
        1,
        13,
        36000,
        0,
    ]


def test_an_attempt_is_accounted_when_it_ends(ledger: Ledger) -> None:
    _, (jid,) = ledger.submit([new_job(gpu=GpuRequest.parse("h100:2"), retries=1)], b"f", now=100.0)
    ledger.advance(
        jid, [Step(ST, fields={"gpus": ("G0", "G1"), "gpu_types": ("h100", "h100")})], now=110.0
    )
    ledger.advance(jid, [Step(R, fields={"pid": 5, "started_at": 110.2})], now=110.2)
    # The first attempt fails after 12.34 s and is retried in the same transaction.
    ledger.advance(
        jid,
        [
            Step(JobState.FAILED, "boom", fields={"ended_at": 122.34}),
            Step(Q, "retry", fields={"gpus": ()}),
        ],
        now=122.34,
    )
    ledger.advance(jid, [Step(ST, fields={"gpus": ("G1",), "gpu_types": ("h100",)})], now=130.0)
    ledger.advance(jid, [Step(R)], now=130.5)
    ledger.advance(jid, [Step(JobState.SUCCEEDED, fields={"ended_at": 131.06})], now=131.06)

    a1, a2 = ledger.attempts(jid)
    assert (a1["wall_ds"], a1["gpu_ds"]) == (123, 246)
    assert (a2["wall_ds"], a2["gpu_ds"]) == (11, 11)
    job = ledger.get(jid)
    assert job.wall_seconds == pytest.approx(13.4) and job.gpu_seconds == pytest.approx(25.7)
    rows = ledger.conn.execute(
        "SELECT attempt, gpu_uuid, gpu_type, owner, ds FROM gpu_usage ORDER BY attempt, gpu_uuid"
    ).fetchall()
    assert [tuple(r) for r in rows] == [
        (1, "G0", "h100", "alice", 123),
        (1, "G1", "h100", "alice", 123),
        (2, "G1", "h100", "alice", 11),
    ]
    spans = finished_gpu_intervals(ledger, since=0.0)
    assert [(s.owner, s.started_at, s.ended_at) for s in spans] == [
        ("alice", 110.0, 122.34),
        ("alice", 110.0, 122.34),
        ("alice", 130.0, 131.06),
    ]


def test_cpu_and_cancelled_while_queued_jobs(ledger: Ledger) -> None:
    _, (cpu, queued) = ledger.submit([new_job(), new_job()], b"f", now=1.0)
    ledger.advance(cpu, [Step(ST)], now=2.0)
    ledger.advance(cpu, [Step(JobState.CANCELLED, fields={"ended_at": 4.5})], now=4.5)
    ledger.advance(queued, [Step(JobState.CANCELLED)], now=5.0)
    assert ledger.get(cpu).wall_seconds == 2.5 and ledger.get(cpu).gpu_seconds == 0
    assert ledger.get(queued).wall_seconds == 0 and ledger.attempts(queued) == []


def test_attempts_between_clips_by_window_and_owner(ledger: Ledger) -> None:
    _, (a, b, c) = ledger.submit(
        [new_job(gpu=GpuRequest.parse("any")), new_job(owner="bob"), new_job()], b"f", now=0.0
    )
    ledger.advance(a, [Step(ST, fields={"gpus": ("G0",), "gpu_types": ("l4",)})], now=10.0)
    ledger.advance(a, [Step(R)], now=11.0)
    ledger.advance(a, [Step(JobState.SUCCEEDED, fields={"ended_at": 20.0})], now=20.0)
    ledger.advance(b, [Step(ST)], now=30.0)  # still running
    ledger.advance(c, [Step(ST)], now=1.0)
    ledger.advance(c, [Step(JobState.FAILED, fields={"ended_at": 5.0})], now=5.0)
    got = attempts_between(ledger, 6.0, 100.0)
    assert [(u.job_id, u.owner, u.gpu_types, u.ended_at) for u in got] == [
        (a, "alice", ("l4",), 20.0),
        (b, "bob", (), None),
    ]
    assert [u.job_id for u in attempts_between(ledger, 0.0, 100.0, owner="bob")] == [b]
    assert attempts_between(ledger, 0.0, 9.0, owner="bob") == []


def test_accounting_migration_accounts_for_what_ran_before(tmp_path: Path) -> None:
    """A version-1 ledger with finished and running attempts gets its accounting filled
    in when upgraded (through migrations 2 and 3 to 4, the users and accounting one)."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in _split(MIGRATIONS[0]):
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO blobs VALUES ('h', x'00', 0)")
    for jid in (1, 2):
        conn.execute(
            "INSERT INTO jobs (id, name, owner, state, timeout, python, function_hash, args, "
            "submitted_at) VALUES (?, 'f', 'alice', 'succeeded', 60, '3.11', 'h', x'00', 0)",
            (jid,),
        )
    conn.execute(
        "INSERT INTO attempts (job_id, attempt, started_at, ended_at, gpus) "
        "VALUES (1, 1, 10.0, 12.5, 'GPU-a,GPU-b')"
    )
    conn.execute(
        "INSERT INTO attempts (job_id, attempt, started_at, ended_at, gpus) "
        "VALUES (1, 2, 20.0, 21.0, '')"
    )
    conn.execute(
        "INSERT INTO attempts (job_id, attempt, started_at, gpus) VALUES (2, 1, 30.0, 'GPU-c')"
    )
    conn.close()

    led = Ledger(path)
    try:
        assert led.get(1).wall_seconds == 3.5 and led.get(1).gpu_seconds == 5.0
        rows = led.conn.execute(
            "SELECT job_id, gpu_uuid, gpu_type, ds FROM gpu_usage ORDER BY job_id, gpu_uuid"
        ).fetchall()
        assert [tuple(r) for r in rows] == [
            (1, "GPU-a", "unknown", 25),
            (1, "GPU-b", "unknown", 25),
            (2, "GPU-c", "unknown", None),
        ]
        # The attempt that was running when upgraded is accounted when it ends.
        led.conn.execute("UPDATE jobs SET state = 'running', attempt = 1 WHERE id = 2")
        led.advance(2, [Step(JobState.SUCCEEDED, fields={"ended_at": 31.0})], now=31.0)
        assert led.get(2).gpu_seconds == 1.0
        assert led.integrity_check() == "ok"
    finally:
        led.close()


def test_users_and_accounting_come_after_the_released_migrations() -> None:
    """Migrations 2 (memory, cpus) and 3 (warm workers) were released first; users and
    accounting are 4, appended, so a ledger at version 3 upgrades in place; snapshots
    (#4) came after, as 5; images (#11) 6, the job's interpreter (#11) 7, launches and
    idempotency keys (#10) 8, retention (#12) 9, the listing indexes (#12) 10, batch
    limits (#12) 11, suspensions (#13) 12, dependencies and notifications (#14) 13, warm
    results (#12) 14, the early warning and stop grace (#14) 15."""
    assert SCHEMA_VERSION == 15
    assert "memory" in MIGRATIONS[1] and "keep_warm" in MIGRATIONS[2]
    assert "CREATE TABLE users" in MIGRATIONS[3]
    assert "CREATE TABLE snapshots" in MIGRATIONS[4]
    assert "CREATE TABLE images" in MIGRATIONS[5]
    assert "python_env" in MIGRATIONS[6]
    assert "CREATE TABLE idempotency" in MIGRATIONS[7]
    assert "CREATE TABLE usage_rollup" in MIGRATIONS[8]  # retention (#12)


def test_a_version_3_ledger_upgrades_keeping_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:3]:
        for stmt in _split(script):
            conn.execute(stmt)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO blobs VALUES ('h', x'00', 0)")
    conn.execute(
        "INSERT INTO jobs (id, name, owner, state, timeout, python, function_hash, args, "
        "submitted_at, memory, cpus, keep_warm, start_kind, startup) VALUES "
        "(1, 'f', 'alice', 'succeeded', 60, '3.11', 'h', x'00', 0, 1048576, 0.5, 30, "
        "'warm', 0.25)"
    )
    conn.execute(
        "INSERT INTO attempts (job_id, attempt, started_at, ended_at, gpus) "
        "VALUES (1, 1, 10.0, 11.0, 'GPU-a')"
    )
    conn.close()

    led = Ledger(path)
    try:
        assert led.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        job = led.get(1)
        assert (job.memory, job.cpus, job.keep_warm, job.start_kind, job.startup) == (
            1048576,
            0.5,
            30.0,
            "warm",
            0.25,
        )
        assert job.snapshot is False  # migration 5's default for jobs from before it
        assert job.wall_seconds == 1.0 and job.gpu_seconds == 1.0
        assert led.integrity_check() == "ok"
    finally:
        led.close()


def test_a_prerelease_shared_box_ledger_is_refused_clearly(tmp_path: Path) -> None:
    """Before the merge, users and accounting were migration 2: such a ledger is refused
    with a message, not half-upgraded."""
    from gpud.ledger.schema import SchemaTooNew, migrate

    path = tmp_path / "pre.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in [*_split(MIGRATIONS[0]), *_split(MIGRATIONS[3])]:
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 2")
    with pytest.raises(SchemaTooNew, match="pre-release"):
        migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()
