"""CUDA process checkpoint (#13): move a live process's GPU state into host memory and back.

The NVIDIA driver (the CUDA driver API of driver >= 570, i.e. CUDA 12.8) can do this to
*another* process, by pid: lock its CUDA calls, copy its GPU memory into host memory and
release the GPU (checkpoint), later copy it back (restore) and let its CUDA calls go on
(unlock). The process stays alive throughout; a thread blocked in a CUDA call simply waits.
gpud uses it to park idle warm workers, to suspend jobs, and (with CRIU) to snapshot GPU
processes.

This module reaches the driver through ctypes on ``libcuda.so.1``, as nvidia-ml-py does for
NVML, so gpud needs no CUDA Python package. Two layers:

* :class:`LibCuda` is the thin part: one method per driver call, each raising
  :class:`CudaCheckpointError` named after the ``CUresult``. ``gpud.testing.fake_cudackpt``
  has a fake of this layer with the same methods.
* :class:`DriverCheckpointer` is the logic gpud relies on, the same over the real driver and
  the fake: ``park`` = lock + checkpoint, ``unpark`` = restore + unlock, and the rule that a
  failed step never leaves a process locked (a locked process hangs in its next CUDA call).

The :class:`Checkpointer` protocol is what the daemon holds; :func:`open_cuda_checkpointer`
gives the real one, with a :class:`Support` that says whether it works here and why not.
Every call blocks (a checkpoint moves gigabytes): call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "Checkpointer",
    "CudaCheckpointError",
    "CudaDriver",
    "DriverCheckpointer",
    "LibCuda",
    "ParkResult",
    "ProcessState",
    "Support",
    "UnparkResult",
    "ckpt_text",
    "nvml_process_memory",
    "open_cuda_checkpointer",
    "uuid_bytes",
]

log = logging.getLogger(__name__)

#: The first driver whose CUDA driver API has cuCheckpointProcess* (NVIDIA's cuda-checkpoint
#: README: the 550 driver had only the `cuda-checkpoint` utility; 570 added the driver API
#: and lock timeouts). cuDriverGetVersion reports the CUDA version, 12080 for 570.
MIN_DRIVER = "570"
MIN_CUDA = 12080
#: Restore onto other GPUs (CUcheckpointRestoreArgs.gpuPairs) is in the CUDA 13 headers
#: (driver 580); CUDA 12.8/12.9's restore args are all reserved and must be zero.
REMAP_CUDA = 13000

_NAMES = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    304: "CUDA_ERROR_OPERATING_SYSTEM",
    401: "CUDA_ERROR_ILLEGAL_STATE",
    500: "CUDA_ERROR_NOT_FOUND",
    800: "CUDA_ERROR_NOT_PERMITTED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    802: "CUDA_ERROR_SYSTEM_NOT_READY",
    803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    909: "CUDA_ERROR_TIMEOUT",
    999: "CUDA_ERROR_UNKNOWN",
}
#: What cuCheckpointProcessGetState answers for a pid that has no CUDA state (not started
#: CUDA, or no such process). Not documented: scripts/gpu_ckpt_check.py prints the real
#: answer for a plain process, so this set can be checked on a GPU machine.
_NO_CUDA = frozenset(
    {"CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_FOUND", "CUDA_ERROR_NOT_INITIALIZED"}
)


class ProcessState(enum.Enum):
    """CUprocessState: RUNNING -lock-> LOCKED -checkpoint-> CHECKPOINTED -restore-> LOCKED
    -unlock-> RUNNING. FAILED: the driver gave up on the process's CUDA state."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class CudaCheckpointError(RuntimeError):
    """A checkpoint step failed. ``result`` is the CUresult's name (None when the error is
    not the driver's), ``step`` the call ("lock", "checkpoint", "restore", "unlock",
    "state", "init"), ``state`` what the process was left in where known: RUNNING after a
    failed park (it carries on), CHECKPOINTED after a failed restore (still parked)."""

    def __init__(
        self,
        message: str,
        *,
        result: str | None = None,
        step: str | None = None,
        state: ProcessState | None = None,
    ) -> None:
        super().__init__(message)
        self.result = result
        self.step = step
        self.state = state


@dataclass(frozen=True)
class Support:
    """Whether GPU checkpointing works on this box, for `gpud gpus` and the start-up log."""

    ok: bool
    #: One line for a person: what works, or why not and what to do.
    reason: str
    #: "cuda" (the driver's API), "fake" (fake GPUs: nothing real moves) or "none".
    kind: str = "cuda"
    #: The display driver's version (NVML's "580.159.04"), where known.
    driver_version: str | None = None
    #: The CUDA version the driver implements ("13.0"), where known.
    cuda_version: str | None = None
    #: unpark(gpu_map=...) can restore onto other GPUs (of the same chip type).
    remap: bool = False


@dataclass(frozen=True)
class ParkResult:
    #: GPU memory the process held just before parking, now held in host memory. NVML's
    #: per-process "used GPU memory", so an estimate: it counts the CUDA context too, and
    #: the driver's host copy may differ by that much. None when NVML could not tell.
    bytes: int | None
    #: Lock + checkpoint, wall time.
    seconds: float
    #: Of which the lock (waiting for the process's CUDA work in flight to finish).
    lock_seconds: float


@dataclass(frozen=True)
class UnparkResult:
    #: Restore + unlock, wall time (0 when the process was not parked).
    seconds: float
    #: What the process was in before: CHECKPOINTED (restored), LOCKED (only unlocked, as
    #: after a daemon that died between the two steps) or RUNNING (nothing to do).
    was: ProcessState


@runtime_checkable
class Checkpointer(Protocol):
    """What the daemon holds. Every method blocks: call it from a worker thread."""

    def supported(self) -> Support: ...

    def state(self, pid: int) -> ProcessState | None:
        """The process's CUDA state; None when it has no CUDA state (or does not exist)."""
        ...

    def park(self, pid: int, timeout: float) -> ParkResult:
        """Lock (waiting at most ``timeout`` seconds for its CUDA work to drain) and
        checkpoint. On failure the process is left RUNNING where at all possible; the
        :class:`CudaCheckpointError` says what it was left in."""
        ...

    def unpark(self, pid: int, gpu_map: Mapping[str, str] | None = None) -> UnparkResult:
        """Restore and unlock. ``gpu_map`` maps every GPU UUID the process had to the GPU to
        restore it onto (identity pairs included); None restores onto the same GPUs. A
        failed restore leaves it parked (CHECKPOINTED), never locked."""
        ...


class CudaDriver(Protocol):
    """The driver calls :class:`DriverCheckpointer` needs; real in :class:`LibCuda`, fake in
    ``gpud.testing.fake_cudackpt.FakeCudaDriver``. Each raises CudaCheckpointError."""

    def get_state(self, pid: int) -> ProcessState: ...
    def lock(self, pid: int, timeout_ms: int) -> None: ...
    def checkpoint(self, pid: int) -> None: ...
    def restore(self, pid: int, gpu_pairs: list[tuple[str, str]] | None) -> None: ...
    def unlock(self, pid: int) -> None: ...


def uuid_bytes(uuid: str) -> bytes:
    """ "GPU-8c1e...-..." (NVML's form) -> the 16 bytes of a CUuuid. ValueError otherwise."""
    text = uuid.strip()
    if text.upper().startswith("GPU-"):
        text = text[4:]
    try:
        raw = bytes.fromhex(text.replace("-", ""))
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise ValueError(
            f"not a GPU UUID: {uuid!r} (want NVML's form, GPU-xxxxxxxx-xxxx-...;"
            " MIG instances cannot be remapped)"
        )
    return raw


# ---------------------------------------------------------------------------------------
# The real driver, through ctypes


class _LockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class _Reserved64(ctypes.Structure):  # CUcheckpointCheckpointArgs, CUcheckpointUnlockArgs
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class _GpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", ctypes.c_ubyte * 16), ("newUuid", ctypes.c_ubyte * 16)]


class _RestoreArgs(ctypes.Structure):
    # 64 bytes in every CUDA 13 header (the tail's layout changed between 13.x releases,
    # but it is all reserved and zero); in 12.8/12.9 all 64 bytes are reserved, so a
    # restore without a map passes zeros there too.
    _fields_ = [
        ("gpuPairs", ctypes.POINTER(_GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("padding0", ctypes.c_uint),
        ("reserved", ctypes.c_uint64 * 6),
    ]


for _s in (_LockArgs, _Reserved64, _RestoreArgs):
    assert ctypes.sizeof(_s) == 64, _s
assert ctypes.sizeof(_GpuPair) == 32

_CALLS = (
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


class LibCuda:
    """``libcuda.so.1`` through ctypes. :meth:`load` never raises: it returns the library, or
    None and the reason (no driver, a driver without the checkpoint API)."""

    def __init__(self, lib: ctypes.CDLL, cuda_version: int) -> None:
        self._lib = lib
        self.cuda_version = cuda_version
        self._init_lock = threading.Lock()
        self._initialised = False
        for name in (*_CALLS, "cuCheckpointProcessGetRestoreThreadId"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int

    @classmethod
    def load(cls, path: str = "libcuda.so.1") -> tuple[LibCuda | None, str]:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            return None, (f"{path} not found ({e}): no NVIDIA driver, so no GPU checkpointing")
        version = ctypes.c_int(0)
        try:
            rc = lib.cuDriverGetVersion(ctypes.byref(version))
        except AttributeError:
            return None, f"{path} has no cuDriverGetVersion: it is not an NVIDIA CUDA driver"
        if rc != 0:
            return None, f"cuDriverGetVersion failed ({_NAMES.get(rc, rc)}): is the driver loaded?"
        missing = [n for n in _CALLS if not hasattr(lib, n)]
        if missing or version.value < MIN_CUDA:
            return None, (
                f"the driver (CUDA {_cuda_text(version.value)}) has no CUDA checkpoint API "
                f"({missing[0] if missing else 'too old'}): it needs NVIDIA driver >= "
                f"{MIN_DRIVER} (CUDA 12.8); upgrade the driver to park GPU state"
            )
        return cls(lib, version.value), "ok"

    def _name(self, rc: int) -> str:
        if rc in _NAMES:
            return _NAMES[rc]
        s = ctypes.c_char_p()
        try:
            if self._lib.cuGetErrorName(rc, ctypes.byref(s)) == 0 and s.value:
                return s.value.decode()
        except AttributeError:
            pass
        return f"CUresult {rc}"

    def _call(self, step: str, pid: int, fn: str, *args: object) -> None:
        self._ensure_init()
        rc = getattr(self._lib, fn)(*args)
        if rc != 0:
            name = self._name(rc)
            raise CudaCheckpointError(f"{fn}(pid {pid}) failed: {name}", result=name, step=step)

    def _ensure_init(self) -> None:
        # Restore needs cuInit in the caller (or persistence mode). cuInit makes no context
        # and holds no GPU memory; done lazily so a daemon that never parks never loads CUDA.
        with self._init_lock:
            if self._initialised:
                return
            rc = self._lib.cuInit(0)
            if rc != 0:
                name = self._name(rc)
                raise CudaCheckpointError(
                    f"cuInit failed ({name}): run `nvidia-smi` to check the driver",
                    result=name,
                    step="init",
                )
            self._initialised = True

    def get_state(self, pid: int) -> ProcessState:
        out = ctypes.c_int(-1)
        self._call("state", pid, "cuCheckpointProcessGetState", pid, ctypes.byref(out))
        return ProcessState(out.value)

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = _LockArgs(timeoutMs=max(0, timeout_ms))
        self._call("lock", pid, "cuCheckpointProcessLock", pid, ctypes.byref(args))

    def checkpoint(self, pid: int) -> None:
        self._call(
            "checkpoint", pid, "cuCheckpointProcessCheckpoint", pid, ctypes.byref(_Reserved64())
        )

    def restore(self, pid: int, gpu_pairs: list[tuple[str, str]] | None) -> None:
        args = _RestoreArgs()
        pairs = None
        if gpu_pairs:
            pairs = (_GpuPair * len(gpu_pairs))()
            for i, (old, new) in enumerate(gpu_pairs):
                try:
                    pairs[i].oldUuid[:] = list(uuid_bytes(old))
                    pairs[i].newUuid[:] = list(uuid_bytes(new))
                except ValueError as e:
                    raise CudaCheckpointError(str(e), step="restore") from None
            args.gpuPairs = ctypes.cast(pairs, ctypes.POINTER(_GpuPair))
            args.gpuPairsCount = len(gpu_pairs)
        self._call("restore", pid, "cuCheckpointProcessRestore", pid, ctypes.byref(args))

    def unlock(self, pid: int) -> None:
        self._call("unlock", pid, "cuCheckpointProcessUnlock", pid, ctypes.byref(_Reserved64()))

    def restore_thread_id(self, pid: int) -> int:
        """The thread CRIU must leave running for a CUDA restore (needs driver 570+)."""
        out = ctypes.c_int(0)
        self._call("state", pid, "cuCheckpointProcessGetRestoreThreadId", pid, ctypes.byref(out))
        return out.value


# ---------------------------------------------------------------------------------------
# The logic


def nvml_process_memory(pid: int) -> int | None:
    """GPU memory NVML says ``pid`` uses, summed over the GPUs; None when NVML cannot tell.

    This is the size estimate for a park: the driver moves the process's allocations (plus
    its context's) into host memory, and NVML's per-process figure counts just those.
    """
    try:
        import pynvml  # type: ignore[import-untyped]  # ships no hints

        pynvml.nvmlInit()  # reference-counted: harmless beside the inventory's
    except Exception:  # noqa: BLE001 - no NVML: no estimate, never a failed park
        return None
    try:
        total, seen = 0, False
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if int(p.pid) == pid and p.usedGpuMemory is not None:
                    total += int(p.usedGpuMemory)
                    seen = True
        return total if seen else None
    except Exception:  # noqa: BLE001 - NVML errors of any kind: no reading
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


class DriverCheckpointer:
    """The :class:`Checkpointer` over a :class:`CudaDriver` (real or fake).

    ``memory_of(pid)`` estimates a park's size (default: :func:`nvml_process_memory`);
    ``clock`` times the steps (injectable so tests of the fake need no real time).
    """

    def __init__(
        self,
        driver: CudaDriver,
        support: Support,
        *,
        memory_of: Callable[[int], int | None] = nvml_process_memory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.driver = driver
        self._support = support
        self._memory_of = memory_of
        self._clock = clock

    def supported(self) -> Support:
        return self._support

    def state(self, pid: int) -> ProcessState | None:
        try:
            return self.driver.get_state(pid)
        except CudaCheckpointError as e:
            if e.result in _NO_CUDA:
                return None
            raise

    def _state_or_none(self, pid: int) -> ProcessState | None:
        try:
            return self.state(pid)
        except CudaCheckpointError:
            return None

    def park(self, pid: int, timeout: float) -> ParkResult:
        st = self.state(pid)
        if st is None:
            raise CudaCheckpointError(
                f"process {pid} has no CUDA state: nothing to park (stop it with SIGSTOP instead)",
                step="state",
            )
        if st is not ProcessState.RUNNING:
            raise CudaCheckpointError(
                f"process {pid} is {st.name}, not RUNNING: only a running CUDA process can be "
                "parked (unpark it first)",
                step="state",
                state=st,
            )
        size = self._size(pid)
        t0 = self._clock()
        try:
            self.driver.lock(pid, max(1, int(timeout * 1000)))
        except BaseException as e:
            left = self._back_to_running(pid, "lock", e)
            if isinstance(e, CudaCheckpointError):
                raise self._explain(e, pid, "lock", left, timeout) from e
            raise
        t1 = self._clock()
        try:
            self.driver.checkpoint(pid)
        except BaseException as e:
            left = self._back_to_running(pid, "checkpoint", e)
            if isinstance(e, CudaCheckpointError):
                raise self._explain(e, pid, "checkpoint", left, timeout) from e
            raise
        return ParkResult(bytes=size, seconds=self._clock() - t0, lock_seconds=t1 - t0)

    def unpark(self, pid: int, gpu_map: Mapping[str, str] | None = None) -> UnparkResult:
        pairs = None
        if gpu_map is not None:
            pairs = [(str(old), str(new)) for old, new in gpu_map.items()]
            if not pairs:
                raise ValueError("gpu_map is empty: give every GPU the process had, or None")
            if not self._support.remap and any(o.lower() != n.lower() for o, n in pairs):
                raise CudaCheckpointError(
                    f"this driver cannot restore onto other GPUs ({self._support.reason}); it "
                    "needs NVIDIA driver >= 580 (CUDA 13): restore onto the same GPUs",
                    step="restore",
                    state=self._state_or_none(pid),
                )
            if not self._support.remap:
                pairs = None  # identity pairs: the same as no map, on any driver
        st = self.state(pid)
        if st is None:
            raise CudaCheckpointError(
                f"process {pid} has no CUDA state: nothing to unpark", step="state"
            )
        if st is ProcessState.FAILED:
            raise CudaCheckpointError(
                f"process {pid}'s CUDA state FAILED in the driver: it cannot be restored; end "
                "the process",
                step="state",
                state=st,
            )
        t0 = self._clock()
        if st is ProcessState.CHECKPOINTED:
            try:
                self.driver.restore(pid, pairs)
            except CudaCheckpointError as e:
                left = self._state_or_none(pid)
                if left is ProcessState.LOCKED or left is None:  # restored after all?
                    left = self._unlock(pid)
                what = (
                    "it stays parked (its GPU memory in host memory): retry when its "
                    "GPUs have room, or end the process"
                    if left is ProcessState.CHECKPOINTED
                    else self._left_text(left)
                )
                raise CudaCheckpointError(
                    f"restoring process {pid} failed ({e.result or e}); {what}",
                    result=e.result,
                    step="restore",
                    state=left,
                ) from e
        if st is not ProcessState.RUNNING and self._unlock(pid) is ProcessState.LOCKED:
            raise CudaCheckpointError(
                f"process {pid} is restored but stays LOCKED: gpud could not unlock it, so its "
                "next CUDA call hangs; end the process",
                step="unlock",
                state=ProcessState.LOCKED,
            )
        return UnparkResult(seconds=self._clock() - t0, was=st)

    # -- the never-locked rule -----------------------------------------------------------

    def _size(self, pid: int) -> int | None:
        try:
            return self._memory_of(pid)
        except Exception:  # noqa: BLE001 - an estimate, never a reason to fail
            return None

    def _unlock(self, pid: int) -> ProcessState | None:
        """Unlock a LOCKED (or maybe locked) process, trying twice; the state it ends in
        (LOCKED: it could not be unlocked; None: unknown, the driver would not say)."""
        st: ProcessState | None = ProcessState.LOCKED
        for _ in range(2):
            try:
                self.driver.unlock(pid)
                unlocked = True
            except CudaCheckpointError as e:
                # ILLEGAL_STATE: it was not locked, which is what we want.
                unlocked = e.result == "CUDA_ERROR_ILLEGAL_STATE"
                if not unlocked:
                    log.warning("unlocking CUDA in process %d failed: %s", pid, e)
            st = self._state_or_none(pid)
            if st is not ProcessState.LOCKED and (unlocked or st is not None):
                return st
        return st

    def _back_to_running(self, pid: int, step: str, err: BaseException) -> ProcessState | None:
        """After a failed lock or checkpoint: undo what was done, so the process runs on."""
        st = self._state_or_none(pid)
        if st is ProcessState.CHECKPOINTED:  # the checkpoint went through after all
            try:
                self.driver.restore(pid, None)
            except CudaCheckpointError as e:
                # A failed restore may leave it LOCKED: the unlock below still applies.
                log.warning("restoring process %d after a failed %s failed: %s", pid, step, e)
            st = self._state_or_none(pid)
        if st is ProcessState.LOCKED or st is None:
            # Unknown counts as locked: unlocking a process that is not is refused harmlessly.
            st = self._unlock(pid)
        log.warning(
            "parking process %d failed at %s (%s); it is left %s",
            pid,
            step,
            err,
            st.name if st else "without CUDA state",
        )
        return st

    @staticmethod
    def _left_text(left: ProcessState | None) -> str:
        if left is ProcessState.RUNNING:
            return "it runs on as before"
        if left is ProcessState.LOCKED:
            return "it is LOCKED and gpud could not unlock it: its next CUDA call hangs; end it"
        if left is ProcessState.CHECKPOINTED:
            return "it stays parked and could not be restored: end it"
        if left is ProcessState.FAILED:
            return "its CUDA state FAILED in the driver: end it"
        return "its CUDA state is unknown (it may have exited)"

    def _explain(
        self, e: CudaCheckpointError, pid: int, step: str, left: ProcessState | None, timeout: float
    ) -> CudaCheckpointError:
        hint = ""
        if step == "lock" and e.result == "CUDA_ERROR_TIMEOUT":
            hint = f" (its CUDA work did not finish within {timeout:g} s: try again when idle)"
        elif e.result == "CUDA_ERROR_OUT_OF_MEMORY":
            hint = " (not enough host memory for its GPU state: lower park_max_bytes)"
        elif e.result == "CUDA_ERROR_NOT_PERMITTED":
            hint = " (gpud must run as root, or as the process's user)"
        return CudaCheckpointError(
            f"parking process {pid} failed at {step}: {e.result or e}{hint}; "
            f"{self._left_text(left)}",
            result=e.result,
            step=step,
            state=left,
        )


def open_cuda_checkpointer(
    driver_version: str | None = None, path: str = "libcuda.so.1"
) -> tuple[DriverCheckpointer | None, Support]:
    """The real checkpointer, or None and a :class:`Support` saying why not. Never raises.
    ``driver_version`` is NVML's display-driver version, for the messages."""
    lib, why = LibCuda.load(path)
    who = f"driver {driver_version}" if driver_version else "the driver"
    if lib is None:
        if driver_version:
            why = why.replace("the driver (", f"driver {driver_version} (", 1)
        return None, Support(ok=False, reason=why, kind="none", driver_version=driver_version)
    cuda = _cuda_text(lib.cuda_version)
    remap = lib.cuda_version >= REMAP_CUDA
    support = Support(
        ok=True,
        kind="cuda",
        driver_version=driver_version,
        cuda_version=cuda,
        remap=remap,
        reason=f"CUDA checkpoint API of {who} (CUDA {cuda}); restore onto another GPU of the "
        f"same type: {'yes' if remap else 'no (needs driver >= 580)'}",
    )
    return DriverCheckpointer(lib, support), support


def ckpt_text(s: Support) -> str:
    """One line about GPU checkpointing, for the start-up log and `gpud gpus`."""
    if s.kind == "fake":
        return f"fake ({s.reason})"
    if s.ok:
        return f"available: {s.reason}"
    return f"unavailable: {s.reason}"
