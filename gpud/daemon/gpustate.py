"""The GPU state of a suspended job (#13): gpud.cudackpt's checkpointer as the daemon's
:class:`gpud.daemon.suspend.GpuStateParker`.

Every process of the job's process group that has CUDA state is parked (lock, then
checkpoint: its GPU memory goes to host memory and the GPU is free) before the group is
stopped, and unparked (restore, then unlock) before it is continued. Parking goes first
because the driver's lock waits for the process's CUDA work in flight to drain, which is
the documented way (the `cuda-checkpoint` utility works on running processes). A failure
part way unparks what was parked, so a job is never left half parked.

Containers (the Podman executor) are not parked yet: their processes are in another pid
namespace, and a suspend there says so.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import trio

from gpud.cudackpt import Checkpointer, CudaCheckpointError, ProcessState
from gpud.domain import Job
from gpud.executors.base import Handle

__all__ = ["CheckpointParker", "GpuStateParker", "group_pids"]

#: How long the lock may wait for a process's CUDA work in flight.
LOCK_TIMEOUT = 30.0


class GpuStateParker(Protocol):
    """Moves a stopped job's GPU state to host memory and back (the CUDA checkpoint
    module's side; gpud.testing has a fake). Each raises with a message on failure,
    leaving the process as it found it."""

    async def park(self, job: Job, handle: Handle) -> None: ...
    async def unpark(self, job: Job, handle: Handle) -> None: ...


def group_pids(pgid: int) -> list[int]:
    """The live processes of a process group, the leader first (a /proc scan)."""
    out: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            out.append(int(name))
    return sorted(out, key=lambda p: (p != pgid, p))


class CheckpointParker:
    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    async def park(self, job: Job, handle: Handle) -> None:
        if handle.container is not None:
            if self.checkpointer.supported().kind == "fake":
                return  # fake GPUs: no GPU state to keep, pausing the container is all
            raise RuntimeError("parking the GPU state of a container is not supported yet")
        await trio.to_thread.run_sync(self._park, handle.pid)

    async def unpark(self, job: Job, handle: Handle) -> None:
        if handle.container is not None:
            return
        await trio.to_thread.run_sync(self._unpark, handle.pid)

    def _park(self, pgid: int) -> None:
        parked: list[int] = []
        try:
            for pid in group_pids(pgid):
                if self.checkpointer.state(pid) is None:
                    continue  # no CUDA state: SIGSTOP is all it needs
                self.checkpointer.park(pid, LOCK_TIMEOUT)
                parked.append(pid)
        except BaseException:
            for pid in parked:
                with contextlib.suppress(CudaCheckpointError):
                    self.checkpointer.unpark(pid)
            raise

    def _unpark(self, pgid: int) -> None:
        errors: list[str] = []
        for pid in group_pids(pgid):
            try:
                st = self.checkpointer.state(pid)
                if st is not None and st is not ProcessState.RUNNING:
                    self.checkpointer.unpark(pid)
            except CudaCheckpointError as e:
                errors.append(f"process {pid}: {e}")
        if errors:
            raise RuntimeError("; ".join(errors))
