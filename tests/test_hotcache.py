"""The warm-call path's caches (gpud.daemon.hotcache, #12): bounded, shared function bytes
counted once, a final job served only for a while after its end."""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import pytest

from gpud import interpreters
from gpud.daemon.hotcache import (
    FINAL_TTL,
    FREEZE_AT,
    FrozenHeap,
    RecentFinal,
    RecentPayloads,
    gc_quiet,
)
from gpud.domain import Job, JobState
from gpud.interpreters import fingerprint


def test_payloads_are_taken_once_and_a_shared_function_is_counted_once() -> None:
    cache = RecentPayloads(max_bytes=1000, max_count=10)
    function = b"f" * 300
    for i in range(1, 4):
        cache.put(i, function, b"a" * 10)
    assert len(cache) == 3 and cache.size == 300 + 3 * 10
    assert cache.pop(2) == (function, b"a" * 10)
    assert cache.pop(2) is None  # taken: a second start (a retry) reads the ledger
    assert cache.size == 300 + 2 * 10
    cache.pop(1)
    cache.pop(3)
    assert len(cache) == 0 and cache.size == 0  # the function went with its last job


def test_payloads_drop_the_oldest_beyond_their_bounds() -> None:
    cache = RecentPayloads(max_bytes=100, max_count=3)
    for i in range(1, 6):
        cache.put(i, bytes([i]) * 10, b"x" * 10)  # a function of its own each: 20 bytes
    assert len(cache) == 3  # by count
    assert cache.pop(1) is None and cache.pop(2) is None
    assert cache.pop(5) == (b"\x05" * 10, b"x" * 10)
    big = RecentPayloads(max_bytes=50, max_count=10)
    big.put(1, b"f" * 30, b"a" * 10)
    big.put(2, b"g" * 30, b"a" * 10)  # 80 bytes: the oldest goes
    assert big.pop(1) is None and big.pop(2) is not None and big.size == 0
    big.put(3, b"h" * 60, b"")  # never fits: not kept at all
    assert len(big) == 0 and big.size == 0


def _ended(job_id: int, at: float) -> Job:
    return Job(job_id, "f", JobState.SUCCEEDED, submitted_at=at - 1, ended_at=at)


def test_a_final_job_is_served_for_a_while_after_its_end_only() -> None:
    cache = RecentFinal(max_count=2)
    cache.put(_ended(1, 100.0))
    assert cache.get(1, 100.5) == _ended(1, 100.0)
    assert cache.get(1, 100.0 + FINAL_TTL + 1) is None  # retention never races it
    assert cache.get(2, 100.5) is None
    cache.put(_ended(2, 101.0))
    cache.put(_ended(3, 102.0))
    assert cache.get(1, 102.0) is None and cache.get(3, 102.0) is not None  # bounded
    running = Job(4, "f", JobState.SUCCEEDED, submitted_at=1.0)  # no end time: not served
    cache.put(running)
    assert cache.get(4, 2.0) is None


def test_a_site_listing_is_reused_only_while_its_directory_is_unchanged(tmp_path: Path) -> None:
    """The interpreter check of a submit keeps a site directory's listing while the
    directory's mtime is unchanged (#12); a directory changed within the last 2 s is
    listed again every time (two changes in one clock tick keep one mtime)."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "a-1.0.dist-info").mkdir()
    python = sys.executable
    old = time.time() - 60
    os.utime(site, (old, old))
    first = fingerprint(python, (str(site),))
    assert str(site) in interpreters._listings  # settled: kept
    assert fingerprint(python, (str(site),)) == first
    (site / "b-2.0.dist-info").mkdir()  # pip install: the directory's mtime moves
    second = fingerprint(python, (str(site),))
    assert second != first
    (site / "c-3.0.dist-info").mkdir()  # at once again, maybe within the same tick
    third = fingerprint(python, (str(site),))
    assert third not in (first, second)
    (site / "__pycache__").mkdir()  # a first import: not a change of what is installed
    assert fingerprint(python, (str(site),)) == third


def test_the_cyclic_gc_is_off_while_a_big_batch_is_built_and_back_after() -> None:
    """gc_quiet (#12): off for a batch of FREEZE_AT jobs or more, nested, and on again
    however the outermost ends; a small batch leaves it alone. FrozenHeap freezes after
    a big batch's filing and gives the objects back once the queue drains."""
    assert gc.isenabled()
    with gc_quiet(FREEZE_AT - 1):
        assert gc.isenabled()
    with pytest.raises(KeyError), gc_quiet(FREEZE_AT):
        assert not gc.isenabled()
        with gc_quiet(FREEZE_AT):
            assert not gc.isenabled()
        assert not gc.isenabled()
        raise KeyError("the submit failed")
    assert gc.isenabled()
    heap = FrozenHeap(at=100)
    heap.filed(99)
    assert not heap.frozen and gc.get_freeze_count() == 0
    try:
        heap.filed(100)
        assert heap.frozen and gc.get_freeze_count() > 0
        heap.drained(10)
        assert heap.frozen  # 10 left: not below a tenth of 100 yet
        heap.drained(9)
        assert not heap.frozen and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
