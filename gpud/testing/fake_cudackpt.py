"""A fake CUDA checkpoint driver, for fake GPUs and tests (#13).

:class:`FakeCudaDriver` has the methods of ``gpud.cudackpt.LibCuda`` and keeps each pid's
CUDA state (RUNNING, LOCKED, CHECKPOINTED, FAILED) the way the driver does, refusing an
operation from the wrong state with CUDA_ERROR_ILLEGAL_STATE. The checkpointer on top of it
is the real ``gpud.cudackpt.DriverCheckpointer``, so everything gpud does with a parked
process (the never-locked rule included) runs the same code on fake GPUs as on real ones.
Nothing is moved: a park takes ``bytes / bandwidth`` seconds of ``sleep`` and counts the
bytes as host memory.

Tests drive it with :meth:`FakeCudaDriver.add_process` (sizes, GPUs) and
:meth:`FakeCudaDriver.fail` (make step X fail, leaving the state a real driver might).
With ``auto_processes`` (what a daemon on fake GPUs gets) any live pid counts as a CUDA
process of ``default_bytes``, so real worker processes can be parked.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gpud.cudackpt import (
    CudaCheckpointError,
    DriverCheckpointer,
    ProcessState,
    Support,
)

__all__ = [
    "FAKE_SUPPORT",
    "FakeCudaDriver",
    "FakeProcess",
    "fake_checkpointer",
    "fake_checkpointer_from_env",
]

_GIB = 1024**3
STEPS = ("state", "lock", "checkpoint", "restore", "unlock")

FAKE_SUPPORT = Support(
    ok=True,
    kind="fake",
    remap=True,
    reason="FAKE: the GPUs are fake, so parking moves no GPU memory (fake_gpus in the config)",
)


@dataclass
class FakeProcess:
    bytes: int
    gpus: tuple[str, ...] = ()
    state: ProcessState = ProcessState.RUNNING


@dataclass
class _Fault:
    step: str
    result: str
    times: int
    leave: ProcessState | None
    pid: int | None


@dataclass
class FakeCudaDriver:
    """Per-pid CUDA states with sizes, a bandwidth, and failures on demand.

    ``bandwidth`` is bytes per second for checkpoint and restore (None: instant);
    ``sleep`` is how the time passes (tests pass a fake clock's advance).
    """

    bandwidth: float | None = 25e9
    default_bytes: int = 1 * _GIB
    auto_processes: bool = False
    sleep: Callable[[float], None] = time.sleep
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    #: Every call, in order, as (step, pid): tests check what was done.
    calls: list[tuple[str, int]] = field(default_factory=list)
    _faults: list[_Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- test controls --------------------------------------------------------------------

    def add_process(self, pid: int, bytes: int | None = None, gpus: Iterable[str] = ()) -> None:
        """Make ``pid`` a RUNNING CUDA process holding ``bytes`` on ``gpus`` (UUIDs)."""
        with self._lock:
            self.processes[pid] = FakeProcess(
                bytes=self.default_bytes if bytes is None else bytes, gpus=tuple(gpus)
            )

    def fail(
        self,
        step: str,
        result: str = "CUDA_ERROR_UNKNOWN",
        *,
        times: int = 1,
        leave: ProcessState | None = None,
        pid: int | None = None,
    ) -> None:
        """Make the next ``times`` calls of ``step`` (for ``pid``, or any) fail with
        ``result``. ``leave`` is the state the failed call leaves (default: unchanged; a
        checkpoint that fails half way might leave FAILED, or CHECKPOINTED after all)."""
        if step not in STEPS:
            raise ValueError(f"no step {step!r}: one of {', '.join(STEPS)}")
        if step == "state" and leave is not None:
            raise ValueError("asking for the state changes no state: leave must be None")
        with self._lock:
            self._faults.append(_Fault(step, result, times, leave, pid))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def memory_of(self, pid: int) -> int | None:
        """GPU memory the pid holds now (0 while checkpointed), as NVML would say."""
        with self._lock:
            p = self.processes.get(pid)
            if p is None:
                return None
            return 0 if p.state is ProcessState.CHECKPOINTED else p.bytes

    def host_bytes(self) -> int:
        """GPU state held in host memory by all checkpointed processes."""
        with self._lock:
            return sum(
                p.bytes for p in self.processes.values() if p.state is ProcessState.CHECKPOINTED
            )

    # -- the driver's calls ---------------------------------------------------------------

    def _process(self, step: str, pid: int) -> FakeProcess:
        """The pid's record, after logging the call and applying any fault (under lock)."""
        self.calls.append((step, pid))
        p = self.processes.get(pid)
        if p is None and self.auto_processes and _alive(pid):
            p = self.processes[pid] = FakeProcess(bytes=self.default_bytes)
        for f in self._faults:
            if f.step == step and (f.pid is None or f.pid == pid) and f.times > 0:
                f.times -= 1
                if p is not None and f.leave is not None:
                    p.state = f.leave
                raise CudaCheckpointError(
                    f"fake {step} of pid {pid} failed: {f.result}", result=f.result, step=step
                )
        if p is None:
            raise CudaCheckpointError(
                f"fake {step} of pid {pid} failed: CUDA_ERROR_INVALID_VALUE (it has no CUDA state)",
                result="CUDA_ERROR_INVALID_VALUE",
                step=step,
            )
        return p

    @staticmethod
    def _need(p: FakeProcess, step: str, pid: int, want: ProcessState) -> None:
        if p.state is not want:
            raise CudaCheckpointError(
                f"fake {step} of pid {pid} failed: CUDA_ERROR_ILLEGAL_STATE (it is "
                f"{p.state.name}, not {want.name})",
                result="CUDA_ERROR_ILLEGAL_STATE",
                step=step,
            )

    def _copy_time(self, p: FakeProcess) -> None:
        if self.bandwidth:
            self.sleep(p.bytes / self.bandwidth)

    def get_state(self, pid: int) -> ProcessState:
        with self._lock:
            return self._process("state", pid).state

    def lock(self, pid: int, timeout_ms: int) -> None:
        with self._lock:
            p = self._process("lock", pid)
            self._need(p, "lock", pid, ProcessState.RUNNING)
            p.state = ProcessState.LOCKED

    def checkpoint(self, pid: int) -> None:
        with self._lock:
            p = self._process("checkpoint", pid)
            self._need(p, "checkpoint", pid, ProcessState.LOCKED)
        self._copy_time(p)  # outside the lock: other pids go on meanwhile, as on a real box
        with self._lock:
            p.state = ProcessState.CHECKPOINTED

    def restore(self, pid: int, gpu_pairs: list[tuple[str, str]] | None) -> None:
        with self._lock:
            p = self._process("restore", pid)
            self._need(p, "restore", pid, ProcessState.CHECKPOINTED)
            new_gpus = p.gpus
            if gpu_pairs is not None and p.gpus:
                mapping = dict(gpu_pairs)
                # As the driver documents: a map must name every checkpointed GPU.
                if set(mapping) != set(p.gpus):
                    raise CudaCheckpointError(
                        f"fake restore of pid {pid}: the GPU map must name exactly its GPUs",
                        result="CUDA_ERROR_INVALID_VALUE",
                        step="restore",
                    )
                new_gpus = tuple(mapping[u] for u in p.gpus)
        self._copy_time(p)
        with self._lock:
            p.gpus = new_gpus
            p.state = ProcessState.LOCKED

    def unlock(self, pid: int) -> None:
        with self._lock:
            p = self._process("unlock", pid)
            self._need(p, "unlock", pid, ProcessState.LOCKED)
            p.state = ProcessState.RUNNING


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fake_checkpointer(
    driver: FakeCudaDriver | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    support: Support = FAKE_SUPPORT,
) -> DriverCheckpointer:
    """The real checkpoint logic over a fake driver, declared fake in its Support."""
    drv = driver if driver is not None else FakeCudaDriver(auto_processes=True)
    return DriverCheckpointer(drv, support, memory_of=drv.memory_of, clock=clock)


def fake_checkpointer_from_env(env: Mapping[str, str]) -> DriverCheckpointer:
    """The fake a daemon on fake GPUs gets, shaped by test settings in its environment
    (tests drive a daemon subprocess, so they cannot reach its fake otherwise):

    * ``GPUD_FAKE_CKPT_BYTES``: the GPU memory every process is taken to hold (1 GiB);
    * ``GPUD_FAKE_CKPT_REMAP=0``: the fake driver cannot restore onto other GPUs;
    * ``GPUD_FAKE_CKPT_FAULTS``: ``step:RESULT:times`` items, comma separated, made to
      fail (see :meth:`FakeCudaDriver.fail`).
    """
    drv = FakeCudaDriver(auto_processes=True)
    if env.get("GPUD_FAKE_CKPT_BYTES"):
        drv.default_bytes = int(env["GPUD_FAKE_CKPT_BYTES"])
    for item in filter(None, (env.get("GPUD_FAKE_CKPT_FAULTS") or "").split(",")):
        step, _, rest = item.strip().partition(":")
        result, _, times = rest.partition(":")
        drv.fail(step, result or "CUDA_ERROR_UNKNOWN", times=int(times or 1))
    support = FAKE_SUPPORT
    if env.get("GPUD_FAKE_CKPT_REMAP") == "0":
        support = dataclasses.replace(FAKE_SUPPORT, remap=False)
    return fake_checkpointer(drv, support=support)
