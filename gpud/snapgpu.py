"""GPU state in snapshots (#13 item 4): the CUDA checkpoint around CRIU's dump and restore.

CRIU cannot dump GPU memory: it dumps a process's host memory only. So, for a snapshot of
a worker that uses CUDA (`@gpud.enter(snap=True)` loading a model onto the GPU):

1. before the dump, every process of the worker with CUDA state is parked (lock +
   checkpoint: its GPU memory is copied into its own host memory, which CRIU then dumps);
2. after the dump, the original is unparked (restore + unlock) and runs the job on;
3. after CRIU's restore, the restored processes are in the parked state the dump caught:
   they are unparked onto the GPUs the snapshot was taken on (the snapshot key names the
   GPUs where they are real devices, so a restore is only ever onto those).

All or none: a failed park unparks what was parked and the snapshot is not taken (the
job runs on as a cold start); a restored worker that cannot be unparked fails the restore
(the call starts cold). A process is never left locked (gpud.cudackpt's rule).

Processes are found as the host sees them: a container's by its cgroup (which names the
container), a process executor's worker by its process group. The driver's API takes
host pids, which is what the daemon, in the host's namespace, has.
"""

from __future__ import annotations

import contextlib
import logging
import os

import trio

from gpud.cudackpt import Checkpointer, CudaCheckpointError, ProcessState
from gpud.executors.base import Handle

__all__ = ["SnapshotGpuState", "worker_pids"]

log = logging.getLogger("gpud.snapshots")

#: How long the lock may wait for a worker's CUDA work in flight (it is between calls).
LOCK_TIMEOUT = 30.0


def worker_pids(handle: Handle) -> list[int]:
    """The live processes of a worker as the host sees them: those whose cgroup names its
    container, or those of its process group (a /proc scan)."""
    out: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if handle.container is not None:
                with open(f"/proc/{pid}/cgroup", encoding="utf-8") as fh:
                    if handle.container not in fh.read():
                        continue
            else:
                with open(f"/proc/{pid}/stat", "rb") as fh2:
                    fields = fh2.read().rsplit(b")", 1)[1].split()
                if int(fields[2]) != handle.pid or fields[0] == b"Z":
                    continue
        except (OSError, IndexError, ValueError):
            continue
        out.append(pid)
    return sorted(out)


class SnapshotGpuState:
    """The CUDA side of a snapshot's take and restore (see the module)."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    async def before_dump(self, handle: Handle) -> list[int]:
        """Park the worker's CUDA processes; the pids parked (to unpark after the dump).
        Raises OSError (the snapshotter's "not taken") when one cannot be parked."""
        return await trio.to_thread.run_sync(self._park, worker_pids(handle))

    async def after_dump(self, pids: list[int]) -> None:
        """Unpark the original after CRIU's dump. Raises OSError when its GPU state could
        not be brought back (the worker is then useless: the caller ends it)."""
        await trio.to_thread.run_sync(self._unpark, pids)

    async def after_restore(self, handle: Handle) -> int:
        """Unpark the restored worker's processes; how many were parked. OSError when one
        cannot be (the restore has failed)."""
        pids = await trio.to_thread.run_sync(worker_pids, handle)
        return await trio.to_thread.run_sync(self._unpark, pids)

    def _park(self, pids: list[int]) -> list[int]:
        parked: list[int] = []
        try:
            for pid in pids:
                if self.checkpointer.state(pid) is None:
                    continue  # no CUDA state: CRIU alone is enough
                self.checkpointer.park(pid, LOCK_TIMEOUT)
                parked.append(pid)
        except CudaCheckpointError as e:
            for pid in parked:
                with contextlib.suppress(CudaCheckpointError):
                    self.checkpointer.unpark(pid)
            raise OSError(f"its GPU state could not be checkpointed: {e}") from e
        return parked

    def _unpark(self, pids: list[int]) -> int:
        errors: list[str] = []
        n = 0
        for pid in pids:
            try:
                st = self.checkpointer.state(pid)
                if st is not None and st is not ProcessState.RUNNING:
                    self.checkpointer.unpark(pid)
                    n += 1
            except CudaCheckpointError as e:
                errors.append(f"process {pid}: {e}")
        if errors:
            raise OSError("its GPU state could not be restored: " + "; ".join(errors))
        return n
