"""Warm workers (process executor): keep_warm keeps a job's worker for the next call."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

import gpud_client as gpud
from gpud_client import Client

from .conftest import DaemonProc, _run_daemon, make_base_dir

_calls = 0


@pytest.fixture(scope="module")
def wdaemon() -> Iterator[DaemonProc]:
    base = make_base_dir()
    try:
        yield from _run_daemon(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fn(d: DaemonProc, f: object, **options: object) -> gpud.Function:
    return gpud.function(f, **options).with_options(url=d.url)  # type: ignore[arg-type]


def counter(tag: str) -> dict:
    """Returns its pid and how often this process ran it (module state survives)."""
    import os

    global _calls
    _calls += 1
    print(f"call {_calls} {tag}")
    return {"pid": os.getpid(), "calls": _calls, "gpus": os.environ["CUDA_VISIBLE_DEVICES"]}


def other(tag: str) -> int:
    import os

    return os.getpid()


def test_second_call_runs_warm_in_the_same_process(wdaemon: DaemonProc) -> None:
    f = _fn(wdaemon, counter, keep_warm=30)
    h1 = f.spawn("a")
    first = h1.get(timeout=30)
    h2 = f.spawn("b")
    second = h2.get(timeout=30)
    assert second["pid"] == first["pid"] and second["calls"] == first["calls"] + 1
    s1, s2 = h1.status(), h2.status()
    assert (s1.start_kind, s2.start_kind) == ("cold", "warm")
    assert s2.startup is not None and s1.startup is not None and s2.startup < s1.startup
    # Each job's output went to its own log.
    assert "".join(h1.logs()).strip().endswith("a") and "b" not in "".join(h1.logs())
    assert "".join(h2.logs()).strip().endswith("b")


def test_without_keep_warm_every_call_is_cold(wdaemon: DaemonProc) -> None:
    f = _fn(wdaemon, counter)
    a, b = f.remote("x"), f.remote("y")
    assert a["pid"] != b["pid"] and a["calls"] == b["calls"] == 1


def test_other_code_never_runs_in_a_warm_worker(wdaemon: DaemonProc) -> None:
    warm = _fn(wdaemon, counter, keep_warm=30)
    pid = warm.remote("z")["pid"]
    assert _fn(wdaemon, other, keep_warm=30).remote("z") != pid


# keep_warm running out: tests/test_clock.py, on an injected clock instead of a sleep.


def test_an_idle_warm_worker_gives_its_gpus_to_a_queued_job(wdaemon: DaemonProc) -> None:
    """Two H100s held by an idle warm worker; another job needing one starts at once."""
    holder = _fn(wdaemon, counter, keep_warm=600, gpu="h100:2")
    hh = holder.spawn("hold")
    kept = hh.get(timeout=30)
    assert len(kept["gpus"].split(",")) == 2
    with Client(wdaemon.url) as c:  # the idle worker's GPUs show as held by its last job
        held = {g.uuid: g.job_id for g in c.gpus().gpus}
    assert [held[u] for u in kept["gpus"].split(",")] == [hh.id, hh.id]
    needy = _fn(wdaemon, other, gpu="h100")
    h = needy.spawn("n")
    h.get(timeout=30)
    # Parked in host memory (fake GPUs: the fake checkpointer), not ended (#13); with
    # parking off it is ended: tests/test_parking.py.
    os.kill(kept["pid"], 0)
    with Client(wdaemon.url) as c:
        assert [p.job_id for p in c.gpus().parked] == [hh.id]
    assert h.status().start_kind == "cold"


def test_cancel_ends_the_warm_worker(wdaemon: DaemonProc) -> None:
    def slow(seconds: float) -> int:
        import os
        import time

        time.sleep(seconds)
        return os.getpid()

    f = _fn(wdaemon, slow, keep_warm=30)
    pid = f.remote(0)
    h = f.spawn(600)
    with Client(wdaemon.url) as c:
        deadline = time.monotonic() + 20
        while c.get_job(h.id).state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert h.status().start_kind == "warm"
    assert h.cancel().state == "cancelled"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the warm worker outlived its cancelled job")
    assert f.remote(0) != pid


def test_map_over_warm_workers_keeps_order(wdaemon: DaemonProc) -> None:
    f = _fn(wdaemon, other, keep_warm=30)
    pids = list(f.map(range(60)))
    # cpu_slots is 4: a handful of workers serve all 60 inputs, not one process each.
    assert len(pids) == 60 and len(set(pids)) <= 8


app = gpud.App("warmcls")


class Model:
    """A service class: load() is the expensive setup, run once per warm worker."""

    def __init__(self, size: str) -> None:
        self.size = size
        self.loads = 0

    @gpud.enter()
    def load(self) -> None:
        import os

        self.loads += 1
        self.pid = os.getpid()

    @gpud.method()
    def embed(self, text: str) -> dict:
        return {"text": text.upper(), "size": self.size, "loads": self.loads, "pid": self.pid}


RemoteModel = app.cls(keep_warm=30)(Model)


def test_cls_setup_runs_once_per_warm_worker(wdaemon: DaemonProc) -> None:
    app.close()
    a = RemoteModel("large").embed.remote("hi")
    b = RemoteModel("large").embed.remote("again")
    assert a == {"text": "HI", "size": "large", "loads": 1, "pid": a["pid"]}
    assert b["pid"] == a["pid"] and b["loads"] == 1  # enter did not run again
    c = RemoteModel("small").embed.remote("x")
    assert c["size"] == "small" and c["pid"] != a["pid"]  # other constructor arguments
    assert RemoteModel.local("tiny").embed("y")["text"] == "Y"
    with pytest.raises(AttributeError, match="not a @gpud.method"):
        RemoteModel("large").load  # noqa: B018


def crashy(die: bool) -> int:
    import os

    if die:
        os._exit(9)  # the worker itself goes, mid-job
    return os.getpid()


def _zombie_children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                state, ppid = fh.read().rsplit(b")", 1)[1].split()[:2]
        except OSError:
            continue  # gone meanwhile
        if int(ppid) == pid and state == b"Z":
            found.append(int(entry.name))
    return found


def test_a_warm_worker_that_dies_mid_job_is_collected(wdaemon: DaemonProc) -> None:
    """The job fails with the worker's exit, and the daemon waits for the dead worker:
    it was reaped (killed) but never waited for, so each crash left a zombie and the
    pid's descriptor for as long as the daemon ran."""
    f = _fn(wdaemon, crashy, keep_warm=30)
    worker = f.remote(False)
    with pytest.raises(gpud.JobFailed, match="ended without writing a result"):
        f.remote(True)
    assert wdaemon.proc is not None
    deadline = time.monotonic() + 15
    while (zombies := _zombie_children(wdaemon.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert zombies == [], f"the dead worker {worker} is left a zombie of the daemon"
