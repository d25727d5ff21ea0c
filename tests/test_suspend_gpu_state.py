"""Suspend and resume through a GPU state parker (#13), against a daemon in the test's
nursery: a GPU job's state is parked after its processes stop and brought back before they
continue, and a failed restore ends the job with a clear error, never leaving it stopped.

The parker here is a stand-in for GPUs (the only things this suite fakes) that records its
calls and can be told to fail; gpud.testing's fake CUDA checkpointer (helper `gpuckpt`)
drives the same path."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import cloudpickle
import trio

from gpud.domain import Job
from gpud.executors.base import Handle
from gpud_client import AsyncClient
from gpud_client.models import SubmitRequest

PY = "{}.{}.{}".format(*sys.version_info[:3])


def _count(path: str, lines: int, pause: float) -> int:
    import time

    for i in range(lines):
        with open(path, "a") as fh:
            fh.write(f"{i}\n")
        time.sleep(pause)
    return lines


def _request(*args: Any) -> SubmitRequest:
    mod = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(mod)
    try:
        function = cloudpickle.dumps(_count)
    finally:
        cloudpickle.unregister_pickle_by_value(mod)
    return SubmitRequest(
        name="gpustate.count",
        function=function,
        args=cloudpickle.dumps((args, {})),
        python=PY,
        gpu="h100",
    )


class RecordingParker:
    def __init__(self, *, fail_unpark: bool = False) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.fail_unpark = fail_unpark

    async def park(self, job: Job, handle: Handle) -> None:
        self.calls.append(("park", job.id, handle.pid))

    async def unpark(self, job: Job, handle: Handle) -> None:
        if self.fail_unpark:
            raise RuntimeError("cuCheckpointProcessRestore failed: out of memory")
        self.calls.append(("unpark", job.id, handle.pid))


def _lines(p: Path) -> int:
    try:
        return p.read_text().count("\n")
    except FileNotFoundError:
        return 0


async def _until(pred: Any, within: float = 30.0) -> None:
    """Poll (the job's file and /proc change outside trio: nothing to wait on)."""
    with trio.fail_after(within):
        while True:
            if await pred():
                return
            await trio.sleep(0.05)


async def test_gpu_state_is_parked_and_brought_back(served, shared_dir: Path) -> None:  # type: ignore[no-untyped-def]
    parker = RecordingParker()
    served.daemon.gpu_parker = parker
    out = shared_dir / "count.txt"
    async with AsyncClient(f"unix://{served.socket}") as c:
        job = await c.submit(_request(str(out), 20, 0.05))

        async def counting() -> bool:
            return _lines(out) >= 2

        await _until(counting)
        pid = (served.daemon.active_job(job.id)).pid
        assert (await c.suspend(job.id)).state == "suspended"
        assert parker.calls == [("park", job.id, pid)]
        assert (await c.resume(job.id)).state == "running"
        assert parker.calls == [("park", job.id, pid), ("unpark", job.id, pid)]
        done = await c.wait(job.id, timeout=60)
        assert done.state == "succeeded"


async def test_a_failed_restore_ends_the_job_saying_why(served, shared_dir: Path) -> None:  # type: ignore[no-untyped-def]
    served.daemon.gpu_parker = RecordingParker(fail_unpark=True)
    out = shared_dir / "count.txt"
    async with AsyncClient(f"unix://{served.socket}") as c:
        job = await c.submit(_request(str(out), 1000, 0.05))

        async def counting() -> bool:
            return _lines(out) >= 2

        await _until(counting)
        pid = served.daemon.active_job(job.id).pid
        await c.suspend(job.id)
        await c.resume(job.id)
        done = await c.wait(job.id, timeout=60)
        assert done.state == "failed"
        assert "GPU state could not be brought back" in (done.error or "")

        def gone() -> bool:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        async def ended() -> bool:
            return gone()

        await _until(ended, 10)


async def test_the_daemon_parks_through_its_fake_checkpointer(served, shared_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """On fake GPUs the daemon holds gpud.testing's fake CUDA checkpointer (the real park
    and unpark logic over a fake driver): a suspend locks and checkpoints the job's process
    before stopping it, a resume restores and unlocks it."""
    from gpud.daemon.gpustate import CheckpointParker

    parker = served.daemon.gpu_parker
    assert isinstance(parker, CheckpointParker)
    calls = parker.checkpointer.driver.calls
    out = shared_dir / "count.txt"
    async with AsyncClient(f"unix://{served.socket}") as c:
        job = await c.submit(_request(str(out), 20, 0.05))

        async def counting() -> bool:
            return _lines(out) >= 2

        await _until(counting)
        pid = served.daemon.active_job(job.id).pid
        await c.suspend(job.id)
        assert [s for s, p in calls if p == pid and s != "state"] == ["lock", "checkpoint"]
        await c.resume(job.id)
        assert [s for s, p in calls if p == pid and s != "state"] == [
            "lock",
            "checkpoint",
            "restore",
            "unlock",
        ]
        assert (await c.wait(job.id, timeout=60)).state == "succeeded"
