"""Group commit (#12) on real SQLite files: the ledger thread runs the calls queued at one
moment in one transaction, each in its own savepoint, answered after one COMMIT."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from gpud.domain import IllegalTransition, JobState
from gpud.ledger import Ledger, LedgerThread, NewJob, Step
from gpud.storage import is_busy, is_full, persist

Q, ST, R, OK = JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED


def new_job(name: str = "m.f", **kw: Any) -> NewJob:
    base: dict[str, Any] = dict(
        name=name,
        owner="alice",
        function_hash="h" * 64,
        args=b"args",
        python="3.11.7",
        timeout=60.0,
    )
    base.update(kw)
    return NewJob(**base)


def submit(led: Ledger, name: str = "m.f") -> int:
    return led.submit([new_job(name)], b"fn", 1.0)[1][0]


@pytest.fixture
def lt(tmp_path: Path) -> Iterator[LedgerThread]:
    # A long time budget: under a loaded test box a group must not be cut by the clock.
    t = LedgerThread(tmp_path / "ledger.db", group_seconds=30.0)
    yield t
    t.close()


def reopen(t: LedgerThread) -> Ledger:
    return Ledger(t.path)


async def in_one_group(
    t: LedgerThread, calls: list[Callable[[], Any]], groups_made: int | None = 1
) -> list[Any]:
    """Run ``calls`` (each an awaitable factory) so that they land in one group: the ledger
    thread is held busy until every one of them is queued. Returns each result or error;
    checks that ``groups_made`` groups were committed (None: do not check)."""
    gate, entered = threading.Event(), threading.Event()
    out: list[Any] = [None] * len(calls)

    def hold(_led: Ledger) -> None:
        entered.set()  # the thread has taken its group: what comes now waits for the next
        gate.wait(10)

    async def run(i: int) -> None:
        try:
            out[i] = await calls[i]()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out[i] = e

    async with trio.open_nursery() as n:
        n.start_soon(t.call, hold)
        await trio.to_thread.run_sync(entered.wait, 10)
        for i in range(len(calls)):
            n.start_soon(run, i)
            await trio.testing.wait_all_tasks_blocked()  # queued behind the gate, in order
        groups = t.groups
        gate.set()
    if groups_made is not None:
        assert t.groups == groups + groups_made, "the calls were not run as one group"
    return out


def test_concurrent_writes_from_many_tasks_end_up_correct(lt: LedgerThread) -> None:
    n = 60

    async def one(i: int, ids: list[int]) -> None:
        _, (jid,) = await lt.call(Ledger.submit, [new_job(f"m.f{i}")], b"fn", 1.0)
        ids.append(jid)
        for s in (ST, R):
            await lt.call(Ledger.advance, jid, [Step(s)], 2.0)
        await lt.call(Ledger.advance, jid, [Step(OK, fields={"exit_code": 0})], 3.0, expect=R)

    async def main() -> list[int]:
        ids: list[int] = []
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i, ids)
        return ids

    ids = trio.run(main)
    # Many writes shared a COMMIT: fewer groups than calls.
    assert lt.grouped_calls == 4 * n and lt.groups < lt.grouped_calls
    led = reopen(lt)
    try:
        assert sorted(ids) == list(range(1, n + 1))
        for jid in ids:
            job = led.get(jid)
            assert job.state is OK and job.exit_code == 0 and job.attempt == 1
            assert [e.to_state for e in led.events(jid)] == [Q, ST, R, OK]
        assert led.integrity_check() == "ok"
    finally:
        led.close()


def test_one_failing_call_in_a_group_rolls_back_only_itself(lt: LedgerThread) -> None:
    a, b, c = (lt.call_sync(submit, f"m.{x}") for x in "abc")

    def two_writes_then_fail(led: Ledger) -> None:
        led.set_fields(c, pid=111)
        led.advance(c, [Step(ST)], 2.0)
        raise ValueError("the call failed after two writes")

    def constraint_error(led: Ledger) -> None:
        with led._tx() as conn:
            conn.execute("INSERT INTO events (job_id, at, to_state) VALUES (9999, 1, 'queued')")

    out = trio.run(
        in_one_group,
        lt,
        [
            lambda: lt.call(Ledger.advance, a, [Step(ST)], 2.0),
            lambda: lt.call(Ledger.advance, b, [Step(R)], 2.0),  # illegal: QUEUED -> RUNNING
            lambda: lt.call(Ledger.advance, a, [Step(R)], 2.0, expect=ST),
            lambda: lt.call(two_writes_then_fail),
            lambda: lt.call(constraint_error),  # foreign key: no job 9999
            lambda: lt.call(Ledger.advance, b, [Step(ST)], 2.0, expect=R),  # guard refuses
            lambda: lt.call(Ledger.get, a),  # a read after writes: answered after the COMMIT
        ],
    )
    assert out[0].state is ST and out[2].state is R
    assert isinstance(out[1], IllegalTransition) and isinstance(out[5], IllegalTransition)
    assert isinstance(out[3], ValueError) and isinstance(out[4], sqlite3.IntegrityError)
    assert out[6].state is R
    led = reopen(lt)
    try:
        assert led.get(a).state is R
        assert led.get(b).state is Q and [e.to_state for e in led.events(b)] == [Q]
        # Both writes of the failed call are undone, not just the last.
        assert led.get(c).state is Q and led.get(c).pid is None
        assert led.attempts(c) == []
        assert (
            led.conn.execute("SELECT count(*) FROM events WHERE job_id = 9999").fetchone()[0] == 0
        )
    finally:
        led.close()


def test_a_failing_commit_fails_every_writer_of_the_group(lt: LedgerThread) -> None:
    """A deferred foreign key is checked at COMMIT: one bad row fails the COMMIT itself,
    so nothing of the group is kept and every writer hears the error; a reader in the
    group is run again and answers from what is committed."""
    a = lt.call_sync(submit, "m.a")
    lt.call_sync(
        lambda led: led.conn.execute(
            "CREATE TABLE notes (job_id INTEGER REFERENCES jobs(id) DEFERRABLE INITIALLY DEFERRED)"
        )
    )

    def bad_note(led: Ledger) -> None:
        with led._tx() as conn:
            conn.execute("INSERT INTO notes VALUES (4242)")

    out = trio.run(
        in_one_group,
        lt,
        [
            lambda: lt.call(Ledger.advance, a, [Step(ST)], 2.0),
            lambda: lt.call(Ledger.submit, [new_job("m.b")], b"fn", 2.0),
            lambda: lt.call(bad_note),
            lambda: lt.call(Ledger.get, a),
        ],
        0,
    )  # none committed
    assert all(isinstance(o, sqlite3.IntegrityError) for o in out[:3]), out
    assert out[3].state is Q  # not the STARTING that was rolled back
    led = reopen(lt)
    try:
        assert led.get(a).state is Q and [e.to_state for e in led.events(a)] == [Q]
        assert [j.id for j in led.list_jobs()] == [a]
        assert led.integrity_check() == "ok"
    finally:
        led.close()
    # The connection is usable again: the next group commits.
    assert trio.run(lambda: lt.call(Ledger.advance, a, [Step(ST)], 3.0)).state is ST


def test_a_full_ledger_mid_group_loses_nothing_it_acknowledged(lt: LedgerThread) -> None:
    """SQLITE_FULL (PRAGMA max_page_count: SQLite's own limit) in one call of a group.
    Whatever SQLite undoes, every call answered ok is in the file and every call that
    got an error is not."""
    ids = [lt.call_sync(submit, f"m.{i}") for i in range(6)]
    pages = lt.call_sync(lambda led: led.conn.execute("PRAGMA page_count").fetchone()[0])
    lt.call_sync(lambda led: led.conn.execute(f"PRAGMA max_page_count = {pages + 2}"))

    def huge(led: Ledger) -> Any:
        return led.submit([new_job("m.huge", args=os.urandom(1 << 20))], b"big", 2.0)

    calls: list[Callable[[], Any]] = []
    for i, jid in enumerate(ids):
        calls.append(lambda jid=jid: lt.call(Ledger.advance, jid, [Step(ST)], 2.0))
        if i == 2:
            calls.append(lambda: lt.call(huge))
    out = trio.run(in_one_group, lt, calls)
    assert is_full(out[3]), out[3]
    led = reopen(lt)
    try:
        advances = [o for k, o in enumerate(out) if k != 3]
        for jid, o in zip(ids, advances, strict=True):
            want = Q if isinstance(o, BaseException) else ST
            if isinstance(o, BaseException):
                assert is_full(o), o
            assert led.get(jid).state is want
        assert [j.function for j in led.list_jobs() if j.function == "m.huge"] == []
        assert led.integrity_check() == "ok"
    finally:
        led.close()


def test_persist_waits_out_a_held_lock_through_a_group(lt: LedgerThread) -> None:
    """Another process holds the write lock: the group's BEGIN fails busy for every
    writer in it, each caller's persist() retries, and all are written once it goes."""
    ids = [lt.call_sync(submit, f"m.{i}") for i in range(4)]
    lt.call_sync(lambda led: led.conn.execute("PRAGMA busy_timeout = 50"))
    other = sqlite3.connect(lt.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    failures: list[BaseException] = []

    async def advance(jid: int) -> Any:
        async def write() -> Any:
            try:
                return await lt.call(Ledger.advance, jid, [Step(ST)], 2.0)
            except sqlite3.Error as e:
                failures.append(e)
                if other.in_transaction and len(failures) == len(ids):
                    other.execute("ROLLBACK")  # every writer failed once: let go
                raise

        return await persist(write, f"job {jid}")

    out = trio.run(in_one_group, lt, [lambda jid=jid: advance(jid) for jid in ids], None)
    other.close()
    assert len(failures) == len(ids) and all(is_busy(e) for e in failures)
    assert [o.state for o in out] == [ST] * len(ids)


def test_the_event_log_stays_append_only_in_a_group(lt: LedgerThread) -> None:
    a = lt.call_sync(submit, "m.a")

    def rewrite_history(led: Ledger) -> None:
        with led._tx() as conn:
            conn.execute("UPDATE events SET reason = 'forged'")

    def erase_history(led: Ledger) -> None:
        with led._tx() as conn:
            conn.execute("DELETE FROM events")

    out = trio.run(
        in_one_group,
        lt,
        [
            lambda: lt.call(Ledger.advance, a, [Step(ST)], 2.0),
            lambda: lt.call(rewrite_history),
            lambda: lt.call(erase_history),
            lambda: lt.call(Ledger.advance, a, [Step(R)], 2.0),
        ],
    )
    assert "append-only" in str(out[1]) and "append-only" in str(out[2])
    led = reopen(lt)
    try:
        evs = led.events(a)
        assert [e.to_state for e in evs] == [Q, ST, R]
        assert [e.reason for e in evs][0] == "submitted"
    finally:
        led.close()


def test_alone_each_call_is_its_own_transaction(tmp_path: Path) -> None:
    """group_commit=False (the benchmark's baseline) still works, one COMMIT per call."""
    t = LedgerThread(tmp_path / "ledger.db", group_commit=False)
    try:
        a, b = t.call_sync(submit), t.call_sync(submit)
        out = trio.run(
            in_one_group,
            t,
            [
                lambda: t.call(Ledger.advance, a, [Step(ST)], 2.0),
                lambda: t.call(Ledger.advance, b, [Step(R)], 2.0),  # illegal
                lambda: t.call(Ledger.advance, a, [Step(R)], 2.0),
            ],
            None,
        )
        assert out[0].state is ST and isinstance(out[1], IllegalTransition)
        assert out[2].state is R
    finally:
        t.close()


def test_a_group_takes_on_calls_only_within_its_time_budget(tmp_path: Path) -> None:
    """With no time budget a group is its first call: the budget is what bounds how long
    a write (or a read queued behind it) waits for its answer."""
    t = LedgerThread(tmp_path / "ledger.db", group_seconds=0.0)
    try:
        a, b = t.call_sync(submit), t.call_sync(submit)
        before = t.groups
        out = trio.run(
            in_one_group,
            t,
            [
                lambda: t.call(Ledger.advance, a, [Step(ST)], 2.0),
                lambda: t.call(Ledger.advance, b, [Step(ST)], 2.0),
                lambda: t.call(Ledger.advance, a, [Step(R)], 2.0),
            ],
            None,
        )
        assert [o.state for o in out] == [ST, ST, R]
        assert t.groups - before == 3
    finally:
        t.close()


def test_reads_do_not_wait_behind_a_group_and_see_only_commits(lt: LedgerThread) -> None:
    """LedgerThread.read runs on a second connection: while a group holds the writer
    (here: a call that blocks inside its write), a read answers at once, without the
    uncommitted change; afterwards it sees it. Writes there are refused."""
    a = lt.call_sync(submit)
    inside, release = threading.Event(), threading.Event()

    def slow_write(led: Ledger) -> Any:
        job = led.advance(a, [Step(ST)], 2.0)
        inside.set()
        release.wait(10)
        return job

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(lt.call, slow_write)
            await trio.to_thread.run_sync(inside.wait, 10)
            seen = await lt.read(Ledger.get, a)  # the writer is mid-group
            assert seen.state is Q
            release.set()
        assert (await lt.read(Ledger.get, a)).state is ST
        assert [j.id for j in await lt.read(Ledger.list_jobs)] == [a]
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            await lt.read(Ledger.advance, a, [Step(R)], 3.0)

    trio.run(main)
    assert lt.call_sync(Ledger.get, a).state is ST


_WRITER = textwrap.dedent("""
    import sys, trio
    from gpud.ledger import Ledger, LedgerThread, NewJob, Step
    from gpud.domain import JobState
    lt = LedgerThread(sys.argv[1])

    async def one(i):
        job = NewJob(name=f"m.f{i}", owner="alice", function_hash="h" * 64, args=b"a",
                     python="3.11.7", timeout=60.0)
        _, (jid,) = await lt.call(Ledger.submit, [job], b"fn", 1.0)
        print(f"submitted {jid}", flush=True)
        await lt.call(Ledger.advance, jid, [Step(JobState.STARTING)], 2.0)
        print(f"started {jid}", flush=True)

    async def main():
        async with trio.open_nursery() as n:
            for i in range(5000):
                n.start_soon(one, i)
                if i % 20 == 19:
                    await trio.sleep(0)
    trio.run(main)
""")


def test_kill_9_after_acks_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    """A writer process is killed mid-stream: whatever it was told is committed is in the
    file, with its event, after reopening."""
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    acked: list[tuple[str, int]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            what, jid = line.split()
            acked.append((what, int(jid)))
            if len(acked) >= 300:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert len(acked) >= 300
    led = Ledger(path)
    try:
        for what, jid in acked:
            job = led.get(jid)
            want = [Q] if what == "submitted" else [Q, ST]
            assert [e.to_state for e in led.events(jid)][: len(want)] == want
            assert job.state in ((Q, ST) if what == "submitted" else (ST,))
        assert led.integrity_check() == "ok"
    finally:
        led.close()


def test_a_second_connection_in_the_daemon_keeps_the_wal_of_the_first(tmp_path: Path) -> None:
    """Opening the read connection (LedgerThread.read) while the writer runs must not
    drop the writer's POSIX locks: else another process's connection, closing, believes
    it is the last one and deletes the -wal under the daemon, whose later commits are
    then invisible to everyone else (and lost). Found by the TUI's cancel test."""
    t = LedgerThread(tmp_path / "ledger.db")
    try:
        first = t.call_sync(submit, "before")

        async def read_once() -> None:
            await t.read(Ledger.get, first)  # opens the second connection, lazily

        trio.run(read_once)
        # Another process opens the ledger and closes it (a test, `gpud admin`, a backup).
        subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
            from gpud.ledger import Ledger
            Ledger({str(tmp_path / "ledger.db")!r}).close()
        """),
            ],
            check=True,
            timeout=60,
        )
        assert (tmp_path / "ledger.db-wal").exists(), "the daemon's -wal was deleted"
        later = t.call_sync(submit, "after")
        fresh = sqlite3.connect(tmp_path / "ledger.db")
        try:
            ids = {r[0] for r in fresh.execute("SELECT id FROM jobs")}
        finally:
            fresh.close()
        assert {first, later} <= ids, "a commit of the daemon is invisible to other processes"
    finally:
        t.close()


# -- durability per transaction (#12) -----------------------------------------------------


def _write_and_level(led: Ledger, name: str) -> int:
    """Submit a job (a write) and say the synchronous level it commits with: 2 FULL,
    1 NORMAL."""
    led.submit([new_job(name)], b"fn", 1.0)
    return int(led.conn.execute("PRAGMA synchronous").fetchone()[0])


def test_an_unsynced_call_commits_without_fsync_and_a_synced_one_with(lt: LedgerThread) -> None:
    async def main() -> tuple[int, int, int]:
        a = await lt.call_unsynced(_write_and_level, "m.a")
        b = await lt.call(_write_and_level, "m.b")
        c = await lt.call_unsynced(_write_and_level, "m.c")
        return a, b, c

    assert trio.run(main) == (1, 2, 1)
    led = reopen(lt)  # another connection sees all three, unsynced ones included
    try:
        assert [j.function for j in led.list_jobs(None, limit=10)] == ["m.c", "m.b", "m.a"]
    finally:
        led.close()


def test_a_synced_call_never_joins_an_unsynced_group(lt: LedgerThread) -> None:
    """Queued behind an unsynced write, a synced write must not be answered after that
    group's unsynced COMMIT: it starts a synced group of its own. An unsynced write
    queued behind a synced one joins its group (and is synced with it)."""

    async def main() -> list[Any]:
        return await in_one_group(
            lt,
            [
                lambda: lt.call_unsynced(_write_and_level, "m.u1"),
                lambda: lt.call(_write_and_level, "m.s1"),
                lambda: lt.call_unsynced(_write_and_level, "m.u2"),
            ],
            groups_made=2,
        )

    assert trio.run(main) == [1, 2, 2]
