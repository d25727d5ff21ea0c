"""Container snapshots (issue #4), against real Podman and CRIU: take, restore N at once,
fall back from a corrupted or missing snapshot, invalidate on a code change, and keep
checkpoint images under snapshot_max_bytes."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpud_client as gpud
from gpud_client import Client

from .conftest import DaemonProc, _run_daemon, executor_env, gpud_cli, make_base_dir


@pytest.fixture(scope="module")
def sdaemon() -> Iterator[DaemonProc]:
    # A damaged snapshot can hang CRIU: give up on a restore sooner than by default.
    env = {**executor_env("podman"), "GPUD_SNAPSHOT_RESTORE_TIMEOUT": "8"}
    base = make_base_dir()
    try:
        yield from _run_daemon(base, env)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _snapshots(d: DaemonProc) -> list:
    with Client(d.url) as c:
        return c.snapshots().snapshots


def _of(d: DaemonProc, function: str) -> list:
    return [s for s in _snapshots(d) if s.function == function]


def _kind(h: gpud.JobHandle) -> str | None:
    return h.status().start_kind


def _running_reason(d: DaemonProc, job_id: int) -> str:
    with Client(d.url) as c:
        events = c.events(job_id=job_id).events
    return next(e.reason for e in events if e.to_state == "running")


def _location(d: DaemonProc, snapshot_id: int) -> Path:
    """Where a snapshot's files are, from the ledger (the API does not show it)."""
    import sqlite3

    db = sqlite3.connect(d.data_dir / "ledger.db")
    try:
        (image,) = db.execute(
            "SELECT location FROM snapshots WHERE id = ?", (snapshot_id,)
        ).fetchone()
    finally:
        db.close()
    return Path(image)


# -- a class whose setup is in the snapshot -------------------------------------------------

app = gpud.App("snaptest")


@app.cls(snapshot=True, keep_warm=30)
class Model:
    def __init__(self, marks: str) -> None:
        self.marks = marks

    @gpud.enter(snap=True)
    def load(self) -> None:
        import random

        with open(self.marks, "a") as fh:  # one line per time setup runs
            fh.write(f"setup {os.getpid()}\n")
        self.token = random.random()
        self.table = [i * i for i in range(200_000)]  # state built by computation

    @gpud.enter()
    def connect(self) -> None:  # runs in every container, after a restore too
        import uuid

        self.container = str(uuid.uuid4())

    @gpud.method()
    def lookup(self, i: int, hold: float = 0.0) -> dict:
        time.sleep(hold)
        return {
            "token": self.token,
            "value": self.table[i],
            "container": self.container,
            "job": os.environ["GPUD_JOB_ID"],
        }


def test_restores_many_from_one_snapshot_without_running_setup_again(
    sdaemon: DaemonProc, shared_dir: Path
) -> None:
    marks = shared_dir / "marks"
    model = Model(str(marks))  # type: ignore[call-arg]
    lookup = model.lookup.with_options(url=sdaemon.url)
    first = lookup.spawn(3)
    out = first.get(timeout=180)
    assert out["value"] == 9 and _kind(first) == "cold"
    assert "taking its snapshot" in _running_reason(sdaemon, first.id)
    [snap] = _of(sdaemon, "snaptest.Model.lookup")
    assert snap.state == "ready" and snap.size > 0 and snap.taken_by == first.id

    # Three at once, each holding its container a while: the one warm container takes
    # one of them (or none, if it is still busy), the others are restored.
    calls = [lookup.spawn(i, hold=2.0) for i in (10, 20, 30, 40)]
    results = [h.get(timeout=180) for h in calls]
    kinds = [_kind(h) for h in calls]
    assert [r["value"] for r in results] == [100, 400, 900, 1600]  # each its own input
    assert [r["job"] for r in results] == [str(h.id) for h in calls]
    assert all(r["token"] == out["token"] for r in results)  # setup's state, restored
    assert kinds.count("restored") >= 3, kinds
    restored = [r for r, k in zip(results, kinds, strict=True) if k == "restored"]
    assert len({r["container"] for r in restored}) == len(restored)  # one container each
    assert marks.read_text().count("setup") == 1, marks.read_text()  # setup ran once
    assert _of(sdaemon, "snaptest.Model.lookup")[0].restores >= 3

    # A later call is served warm, by a container that already ran one.
    again = lookup.spawn(5)
    r = again.get(timeout=60)
    assert _kind(again) == "warm" and r["value"] == 25
    assert r["container"] in {x["container"] for x in [out, *results]}
    assert marks.read_text().count("setup") == 1

    # gpud snapshots shows it, as a table and as JSON.
    env = {**os.environ, "GPUD_URL": sdaemon.url}
    p = gpud_cli("snapshots", env=env)
    assert p.returncode == 0, p.stderr
    assert "snaptest.Model.lookup" in p.stdout and "ready" in p.stdout
    p = gpud_cli("snapshots", "--json", env=env)
    rows = json.loads(p.stdout)["snapshots"]
    assert any(s["function"] == "snaptest.Model.lookup" and s["restores"] >= 3 for s in rows)


# -- plain functions: fallback and invalidation ---------------------------------------------


def v1(x: int) -> str:
    return f"v1:{x}"


def v2(x: int) -> str:
    return f"v2:{x}"


def tagged(tag: str):  # type: ignore[no-untyped-def]
    """A function of its own (its code hash differs by tag): snapshots are keyed by code,
    not by name, so tests that must not share one use different tags."""

    def f(x: int) -> str:
        return f"{tag}:{x}"

    return f


def _plain(d: DaemonProc, f: object, name: str) -> gpud.Function:
    return gpud.function(f, snapshot=True, name=name).with_options(url=d.url)  # type: ignore


def test_changed_code_invalidates_the_snapshot(sdaemon: DaemonProc) -> None:
    one = _plain(sdaemon, v1, "calc")
    h = one.spawn(1)
    assert h.get(timeout=180) == "v1:1" and _kind(h) == "cold"
    h = one.spawn(2)
    assert h.get(timeout=60) == "v1:2" and _kind(h) == "restored"
    [old] = _of(sdaemon, "calc")
    old_files = _location(sdaemon, old.id)

    two = _plain(sdaemon, v2, "calc")  # same function, new code
    h = two.spawn(3)
    assert h.get(timeout=180) == "v2:3" and _kind(h) == "cold"
    [new] = _of(sdaemon, "calc")
    assert new.id != old.id and new.state == "ready"
    assert not old_files.exists()  # the old snapshot's files are gone
    h = two.spawn(4)
    assert h.get(timeout=60) == "v2:4" and _kind(h) == "restored"


def corrupt(where: Path) -> None:
    """Damage a snapshot: truncate CRIU's memory page dumps."""
    pages = list(where.glob("pages-*.img"))
    assert pages, f"no page dumps in {where}"
    for p in pages:
        with open(p, "r+b") as fh:
            fh.truncate(100)


def missing(where: Path) -> None:
    shutil.rmtree(where)


@pytest.mark.parametrize("damage", [corrupt, missing])
def test_a_broken_snapshot_falls_back_to_cold_and_says_why(
    sdaemon: DaemonProc, damage: object
) -> None:
    name = f"broken-{damage.__name__}"  # type: ignore[attr-defined]
    f = _plain(sdaemon, tagged(name), name)
    assert f.remote(1) == f"{name}:1"
    [snap] = _of(sdaemon, name)
    damage(_location(sdaemon, snap.id))  # type: ignore[operator]

    h = f.spawn(2)
    assert h.get(timeout=180) == f"{name}:2"  # the call itself is fine
    assert _kind(h) == "cold"
    reason = _running_reason(sdaemon, h.id)
    assert "could not be restored" in reason and "taking a new one" in reason, reason
    [after] = _of(sdaemon, name)
    assert after.failures == 1 and after.last_error and after.state == "ready"
    assert "restore failed" in after.last_error, after.last_error
    if damage is missing:
        assert "gone" in after.last_error
    # The cold start took a new snapshot, and it restores.
    h = f.spawn(3)
    assert h.get(timeout=60) == f"{name}:3" and _kind(h) == "restored"
    assert _of(sdaemon, name)[0].failures == 0


def test_snapshots_rm(sdaemon: DaemonProc) -> None:
    f = _plain(sdaemon, tagged("rm"), "to-remove")
    assert f.remote(1) == "rm:1"
    [snap] = _of(sdaemon, "to-remove")
    files = _location(sdaemon, snap.id)
    env = {**os.environ, "GPUD_URL": sdaemon.url}
    p = gpud_cli("snapshots", "rm", str(snap.id), env=env)
    assert p.returncode == 0, p.stderr
    assert _of(sdaemon, "to-remove") == [] and not files.exists()
    p = gpud_cli("snapshots", "rm", "999999", env=env)
    assert p.returncode != 0 and "no snapshot 999999" in p.stderr
    h = f.spawn(2)  # the next call takes a new one
    assert h.get(timeout=180) == "rm:2" and _kind(h) == "cold"
    assert len(_of(sdaemon, "to-remove")) == 1


# -- garbage collection ---------------------------------------------------------------------


def test_snapshots_stay_under_the_budget(base_dir: Path) -> None:
    # A snapshot of a small function is 8.5-11 MB (8.5 since the job runtime is compiled
    # at install, #12): a budget of 22 MiB holds two, not three.
    budget = 22 * 2**20
    env = {**executor_env("podman"), "GPUD_SNAPSHOT_MAX_BYTES": str(budget)}
    for d in _run_daemon(base_dir, env):
        fns = [_plain(d, tagged(f"gc-{i}"), f"gc-{i}") for i in range(3)]
        for i, f in enumerate(fns):
            assert f.remote(i) == f"gc-{i}:{i}"
            time.sleep(0.05)
        lst = Client(d.url).snapshots()
        ready = [s for s in lst.snapshots if s.state == "ready"]
        assert lst.used_bytes <= budget, lst
        assert ready and ready[-1].function == "gc-2"  # the newest stays
        # What the test rests on: two snapshots fit in the budget, three do not.
        assert budget / 3 < ready[-1].size <= budget / 2, ready[-1]
        assert len(ready) < 3  # the least recently used went
        on_disk = sorted(p.name for p in (d.data_dir / "snapshots").iterdir())
        assert on_disk == sorted(_location(d, s.id).name for s in ready)


# -- restarts ---------------------------------------------------------------------------


def sleeper(x: float) -> float:
    time.sleep(x)
    return x


def test_a_job_in_a_restored_container_survives_a_daemon_restart(base_dir: Path) -> None:
    for d in _run_daemon(base_dir, executor_env("podman")):
        f = _plain(d, sleeper, "sleeper")
        assert f.remote(0.0) == 0.0  # takes the snapshot
        h = f.spawn(6.0)
        deadline = time.monotonic() + 60
        while h.status().state != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _kind(h) == "restored"
        d.stop()  # the job runs on in its container (labelled with the taker's job)
        d.start()
        assert h.get(timeout=120) == 6.0
        info = h.status()
        assert info.state == "succeeded" and info.attempt == 1


# -- setup that fails or runs out of time ----------------------------------------------------

broken_app = gpud.App("snapsetup")


@broken_app.cls(snapshot=True)
class Fragile:
    def __init__(self, wait: float) -> None:
        self.wait = wait

    @gpud.enter(snap=True)
    def load(self) -> None:
        time.sleep(self.wait)
        if self.wait == 0:
            raise ValueError("no model here")

    @gpud.method()
    def run(self) -> str:
        return "ran"


def test_failing_setup_is_the_jobs_error_and_takes_no_snapshot(sdaemon: DaemonProc) -> None:
    run = Fragile(0.0).run.with_options(url=sdaemon.url)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="no model here"):
        run.remote()
    assert _of(sdaemon, "snapsetup.Fragile.run") == []  # the next call tries again
    with pytest.raises(ValueError, match="no model here"):
        run.remote()
    assert _of(sdaemon, "snapsetup.Fragile.run") == []


def test_a_job_timed_out_in_its_setup_leaves_no_half_taken_snapshot(sdaemon: DaemonProc) -> None:
    run = Fragile(60.0).run.with_options(url=sdaemon.url, timeout=4)  # type: ignore
    h = run.spawn()
    info = h.wait(timeout=120)
    assert info.state == "timed_out", info
    assert _of(sdaemon, "snapsetup.Fragile.run") == []  # not left "taking"
