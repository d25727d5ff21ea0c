"""Parking idle warm workers (#13 item 2), end to end: a real daemon subprocess on fake GPUs,
whose fake CUDA checkpointer (gpud.testing.fake_cudackpt, shaped by GPUD_FAKE_CKPT_*) runs
the real checkpoint logic over real worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import gpud_client as gpud
from gpud_client import Client

from . import test_clock
from .conftest import DaemonProc, _run_daemon, make_base_dir
from .test_clock import _body, _pid, _run

GIB = 1024**3
#: the in-process daemon on an injected clock (a fixture of tests/test_clock.py)
clocked = test_clock.clocked
_calls = 0


def model(tag: str) -> dict:
    """A warm function with in-memory state: how often this process ran it."""
    import os

    global _calls
    _calls += 1
    return {
        "pid": os.getpid(),
        "calls": _calls,
        "gpus": os.environ["CUDA_VISIBLE_DEVICES"],
        "tag": tag,
    }


def other(seconds: float) -> str:
    import os
    import time

    time.sleep(seconds)
    return os.environ["CUDA_VISIBLE_DEVICES"]


@contextlib.contextmanager
def _daemon(**env: str) -> Iterator[DaemonProc]:
    base = make_base_dir()
    try:
        yield from _run_daemon(base, env)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def one_gpu() -> Iterator[DaemonProc]:
    with _daemon(GPUD_FAKE_GPUS="h100", GPUD_PARK_MAX_BYTES="1.5GiB") as d:
        yield d


def _fn(d: DaemonProc, f: Callable[..., object], **options: object) -> gpud.Function:
    return gpud.function(f, **options).with_options(url=d.url)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _until(pred: Callable[[], object], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _parked(d: DaemonProc) -> list:  # type: ignore[type-arg]
    with Client(d.url) as c:
        return list(c.gpus().parked)


def test_idle_worker_is_parked_and_its_next_call_unparks_it(one_gpu: DaemonProc) -> None:
    warm = _fn(one_gpu, model, keep_warm=600, gpu="h100")
    h1 = warm.spawn("load")
    first = h1.get(timeout=30)
    # Another job needs the only H100, held by the idle worker: the worker is parked,
    # not ended, and the job runs on that GPU at once.
    needy = _fn(one_gpu, other, gpu="h100")
    assert needy.remote(0) == first["gpus"]
    assert _alive(first["pid"])
    parked = _parked(one_gpu)
    assert [(p.job_id, p.owner, p.bytes, p.gpus) for p in parked] == [
        (h1.id, h1.status().owner, GIB, [0])
    ]  # the fake's 1 GiB per CUDA process
    assert parked[0].function.endswith("model")
    out = subprocess.run(
        [sys.executable, "-m", "gpud", "gpus"],
        capture_output=True,
        text=True,
        env=one_gpu.client_env(),
        timeout=30,
    )
    assert "parked warm workers: 1, 1.0 GiB in host memory of 1.5 GiB" in out.stdout
    assert f"(job {h1.id}," in out.stdout
    ps = subprocess.run(
        [sys.executable, "-m", "gpud", "ps"],
        capture_output=True,
        text=True,
        env=one_gpu.client_env(),
        timeout=30,
    )
    assert "parked warm workers: 1, 1.0 GiB in host memory" in ps.stdout, ps
    assert f"worker {parked[0].worker_id}: " in ps.stdout and "from GPU 0" in ps.stdout
    # The next call brings it back: same process, its in-memory state still there.
    h3 = warm.spawn("again")
    third = h3.get(timeout=30)
    assert (third["pid"], third["calls"]) == (first["pid"], first["calls"] + 1)
    s3 = h3.status()
    assert s3.start_kind == "unparked" and s3.startup is not None
    assert _parked(one_gpu) == []
    # ... and it is an ordinary warm worker again.
    h4 = warm.spawn("warm")
    assert h4.get(timeout=30)["pid"] == first["pid"] and h4.status().start_kind == "warm"


def test_budget_ends_the_least_recently_parked(one_gpu: DaemonProc) -> None:
    a = _fn(one_gpu, model, keep_warm=600, gpu="h100", env={"WHICH": "a"})
    b = _fn(one_gpu, model, keep_warm=600, gpu="h100", env={"WHICH": "b"})
    needy = _fn(one_gpu, other, gpu="h100")
    pa = a.remote("a")["pid"]
    needy.remote(0)  # parks a (1 GiB of 1.5)
    pb = b.remote("b")["pid"]
    assert pb != pa
    needy.remote(0)  # parks b: 2 GiB is over the budget, so a (parked first) is ended
    _until(lambda: not _alive(pa))
    assert _alive(pb)
    assert [p.bytes for p in _parked(one_gpu)] == [GIB]
    # a's next call starts cold; b's is unparked.
    ha = a.spawn("a2")
    assert ha.get(timeout=30)["calls"] == 1 and ha.status().start_kind == "cold"


@pytest.fixture
def no_remap() -> Iterator[DaemonProc]:
    with _daemon(GPUD_FAKE_GPUS="h100,h100", GPUD_FAKE_CKPT_REMAP="0") as d:
        yield d


def test_without_remap_the_call_waits_for_its_gpu(no_remap: DaemonProc) -> None:
    warm = _fn(no_remap, model, keep_warm=600, gpu="h100")
    first = warm.remote("load")
    hog = _fn(no_remap, other, gpu="h100:2").spawn(600)  # takes both: parks the worker
    with Client(no_remap.url) as c:
        _until(lambda: c.get_job(hog.id).state == "running")
    assert len(_parked(no_remap)) == 1
    # Both GPUs are busy; even once one is free, the worker's own is not, and this driver
    # cannot restore it elsewhere: the call waits, saying why.
    h = warm.spawn("again")
    with Client(no_remap.url) as c:
        _until(lambda: "to unpark its warm worker" in (c.get_job(h.id).reason or ""))
        reason = c.get_job(h.id).reason or ""
        assert c.get_job(h.id).state == "queued"
    assert f"held by job {hog.id}" in reason and "cannot restore it onto another GPU" in reason
    hog.cancel()
    got = h.get(timeout=30)
    assert (got["pid"], got["calls"]) == (first["pid"], first["calls"] + 1)
    assert h.status().start_kind == "unparked"


def test_with_remap_the_call_runs_on_another_gpu_of_its_type() -> None:
    with _daemon(GPUD_FAKE_GPUS="h100,h100") as d:
        warm = _fn(d, model, keep_warm=600, gpu="h100")
        first = warm.remote("load")
        both = _fn(d, other, gpu="h100:2").spawn(0)  # parks the worker, then ends
        both.get(timeout=30)
        hog = _fn(d, other, gpu="h100").spawn(600)
        with Client(d.url) as c:
            _until(lambda: c.get_job(hog.id).state == "running")
            hog_gpus = c.get_job(hog.id).gpus
        # The lowest free GPU: the worker's own (it ran first on an empty box).
        assert hog_gpus == [first["gpus"]]
        h = warm.spawn("again")
        got = h.get(timeout=30)
        assert (got["pid"], got["calls"]) == (first["pid"], first["calls"] + 1)
        assert h.status().start_kind == "unparked"
        assert got["gpus"] != first["gpus"] and h.status().gpus == [got["gpus"]]
        assert f", onto {got['gpus']}" in d.log.read_text()
        hog.cancel()


def test_with_parking_off_the_worker_is_ended_as_before() -> None:
    with _daemon(GPUD_FAKE_GPUS="h100", GPUD_PARK_MAX_BYTES="0") as d:
        pid = _fn(d, model, keep_warm=600, gpu="h100").remote("load")["pid"]
        _fn(d, other, gpu="h100").remote(0)
        _until(lambda: not _alive(pid))
        assert _parked(d) == []
        with Client(d.url) as c:
            assert c.gpus().park_max_bytes == 0


@pytest.fixture
def failing_park() -> Iterator[DaemonProc]:
    with _daemon(
        GPUD_FAKE_GPUS="h100", GPUD_FAKE_CKPT_FAULTS="checkpoint:CUDA_ERROR_UNKNOWN:1"
    ) as d:
        yield d


def test_a_failed_park_ends_the_worker_as_before(failing_park: DaemonProc) -> None:
    warm = _fn(failing_park, model, keep_warm=600, gpu="h100")
    pid = warm.remote("load")["pid"]
    assert _fn(failing_park, other, gpu="h100").remote(0)
    _until(lambda: not _alive(pid))
    assert _parked(failing_park) == []
    assert "parking warm worker" in failing_park.log.read_text()
    # The next park works (the fault was for one checkpoint only).
    pid2 = warm.remote("load")["pid"]
    _fn(failing_park, other, gpu="h100").remote(0)
    assert _alive(pid2) and len(_parked(failing_park)) == 1


def test_a_failed_unpark_starts_the_call_cold() -> None:
    with _daemon(
        GPUD_FAKE_GPUS="h100", GPUD_FAKE_CKPT_FAULTS="restore:CUDA_ERROR_OUT_OF_MEMORY:1"
    ) as d:
        warm = _fn(d, model, keep_warm=600, gpu="h100")
        pid = warm.remote("load")["pid"]
        _fn(d, other, gpu="h100").remote(0)
        assert len(_parked(d)) == 1
        h = warm.spawn("again")
        got = h.get(timeout=30)
        assert got["pid"] != pid and got["calls"] == 1
        assert h.status().start_kind == "cold"
        _until(lambda: not _alive(pid))
        assert _parked(d) == []


def test_daemon_stop_ends_parked_workers(one_gpu: DaemonProc) -> None:
    warm = _fn(one_gpu, model, keep_warm=600, gpu="h100")
    pid = warm.remote("load")["pid"]
    _fn(one_gpu, other, gpu="h100").remote(0)
    assert len(_parked(one_gpu)) == 1
    one_gpu.stop()
    _until(lambda: not _alive(pid))


def test_a_restarted_daemon_kills_parked_workers_left_behind(tmp_path: Path) -> None:
    """A daemon that died (SIGKILL) leaves parked.json; the next start kills those
    processes (their hub is gone) and never a process that merely reuses a pid."""
    from gpud.daemon.parking import kill_leftovers
    from gpud.executors.process import proc_start_time

    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "parked.json"
        state.write_text(
            json.dumps(
                [
                    {"pid": orphan.pid, "start": proc_start_time(orphan.pid)},
                    {"pid": bystander.pid, "start": (proc_start_time(bystander.pid) or 0) + 1},
                ]
            )
        )
        assert kill_leftovers(state) == [orphan.pid]
        assert orphan.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None and not state.exists()
        assert kill_leftovers(state) == []  # nothing recorded: nothing done
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait()


def test_the_gpu_check_script_runs_on_fake_gpus(one_gpu: DaemonProc) -> None:
    """scripts/gpu_park_check.py (the GPU machine's parking check) on fake GPUs: its state
    is host memory there, but the parking path and the figures it prints are the same."""
    env = one_gpu.client_env()
    r = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "scripts" / "gpu_park_check.py"),
            "--gib",
            "0.1",
            "--log",
            str(one_gpu.log),
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=150,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("PASS:") == 4 and "FAIL" not in r.stdout
    assert re.search(r"unparked: 1\.00 GiB in [\d.]+ s = [\d.]+ GB/s", r.stdout), r.stdout


async def test_a_parked_worker_ends_when_its_keep_warm_runs_out(clocked) -> None:  # type: ignore[no-untyped-def]
    """On the daemon's injected clock (tests/test_clock.py's in-process daemon): parked,
    its keep_warm still counts from its last call, and then it is ended."""
    import trio

    http, clock = clocked
    first = await _run(http, _body(_pid, keep_warm=5, gpu="h100:2"))
    pid = first["value"]["value"]
    await _run(http, _body(_pid, gpu="h100"))  # needs one of the worker's GPUs: parks it
    parked = (await http.get("/v1/gpus")).json()["parked"]
    assert [p["job_id"] for p in parked] == [first["id"]] and _alive(pid)
    await trio.sleep(0.7)  # the warm loop runs; the clock stands still: still parked
    assert _alive(pid)
    clock.advance(6.0)
    with trio.fail_after(10):  # the warm loop looks twice a second
        while _alive(pid):  # noqa: ASYNC110 - waiting for a process of the daemon's to end
            await trio.sleep(0.05)
    assert (await http.get("/v1/gpus")).json()["parked"] == []


def test_the_gpu_preempt_check_script_runs_on_fake_gpus() -> None:
    """scripts/gpu_preempt_check.py (the GPU machine's preemption check) on one fake GPU with
    preempt_after set as scripts/gpu-check.sh sets it: its loop runs on the CPU there, but the
    suspend, the priority job and the resume are the real path."""
    with _daemon(GPUD_FAKE_GPUS="h100", GPUD_PREEMPT_AFTER="1s") as d:
        r = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).parent.parent / "scripts" / "gpu_preempt_check.py"),
                "--gib",
                "0.01",
                "--steps",
                "100",  # 10 s: a loop preempted after 1 s, even on a slow machine
                "--timeout",
                "120",
            ],
            capture_output=True,
            text=True,
            env=d.client_env(),
            timeout=150,
        )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and r.stdout.count("PASS:") >= 4, r.stdout
