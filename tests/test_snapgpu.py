"""GPU state around a snapshot's dump and restore (#13 item 4): gpud.snapgpu over the fake
CUDA driver and real processes (a process group, as the process executor's worker is).
The Podman path end to end, on fake GPUs: tests/test_snapshots.py's GPU test."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import trio

import gpud_client as gpud
from gpud.cudackpt import ProcessState
from gpud.executors.base import Handle
from gpud.snapgpu import SnapshotGpuState, worker_pids
from gpud.testing.fake_cudackpt import FakeCudaDriver, fake_checkpointer

from .conftest import _run_daemon, executor_env, make_base_dir

CHILD = (
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(60)']); time.sleep(60)"
)


@pytest.fixture
def worker() -> Iterator[Handle]:
    """A worker of two processes in its own process group."""
    p = subprocess.Popen([sys.executable, "-c", CHILD], start_new_session=True)
    h = Handle(job_id=1, pid=p.pid, pid_start=0)
    try:
        for _ in range(200):
            if len(worker_pids(h)) == 2:
                break
            time.sleep(0.02)  # the child starting: nothing to wait on
        yield h
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _setup() -> tuple[FakeCudaDriver, SnapshotGpuState]:
    drv = FakeCudaDriver(bandwidth=None)
    return drv, SnapshotGpuState(fake_checkpointer(drv))


def test_the_dump_parks_every_cuda_process_and_the_original_runs_on(worker: Handle) -> None:
    drv, gs = _setup()
    leader, child = worker_pids(worker)
    drv.add_process(leader, 2 << 30)
    drv.add_process(child, 1 << 30)

    async def main() -> None:
        parked = await gs.before_dump(worker)
        assert parked == [leader, child]
        assert drv.host_bytes() == 3 << 30  # what CRIU then dumps with the host memory
        await gs.after_dump(parked)

    trio.run(main)
    assert {p.state for p in drv.processes.values()} == {ProcessState.RUNNING}


def test_processes_without_cuda_are_left_to_criu(worker: Handle) -> None:
    drv, gs = _setup()
    leader, _ = worker_pids(worker)
    drv.add_process(leader)
    assert trio.run(gs.before_dump, worker) == [leader]


def test_a_failed_park_unparks_the_others_and_the_snapshot_is_not_taken(worker: Handle) -> None:
    drv, gs = _setup()
    leader, child = worker_pids(worker)
    drv.add_process(leader)
    drv.add_process(child)
    drv.fail("checkpoint", "CUDA_ERROR_OUT_OF_MEMORY", pid=child)
    with pytest.raises(OSError, match="could not be checkpointed.*OUT_OF_MEMORY"):
        trio.run(gs.before_dump, worker)
    # Never left locked or parked: both run on.
    assert [drv.processes[p].state for p in (leader, child)] == [ProcessState.RUNNING] * 2


def test_a_restored_worker_is_unparked_or_the_restore_fails(worker: Handle) -> None:
    drv, gs = _setup()
    leader, child = worker_pids(worker)
    # What CRIU brings back: processes in the parked state the dump caught.
    drv.add_process(leader)
    drv.processes[leader].state = ProcessState.CHECKPOINTED
    drv.add_process(child)
    assert trio.run(gs.after_restore, worker) == 1
    assert drv.processes[leader].state is ProcessState.RUNNING

    drv.processes[leader].state = ProcessState.CHECKPOINTED
    drv.fail("restore", "CUDA_ERROR_OUT_OF_MEMORY", pid=leader)
    with pytest.raises(OSError, match="could not be restored"):
        trio.run(gs.after_restore, worker)
    assert drv.processes[leader].state is ProcessState.CHECKPOINTED  # parked, not locked


def gpu_fn(x: int) -> str:
    return f"gpu:{x}:{os.environ.get('CUDA_VISIBLE_DEVICES')}"


def test_a_gpu_snapshot_parks_around_criu_on_podman() -> None:
    """Podman and CRIU, fake GPUs: the take parks the container's processes (found by
    its cgroup) around the dump, and a restore goes through the unpark step."""
    env = {**executor_env("podman"), "GPUD_SNAPSHOT_RESTORE_TIMEOUT": "8"}
    base = make_base_dir()
    try:
        for d in _run_daemon(base, env):
            f = gpud.function(gpu_fn, snapshot=True, gpu="h100", name="snapgpu.fn")
            f = f.with_options(url=d.url)  # type: ignore[assignment]
            h = f.spawn(1)
            assert h.get(timeout=180).startswith("gpu:1:") and h.status().start_kind == "cold"
            log = d.log.read_text()
            m = re.search(
                rf"job {h.id}: GPU state of (\d+) process\(es\) parked for the "
                "dump",
                log,
            )
            assert m and int(m.group(1)) >= 1, log[-3000:]
            assert f"job {h.id}: snapshot of snapgpu.fn taken" in log
            h2 = f.spawn(2)
            assert h2.get(timeout=120).startswith("gpu:2:")
            assert h2.status().start_kind == "restored"
            assert f"job {h2.id}: GPU state of" in d.log.read_text()
    finally:
        shutil.rmtree(base, ignore_errors=True)
