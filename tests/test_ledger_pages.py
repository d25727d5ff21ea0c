"""Listing jobs on a big ledger (#12): every listing query walks an index from its cursor
(checked with EXPLAIN QUERY PLAN), and paging by cursor sees every job exactly once while
jobs are added."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from gpud.domain import JobState
from gpud.ledger import Ledger, NewJob, Step
from gpud.ledger.store import _JOB_COLUMNS
from gpud_client import AsyncClient
from gpud_client.models import BatchSubmitRequest

Q, ST, R, OK, F = (
    JobState.QUEUED,
    JobState.STARTING,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.FAILED,
)


def new_job(owner: str = "alice") -> NewJob:
    return NewJob(
        name="m.f", owner=owner, function_hash="h" * 64, args=b"a", python="3.11.7", timeout=60.0
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def _plans(led: Ledger, statements: list[tuple[str, list[Any]]]) -> list[str]:
    out = []
    for sql, params in statements:
        out.append(" / ".join(r[3] for r in led.conn.execute("EXPLAIN QUERY PLAN " + sql, params)))
    return out


def _listing_sql(led: Ledger, **kw: Any) -> list[tuple[str, list[Any]]]:
    """The statements list_jobs runs for these arguments, caught by a trace callback."""
    seen: list[str] = []
    led.conn.set_trace_callback(seen.append)
    try:
        led.list_jobs(**kw)
    finally:
        led.conn.set_trace_callback(None)
    # The trace shows the statements with their parameters bound: plan them as they ran.
    return [(s, []) for s in seen if s.startswith("SELECT")]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"before": 500},
        {"owner": "bob"},
        {"owner": "bob", "before": 500},
        {"states": [Q, ST, R]},
        {"states": [F], "before": 500},
        {"states": [Q, ST, R], "owner": "bob"},
        {"states": [OK, F], "owner": "bob", "before": 500},
    ],
    ids=repr,
)
def test_every_listing_walks_an_index_and_never_sorts(ledger: Ledger, kw: dict[str, Any]) -> None:
    plans = _plans(ledger, _listing_sql(ledger, limit=50, **kw))
    assert plans, "no statement ran"
    for p in plans:
        assert "TEMP B-TREE" not in p, p  # no sort of the matching rows
        if kw:
            assert p.startswith("SEARCH"), p  # a range of an index, not a scan
        else:
            assert p == "SCAN jobs", p  # newest first down the table, stopped by LIMIT
        if "owner" in kw and "states" in kw:
            assert "jobs_owner_state" in p, p
        elif "states" in kw:
            assert "jobs_state" in p, p
        elif "owner" in kw:
            assert "jobs_owner " in p, p


def test_the_migration_makes_the_indexes(ledger: Ledger) -> None:
    names = {
        r[0]
        for r in ledger.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
        )
    }
    assert {"jobs_state", "jobs_owner_state", "jobs_owner"} <= names
    assert "jobs_active" not in names
    # The columns jobs are listed by: an unknown listing would have to scan.
    assert "id" in _JOB_COLUMNS


def _everything(led: Ledger) -> None:
    """A ledger with jobs of two owners in every kind of state."""
    rng = random.Random(7)
    for _ in range(300):
        _, (jid,) = led.submit([new_job(rng.choice(["alice", "bob"]))], b"fn", 1.0)
        end = rng.choice([Q, ST, R, OK, F])
        path = {Q: [], ST: [ST], R: [ST, R], OK: [ST, R, OK], F: [ST, R, F]}[end]
        for s in path:
            led.advance(jid, [Step(s)], 2.0)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"owner": "bob"},
        {"states": [Q, ST, R]},
        {"states": [OK, F], "owner": "alice"},
        {"states": [F]},
    ],
    ids=repr,
)
def test_pages_see_every_job_once_while_jobs_are_added(ledger: Ledger, kw: dict[str, Any]) -> None:
    _everything(ledger)
    want = {j.id for j in ledger.list_jobs(limit=100_000, **kw)}
    seen: list[int] = []
    before = None
    rng = random.Random(11)
    while True:
        page = ledger.list_jobs(limit=rng.randint(1, 17), before=before, **kw)
        ids = [j.id for j in page]
        assert ids == sorted(ids, reverse=True)  # newest first
        seen.extend(ids)
        # Jobs keep coming between pages: newer than the cursor, so not on later pages.
        for _ in range(rng.randint(0, 3)):
            ledger.submit([new_job(rng.choice(["alice", "bob"]))], b"fn", 3.0)
        if not page:
            break
        before = ids[-1]
    assert len(seen) == len(set(seen)), "a job was shown twice"
    assert set(seen) == want
    for j in ledger.list_jobs(limit=100_000, **kw):
        if "states" in kw:
            assert j.state in kw["states"]
        if "owner" in kw:
            assert j.owner == kw["owner"]


def test_the_state_walks_merge_newest_first(ledger: Ledger) -> None:
    _everything(ledger)
    got = ledger.list_jobs([R, Q, F], limit=40, before=250)
    ref = ledger.conn.execute(
        "SELECT id FROM jobs WHERE state IN ('running', 'queued', 'failed') AND id < 250 "
        "ORDER BY id DESC LIMIT 40"
    ).fetchall()
    assert [j.id for j in got] == [r[0] for r in ref]
    # A state named twice is walked once.
    assert [j.id for j in ledger.list_jobs([R, R], limit=5)] == [
        j.id for j in ledger.list_jobs([R], limit=5)
    ]


def _sleepy(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "slept"


async def test_api_pages_by_cursor_while_a_batch_is_added(served: Any) -> None:
    mod = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(mod)
    try:
        fn = cloudpickle.dumps(_sleepy)
    finally:
        cloudpickle.unregister_pickle_by_value(mod)
    py = "{}.{}.{}".format(*sys.version_info[:3])

    def batch(n: int) -> BatchSubmitRequest:
        return BatchSubmitRequest(
            name="pages.sleepy",
            function=fn,
            python=py,
            inputs=[cloudpickle.dumps(((30.0,), {}))] * n,
        )

    async with AsyncClient(served.url) as c:
        first = (await c.submit_batch(batch(25))).job_ids
        made = list(first)
        seen: list[int] = []
        cursor = None
        while True:
            page = await c.list_jobs(limit=6, cursor=cursor)
            seen.extend(j.id for j in page.jobs)
            if not seen or len(seen) < 12:
                # Newer jobs: above every later page.
                made += (await c.submit_batch(batch(3))).job_ids
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert sorted(seen) == sorted(set(seen)), "a job was shown twice"
        assert set(first) <= set(seen)
        for job_id in made:  # none left running past the test
            await c.cancel(job_id)
        for job_id in made:
            assert (await c.wait(job_id)).state == "cancelled"


def test_list_jobs_rejects_nothing_it_used_to_take(ledger: Ledger) -> None:
    """The signature callers use is unchanged: states as any iterable, keywords."""
    ledger.submit([new_job()], b"fn", 1.0)
    assert len(ledger.list_jobs(iter([Q]), limit=1)) == 1
    assert len(ledger.list_jobs(None, limit=1, before=None, owner=None)) == 1
    assert ledger.list_jobs([], limit=5) == []  # no states: no jobs, as IN () gave


def test_gpud_ps_pages_with_before_as_its_last_line_says(daemon: Any) -> None:
    from .conftest import gpud_cli

    env = daemon.client_env()
    made = [
        int(gpud_cli("run", "-d", "examples/hello.py::square", "--x", str(x), env=env).stdout)
        for x in range(3)
    ]
    args = ["ps", "--all", "--limit", "2"]
    seen: list[int] = []
    for _ in range(10):
        out = gpud_cli(*args, env=env)
        assert out.returncode == 0, out.stderr
        seen += [
            int(line.split()[0])
            for line in out.stdout.splitlines()[1:]
            if line.split() and line.split()[0].isdigit()
        ]
        more = [ln for ln in out.stderr.splitlines() if ln.startswith("older jobs: gpud ")]
        if not more:
            break
        args = more[0].removeprefix("older jobs: gpud ").split()
        assert args[:4] == ["ps", "--all", "--limit", "2"] and args[4] == "--before"
    assert sorted(seen) == sorted(set(seen)) and set(made) <= set(seen)
    js = json.loads(gpud_cli("ps", "--all", "--before", str(max(made)), "--json", env=env).stdout)
    assert max(made) not in [j["id"] for j in js] and min(made) in [j["id"] for j in js]
