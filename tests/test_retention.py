"""Retention (#12): finished jobs' directories and records go; usage totals stay.

Real SQLite files, real job directories (with the links and modes a job could leave),
and a real daemon driven through the `gpud` command line.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import sqlite3
import textwrap
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from gpud.accounting import report
from gpud.config import ConfigError, load_config
from gpud.domain import GpuRequest, JobState
from gpud.fairshare import DecayedTotals
from gpud.ledger import Ledger, LedgerThread, Step, UnknownJob
from gpud.ledger.retention import prunable, prune, pruned_state, spread
from gpud.ledger.usage import attempts_between, buckets_between, finished_gpu_intervals
from gpud.retention import Retention, remove_tree, run, tree_bytes
from gpud_client import Client

from .conftest import DaemonProc, add_gpud_user, gpud_cli, wait_for
from .test_ledger import new_job

Q, ST, R = JobState.QUEUED, JobState.STARTING, JobState.RUNNING
DAY = 86400.0
BASE = 1_700_000_000.0  # 2023-11-14


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def finished_job(
    led: Ledger,
    owner: str,
    gpus: tuple[tuple[str, str], ...],
    attempts: list[tuple[float, float]],
    fn: str = "h" * 64,
    batch: bool = False,
) -> int:
    """A job that ran these attempts (all but the last failed and were retried)."""
    gpu = GpuRequest.parse("any") if gpus else None
    _, (jid,) = led.submit(
        [new_job(owner=owner, gpu=gpu, retries=len(attempts) - 1, function_hash=fn)],
        b"f" + fn.encode(),
        now=attempts[0][0] - 5,
        batch=batch,
    )
    for k, (start, end) in enumerate(attempts):
        led.advance(
            jid,
            [
                Step(
                    ST,
                    fields={
                        "gpus": tuple(u for u, _ in gpus),
                        "gpu_types": tuple(t for _, t in gpus),
                    },
                )
            ],
            now=start,
        )
        led.advance(jid, [Step(R, fields={"pid": 1, "started_at": start})], now=start)
        if k == len(attempts) - 1:
            led.advance(jid, [Step(JobState.SUCCEEDED, fields={"ended_at": end})], now=end)
        else:
            led.advance(
                jid,
                [
                    Step(JobState.FAILED, "boom", fields={"ended_at": end}),
                    Step(Q, "retry", fields={"gpus": ()}),
                ],
                now=end,
            )
    return jid


def random_history(led: Ledger, n: int = 80, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    kinds = [
        (),
        (("G0", "h100"),),
        (("G0", "h100"), ("G1", "h100")),
        (("G1", "h100"), ("G2", "l4")),
        (("G2", "l4"),),
    ]
    ids = []
    for _ in range(n):
        t = BASE + rng.uniform(0, 3 * DAY)
        attempts = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            length = rng.choice([0.0, 0.07, 12.3, rng.uniform(60, 3 * 3600)])
            attempts.append((t, t + length))
            t += length + rng.uniform(1, 600)
        ids.append(
            finished_job(led, rng.choice(["alice", "bob", "carol"]), rng.choice(kinds), attempts)
        )
    return ids


def reports(led: Ledger, since: float, until: float) -> dict[str, object]:
    out: dict[str, object] = {}
    for by in ("user", "gpu-type", "day"):
        r = report(
            attempts_between(led, since, until),
            since=since,
            until=until,
            by=by,
            buckets=buckets_between(led, since, until),
        )
        out[by] = {
            x.key: (x.job_count, x.attempts, x.gpu_seconds, x.wall_seconds)
            for x in [*r.lines, r.total]
        }
    return out


# -- the ledger -------------------------------------------------------------------------------


def test_spread_over_hours_adds_up_exactly() -> None:
    assert spread(10.0, 20.0, 100) == [(0, 100)]
    assert spread(3500.0, 3700.0, 2000) == [(0, 1000), (3600, 1000)]
    assert spread(3600.0, 3600.0, 0) == []
    for start, length, ds in [(1.5, 9000.3, 90003), (7199.9, 0.2, 2), (0.0, 7200.0, 1)]:
        parts = spread(start, start + length, ds)
        assert sum(d for _, d in parts) == ds
        assert all(h % 3600 == 0 for h, _ in parts)


def test_pruned_jobs_leave_the_same_usage_totals(ledger: Ledger) -> None:
    ids = random_history(ledger)
    since, until = BASE - DAY, BASE + 5 * DAY
    before = reports(ledger, since, until)
    spans = finished_gpu_intervals(ledger, since=0.0)
    gpu_before = {
        o: sum(s.ended_at - s.started_at for s in spans if s.owner == o)
        for o in ("alice", "bob", "carol")
    }
    now = BASE + 6 * DAY
    decayed_before = DecayedTotals(7 * DAY, now)
    for s in spans:
        decayed_before.add(s.owner, s.started_at, s.ended_at, 1, now=now)

    assert prunable(ledger, BASE + 10 * DAY)[0] == len(ids)
    top = 0
    while (chunk := prune(ledger, BASE + 10 * DAY, limit=30)).jobs:
        assert chunk.jobs <= 30
        top = max(top, chunk.max_id)
    assert ledger.conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert ledger.conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    assert ledger.conn.execute("SELECT count(*) FROM gpu_usage").fetchone()[0] == 0
    assert pruned_state(ledger) == (max(ids), len(ids)) and top == max(ids)

    after = reports(ledger, since, until)
    # By user and GPU type: the same jobs, attempts, GPU-seconds and wall time.
    assert after["user"] == before["user"]
    assert after["gpu-type"] == before["gpu-type"]
    # By day: the same totals; an attempt across midnight is cut by hour, to 100 ms.
    assert after["day"]["total"] == before["day"]["total"]  # type: ignore[index]
    for key, (_, _, gpu, wall) in before["day"].items():  # type: ignore[attr-defined]
        assert after["day"][key][2] == pytest.approx(gpu, abs=0.3)  # type: ignore[index]
        assert after["day"][key][3] == pytest.approx(wall, abs=0.3)  # type: ignore[index]
    # Fair share: the same GPU time per owner, and (decayed) within an hour's decay.
    spans = finished_gpu_intervals(ledger, since=0.0)
    for owner, total in gpu_before.items():
        got = sum(s.ended_at - s.started_at for s in spans if s.owner == owner)
        assert got == pytest.approx(total, abs=0.05 * 400)
        assert round(got, 1) == pytest.approx(round(total, 1), rel=1e-4)
    decayed = DecayedTotals(7 * DAY, now)
    for s in spans:
        decayed.add(s.owner, s.started_at, s.ended_at, 1, now=now)
    for owner, value in decayed_before.at(now).items():
        assert decayed.at(now)[owner] == pytest.approx(value, rel=0.01)


def test_only_final_jobs_go_and_the_event_log_stays_append_only(ledger: Ledger) -> None:
    old = finished_job(ledger, "alice", (("G0", "h100"),), [(BASE, BASE + 60)])
    _, (queued, running) = ledger.submit([new_job(), new_job()], b"f", now=BASE)
    ledger.advance(
        running, [Step(ST, fields={"gpus": ("G1",), "gpu_types": ("h100",)})], now=BASE + 1
    )
    ledger.advance(running, [Step(R, fields={"pid": 1, "started_at": BASE + 1})], now=BASE + 1)
    recent = finished_job(ledger, "bob", (), [(BASE + 5 * DAY, BASE + 5 * DAY + 1)])
    c = ledger.conn
    # Outside gc, the database refuses: no event or job row can be deleted by hand.
    for sql in ("DELETE FROM events WHERE job_id = ?", "DELETE FROM jobs WHERE id = ?"):
        with pytest.raises(sqlite3.IntegrityError):
            c.execute(sql, (old,))
    with pytest.raises(sqlite3.IntegrityError, match="only final jobs"):
        c.execute("INSERT INTO retention_pruning VALUES (?)", (running,))

    assert prune(ledger, BASE + DAY).jobs == 1
    assert {j.id for j in ledger.list_jobs()} == {queued, running, recent}
    assert len(ledger.events(running)) == 3 and ledger.events(old) == []
    assert ledger.attempts(running)[0]["ended_at"] is None
    assert c.execute("SELECT count(*) FROM retention_pruning").fetchone()[0] == 0
    with pytest.raises(UnknownJob) as gone:
        ledger.get(old)
    assert gone.value.removed and "removed by retention" in str(gone.value)
    with pytest.raises(UnknownJob) as never:
        ledger.get(recent + 100)
    assert not never.value.removed and str(never.value) == f"no job {recent + 100}"
    assert ledger.integrity_check() == "ok"
    assert c.execute("PRAGMA foreign_key_check").fetchall() == []


def test_payloads_and_batches_go_with_their_last_job(ledger: Ledger) -> None:
    a = finished_job(ledger, "alice", (), [(BASE, BASE + 1)], fn="a" * 64, batch=True)
    shared_old = finished_job(ledger, "alice", (), [(BASE, BASE + 1)], fn="b" * 64)
    shared_new = finished_job(
        ledger, "alice", (), [(BASE + 9 * DAY, BASE + 9 * DAY + 1)], fn="b" * 64
    )
    assert prunable(ledger, BASE + DAY) == (2, 2, 8, 1)
    p = prune(ledger, BASE + DAY)
    assert (p.jobs, p.blobs) == (2, 1)
    hashes = {r[0] for r in ledger.conn.execute("SELECT hash FROM blobs")}
    assert hashes == {"b" * 64}  # still used by shared_new
    assert ledger.conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 0
    assert ledger.payload(shared_new)[0] == b"f" + b"b" * 64
    assert {a, shared_old}.isdisjoint(j.id for j in ledger.list_jobs())


# -- job directories ----------------------------------------------------------------------------


def _as(uid: int, gid: int, fn, *args):  # type: ignore[no-untyped-def]
    """Run fn(*args) in a child process as uid:gid; re-raise what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fn(*args)
        except BaseException as e:  # noqa: BLE001
            os.write(w, repr(e).encode()[:2000])
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        why = fh.read().decode()
    os.waitpid(pid, 0)
    assert not why, why


def _plant(d: Path, outside: Path) -> None:
    """What a hostile or careless job leaves: links out, unreadable and read-only
    directories, a deep tree."""
    (d / "output.log").write_text("log\n")
    (d / "result.pkl").write_bytes(b"x" * 10000)
    (d / "to_outside").symlink_to(outside)
    (d / "to_file").symlink_to(outside / "precious")
    (d / "hard").mkdir()
    locked = d / "hard" / "locked"
    locked.mkdir()
    (locked / "inside").write_text("mine")
    (locked / "link").symlink_to(outside)
    os.chmod(locked, 0o000)
    ro = d / "readonly"
    ro.mkdir()
    (ro / "f").write_text("f")
    os.chmod(ro, 0o500)
    deep = d
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("b")


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the job and gc as another user: needs root")
def test_removal_follows_no_link_and_handles_locked_directories(base_dir: Path) -> None:
    """The daemon run by a user (jobs run as that user too): a job's tree with links out
    of it, directories made unreadable or read-only, goes whole; what the links point
    to stays."""
    nobody = pwd.getpwnam("nobody")
    outside = base_dir / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    jobs = base_dir / "jobs"
    jobs.mkdir()
    os.chown(jobs, nobody.pw_uid, nobody.pw_gid)
    os.chmod(jobs, 0o700)

    def build() -> None:
        d = jobs / "7"
        d.mkdir()
        _plant(d, outside)

    def remove() -> None:
        size = tree_bytes(jobs, 7)
        assert size >= 10000, size  # what it can read: the locked directory is not
        assert remove_tree(jobs, 7) >= size

    _as(nobody.pw_uid, nobody.pw_gid, build)
    _as(nobody.pw_uid, nobody.pw_gid, remove)
    assert not (jobs / "7").exists()
    assert (outside / "precious").read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


def test_removal_as_root_keeps_link_targets(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    jobs = tmp_path / "jobs"
    (jobs / "3").mkdir(parents=True)
    _plant(jobs / "3", outside)
    size = tree_bytes(jobs, 3)
    assert size >= 10000
    assert remove_tree(jobs, 3) == size
    assert not (jobs / "3").exists() and (outside / "precious").read_text() == "keep me"
    assert remove_tree(jobs, 3) == 0  # already gone: nothing to do


# -- the collector ------------------------------------------------------------------------------


def _old_final_job(led: Ledger, jobs_dir: Path, ended: float) -> int:
    jid = finished_job(led, "alice", (("G0", "h100"),), [(ended - 30, ended)])
    (jobs_dir / str(jid)).mkdir(parents=True)
    (jobs_dir / str(jid) / "output.log").write_bytes(b"y" * 5000)
    return jid


async def test_collector_respects_ages_the_cap_and_active_jobs(tmp_path: Path) -> None:
    now = BASE + 100 * DAY
    cfg = load_config(
        env={},
        data_dir=str(tmp_path),
        retention_job_dirs="7d",
        retention_jobs="30d",
        retention_max_bytes="20K",
    )
    cfg.jobs_dir.mkdir()
    lt = LedgerThread(cfg.ledger_path)
    try:
        ancient = await lt.call(_old_final_job, cfg.jobs_dir, now - 40 * DAY)  # both go
        week = await lt.call(_old_final_job, cfg.jobs_dir, now - 10 * DAY)  # dir goes
        fresh = [await lt.call(_old_final_job, cfg.jobs_dir, now - k * 3600) for k in (5, 4, 3)]
        just_now = await lt.call(_old_final_job, cfg.jobs_dir, now - 10)
        _, (running,) = await lt.call(lambda led: led.submit([new_job()], b"f", now=now - 50 * DAY))
        await lt.call(lambda led: led.advance(running, [Step(ST)], now=now - 50 * DAY))
        (cfg.jobs_dir / str(running)).mkdir()
        (cfg.jobs_dir / str(running) / "big").write_bytes(b"z" * 40000)
        (cfg.jobs_dir / "notes").mkdir()  # not a job's: never touched
        (cfg.jobs_dir / "0099").mkdir()

        r = Retention(cfg, lt)
        dry = await r.collect(dry_run=True, now=now)
        assert (dry.job_dirs, dry.jobs, dry.over_cap_dirs) == (5, 1, 3)
        assert (cfg.jobs_dir / str(ancient)).exists()  # a dry run removes nothing
        done = await r.collect(now=now)
        assert (done.job_dirs, done.jobs, done.events) == (5, 1, 4)
        assert done.job_dir_bytes == dry.job_dir_bytes and done.errors == []
        left = sorted(p.name for p in cfg.jobs_dir.iterdir())
        # Over the cap, finished ones go oldest first; the running job's directory and
        # the one that ended seconds ago stay, even though the cap is still exceeded.
        assert left == sorted(["notes", "0099", str(running), str(just_now)])
        assert done.jobs_dir_bytes is not None and done.jobs_dir_bytes > 20 * 1024
        jobs = {j.id for j in await lt.call(lambda led: led.list_jobs(limit=100))}
        assert jobs == {week, *fresh, just_now, running}
        again = await r.collect(now=now)
        assert (again.job_dirs, again.jobs) == (0, 0)
    finally:
        lt.close()


async def test_orphaned_directories_of_removed_jobs_go(tmp_path: Path) -> None:
    now = BASE + 100 * DAY
    cfg = load_config(env={}, data_dir=str(tmp_path))
    cfg.jobs_dir.mkdir()
    lt = LedgerThread(cfg.ledger_path)
    try:
        jid = await lt.call(_old_final_job, cfg.jobs_dir, now - 95 * DAY)
        await lt.call(prune, now - 90 * DAY)  # rows gone, the directory left (a crash)
        (cfg.jobs_dir / str(jid + 1000)).mkdir()  # a job this ledger never knew: kept
        done = await Retention(cfg, lt).collect(now=now)
        assert done.job_dirs == 1 and not (cfg.jobs_dir / str(jid)).exists()
        assert (cfg.jobs_dir / str(jid + 1000)).exists()
    finally:
        lt.close()


class _Host:
    """The two things retention needs of a daemon."""

    def __init__(self, config: object, ledger: object) -> None:
        self.config, self.ledger = config, ledger


async def test_the_daemon_collects_by_itself(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = load_config(env={}, data_dir=str(tmp_path), retention_interval="10m")
    cfg.jobs_dir.mkdir()
    lt = LedgerThread(cfg.ledger_path)
    try:
        jid = await lt.call(_old_final_job, cfg.jobs_dir, time.time() - 8 * DAY)
        host = _Host(config=cfg, ledger=lt)
        async with trio.open_nursery() as n:
            n.start_soon(run, host)
            await trio.sleep(59)
            assert (cfg.jobs_dir / str(jid)).exists()
            await trio.sleep(2)
            # The collection runs in threads, in real time: wait for it in real time.
            gone = cfg.jobs_dir / str(jid)
            await trio.to_thread.run_sync(lambda: wait_for(lambda: not gone.exists(), 30))
            n.cancel_scope.cancel()
    finally:
        lt.close()


# -- settings -----------------------------------------------------------------------------------


def test_retention_settings_are_validated() -> None:
    cfg = load_config(env={})
    assert (
        cfg.retention_job_dirs,
        cfg.retention_jobs,
        cfg.retention_max_bytes,
        cfg.retention_interval,
    ) == (7 * DAY, 90 * DAY, None, 600.0)
    cfg = load_config(
        env={
            "GPUD_RETENTION_JOBS": "none",
            "GPUD_RETENTION_MAX_BYTES": "20G",
            "GPUD_RETENTION_INTERVAL": "0",
        }
    )
    assert (cfg.retention_jobs, cfg.retention_max_bytes, cfg.retention_interval) == (
        None,
        20 * 1024**3,
        None,
    )
    bad = {
        "-3d": "retention_job_dirs = '-3d' is not valid",
        "7 fortnights": "retention_job_dirs = '7 fortnights' is not valid",
        "10s": "too short",
    }
    for value, words in bad.items():
        with pytest.raises(ConfigError, match=words):
            load_config(env={"GPUD_RETENTION_JOB_DIRS": value})
    with pytest.raises(ConfigError, match="retention_jobs .1d. is shorter than retention_"):
        load_config(env={"GPUD_RETENTION_JOBS": "1d"})
    with pytest.raises(ConfigError, match="shorter than retention_job_dirs .none."):
        load_config(env={"GPUD_RETENTION_JOB_DIRS": "none"})
    with pytest.raises(ConfigError, match="retention_max_bytes = '12 parsecs' is not valid"):
        load_config(env={"GPUD_RETENTION_MAX_BYTES": "12 parsecs"})
    with pytest.raises(ConfigError, match="retention_max_bytes = '-5' is not valid"):
        load_config(env={"GPUD_RETENTION_MAX_BYTES": "-5"})


# -- end to end ---------------------------------------------------------------------------------

NAP = textwrap.dedent("""
    import time

    def nap(seconds: float) -> str:
        time.sleep(seconds)
        return "rested"
""")


def _age(d: DaemonProc, ids: list[int], seconds: float) -> None:
    """Move these jobs' times back (as if they ran that long ago)."""
    conn = sqlite3.connect(d.data_dir / "ledger.db", timeout=10)
    try:
        with conn:
            for i in ids:
                conn.execute(
                    "UPDATE jobs SET submitted_at = submitted_at - ?, started_at = "
                    "started_at - ?, ended_at = ended_at - ? WHERE id = ?",
                    (seconds, seconds, seconds, i),
                )
                conn.execute(
                    "UPDATE attempts SET started_at = started_at - ?, ended_at = "
                    "ended_at - ?, launched_at = launched_at - ? WHERE job_id = ?",
                    (seconds, seconds, seconds, i),
                )
                conn.execute(
                    "UPDATE gpu_usage SET started_at = started_at - ?, ended_at = "
                    "ended_at - ? WHERE job_id = ?",
                    (seconds, seconds, i),
                )
    finally:
        conn.close()


def test_gpud_gc_end_to_end(process_daemon: DaemonProc, tmp_path: Path) -> None:
    d, env = process_daemon, process_daemon.client_env()
    script = tmp_path / "nap.py"
    script.write_text(NAP)
    os.chmod(tmp_path, 0o755)
    os.chmod(script, 0o644)

    def run(*args: str) -> int:
        out = gpud_cli("run", "-d", *args, env=env)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    # On a GPU for a while: usage keeps tenths of a second, and a bare square takes less.
    done = [run(f"{script}::nap", "--seconds", "0.3", "--gpu", "h100") for _ in (2, 3)]
    done += [run("examples/hello.py::square", "--x", "4")]
    middle = run("examples/hello.py::square", "--x", "5")
    for j in [*done, middle]:
        assert gpud_cli("logs", str(j), "-f", env=env).returncode == 0
    running = run(f"{script}::nap", "--seconds", "120")
    wait_for(
        lambda: (
            json.loads(gpud_cli("ps", "--json", env=env).stdout or "[]")[0]["state"] == "running"
        ),
        30,
    )
    _age(d, done + [running], 100 * DAY)  # records and directories past retention
    _age(d, [middle], 10 * DAY)  # its directory is past retention_job_dirs, its record not
    until = time.time()  # a fixed window: the running job's wall time grows meanwhile

    def usage() -> list[object]:
        with Client(d.url) as c:
            return [
                msgspec.to_builtins(c.usage(since=0.0, until=until, by=by))
                for by in ("user", "day", "gpu-type")
            ]

    before = usage()
    assert before[0]["total"]["gpu_seconds"] > 0  # type: ignore[index]
    assert before[0]["total"]["jobs"] == 5  # type: ignore[index]

    dry = gpud_cli("gc", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    r = json.loads(dry.stdout)
    assert r["dry_run"] and (r["job_dirs"], r["jobs"]) == (4, 3) and r["job_dir_bytes"] > 0
    assert all((d.data_dir / "jobs" / str(j)).exists() for j in done)
    words = gpud_cli("gc", "--dry-run", env=env)
    assert "would remove 4 finished jobs' directories" in words.stderr

    out = gpud_cli("gc", env=env)
    assert out.returncode == 0, out.stderr
    assert "removed 4 finished jobs' directories" in out.stderr
    assert "removed the records of 3 jobs" in out.stderr
    assert not any((d.data_dir / "jobs" / str(j)).exists() for j in [*done, middle])
    assert (d.data_dir / "jobs" / str(running)).exists()  # not final: untouched
    assert usage() == before
    shown = gpud_cli("usage", "--since", "2000-01-01", env=env)
    assert shown.returncode == 0 and "TOTAL" in shown.stdout

    for cmd in ("logs", "result"):
        gone = gpud_cli(cmd, str(done[0]), env=env)
        assert gone.returncode == 1 and "removed by retention" in gone.stderr, gone.stderr
        half = gpud_cli(cmd, str(middle), env=env)
        assert half.returncode == 1, half.stderr
        assert (
            f"job {middle}'s directory (its log and result) was removed by retention" in half.stderr
        )
    shown = json.loads(gpud_cli("ps", "--all", "--json", env=env).stdout)
    assert {j["id"] for j in shown} == {middle, running}
    gpud_cli("cancel", str(running), env=env)
    assert "Traceback" not in d.log.read_text()


async def test_only_admins_run_gc(served_tcp, base_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data = served_tcp.daemon.config.data_dir
    token = add_gpud_user(data, f"user_{os.getpid()}")
    admin = add_gpud_user(data, f"boss_{os.getpid()}", admin=True)
    async with httpx.AsyncClient(base_url=served_tcp.tcp, timeout=30) as c:
        r = await c.post(
            "/v1/admin/gc", json={"dry_run": True}, headers={"authorization": f"Bearer {token}"}
        )
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert "only admins run gc" in r.json()["detail"]
        r = await c.post(
            "/v1/admin/gc",
            json={"dry_run": True, "force": 1},
            headers={"authorization": f"Bearer {admin}"},
        )
        assert r.status_code == 422, r.text
        r = await c.post("/v1/admin/gc", headers={"authorization": f"Bearer {admin}"})
        assert r.status_code == 200 and r.json()["dry_run"] is False
    env = dict(os.environ, GPUD_URL=served_tcp.tcp, GPUD_TOKEN=token)
    out = await trio.to_thread.run_sync(lambda: gpud_cli("gc", env=env))
    assert out.returncode == 1 and "only admins run gc" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_window_inside_a_rolled_up_hour_counts_it_pro_rata() -> None:
    from gpud.ledger.usage import UsageBucket

    h = 3600 * 100
    b = [
        UsageBucket("alice", h, "*", 2, 3, 36000, 72000),
        UsageBucket("alice", h, "h100", 2, 3, 36000, 72000),
    ]
    half = report([], since=h + 1800, until=h + 7200, buckets=b)
    assert (half.total.gpu_seconds, half.total.wall_seconds) == (3600.0, 1800.0)
    assert (half.total.job_count, half.total.attempts) == (0, 0)  # counted where it began
    whole = report([], since=h, until=h + 3600, by="gpu-type", buckets=b)
    assert [(x.key, x.job_count, x.attempts, x.gpu_seconds) for x in whole.lines] == [
        ("h100", 2, 3, 7200.0)
    ]
    assert (whole.total.job_count, whole.total.wall_seconds) == (2, 3600.0)
