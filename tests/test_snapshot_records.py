"""Snapshot bookkeeping without Podman: keys, the ledger's states and failure counting,
class setup order, and snapshot=True on the process executor (issue #4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import gpud_client as gpud
from gpud.ledger import Ledger
from gpud.ledger import snapshots as store
from gpud_client import Client
from snapshots import describe_change, key_of, key_parts

from .conftest import DaemonProc


def _parts(**over: object) -> dict[str, str]:
    base: dict[str, object] = dict(
        code_hash="c1",
        image="img",
        image_id="sha1",
        python="3.11.2",
        gpus="",
        driver="none",
        gpud_version="0.1.0",
        owner="ann",
        env={},
        memory=None,
        cpus=None,
        container="v",
    )
    base.update(over)
    return key_parts(**base)  # type: ignore[arg-type]


def test_every_part_of_the_key_matters_and_changes_are_named() -> None:
    a = _parts()
    assert key_of(a) == key_of(_parts())
    for field, value in [
        ("code_hash", "c2"),
        ("image_id", "sha2"),
        ("gpus", "h100"),
        ("driver", "580"),
        ("owner", "bob"),
        ("env", {"A": "1"}),
        ("memory", 2**30),
        ("container", "w"),
        ("gpud_version", "0.2"),
    ]:
        assert key_of(_parts(**{field: value})) != key_of(a), field
    assert describe_change(a, _parts(code_hash="c2")) == "the function's code changed"
    assert (
        describe_change(a, _parts(code_hash="c2", image_id="x"))
        == "the function's code and the image's content changed"
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


def _claim(ledger: Ledger, key: str = "k", job: int = 1) -> bool:
    return store.claim_take(
        ledger, key, {"code": "c"}, function="f", owner="ann", image="img", job_id=job, now=1.0
    )


def test_one_take_per_key_and_failures_are_bounded(ledger: Ledger) -> None:
    assert _claim(ledger) and not _claim(ledger, job=2)  # the second call does not take
    store.mark_ready(ledger, "k", "img1", 100, 2.0)
    assert not _claim(ledger, job=3)  # ready: restore, do not re-take
    # Taken fine, never restores: re-taken, but only max_failures times.
    for n in (1, 2):
        assert store.record_failure(ledger, "k", f"bad {n}", 3) == "retry"
        assert _claim(ledger, job=10 + n)
        store.mark_ready(ledger, "k", f"img{n + 1}", 100, 3.0)
    assert store.record_failure(ledger, "k", "bad 3", 3) == "failed"
    assert not _claim(ledger, job=20)
    [s] = store.list_snapshots(ledger)
    assert (s.state, s.failures, s.last_error, s.location) == ("failed", 3, "bad 3", None)


def test_a_good_restore_resets_failures(ledger: Ledger) -> None:
    _claim(ledger)
    store.mark_ready(ledger, "k", "img", 10, 1.0)
    store.record_failure(ledger, "k", "once", 3)
    _claim(ledger, job=2)
    store.mark_ready(ledger, "k", "img2", 10, 2.0)
    store.record_restore(ledger, "k", 5.0)
    s = store.get_snapshot(ledger, "k")
    assert s is not None and (s.failures, s.restores, s.last_used) == (0, 1, 5.0)


def test_an_abandoned_take_lets_the_next_call_try(ledger: Ledger) -> None:
    _claim(ledger)
    store.abandon_take(ledger, "k")  # the user's setup raised: not the snapshot's fault
    assert store.get_snapshot(ledger, "k") is None and _claim(ledger, job=2)


def test_interrupted_takes_are_retried(ledger: Ledger) -> None:
    _claim(ledger)
    store.interrupted_takes(ledger)
    s = store.get_snapshot(ledger, "k")
    assert s is not None and s.state == "retry" and "stopped" in (s.last_error or "")


# -- class setup order ----------------------------------------------------------------------


@gpud.App("order").cls(snapshot=True)
class Ordered:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @gpud.enter()
    def plain(self) -> None:
        self.seen.append("plain")

    @gpud.enter(snap=True)
    def snapped(self) -> None:
        self.seen.append("snap")

    @gpud.method()
    def get(self) -> list[str]:
        return self.seen


def test_snap_setup_runs_first_and_once() -> None:
    assert Ordered.local().seen == ["snap", "plain"]
    from gpud_client.clsrun import make_method_call

    call = make_method_call(Ordered._cls, "get", Ordered._enter, (), {})
    call.__gpud_snap__()  # what a snapshot-taking worker runs before its checkpoint
    call.__gpud_snap__()
    assert call() == ["snap", "plain"] and call() == ["snap", "plain"]


# -- the process executor -------------------------------------------------------------------


def where(x: int) -> dict:
    return {"x": x, "job": os.environ["GPUD_JOB_ID"]}


def test_snapshot_true_runs_on_the_process_executor(process_daemon: DaemonProc) -> None:
    f = gpud.function(where, snapshot=True).with_options(url=process_daemon.url)
    h = f.spawn(2)
    assert h.get(timeout=60) == {"x": 2, "job": str(h.id)}
    info = h.status()
    assert info.snapshot and info.start_kind == "cold"
    with Client(process_daemon.url) as c:
        reason = next(e.reason for e in c.events(job_id=h.id).events if e.to_state == "running")
        lst = c.snapshots()
    assert "snapshots need the Podman executor" in (reason or "")
    assert lst.snapshots == [] and lst.note and "podman" in lst.note


def test_concurrent_failed_restores_of_one_snapshot_count_once(ledger: Ledger) -> None:
    _claim(ledger)
    store.mark_ready(ledger, "k", "/snaps/k.1", 10, 1.0)
    # Three restores of the same (damaged) snapshot fail at once: one failure.
    states = [store.record_failure(ledger, "k", "bad", 3, "/snaps/k.1") for _ in range(3)]
    assert states == ["retry", "retry", "retry"]
    s = store.get_snapshot(ledger, "k")
    assert s is not None and s.failures == 1 and s.location is None
