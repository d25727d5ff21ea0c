"""Fake GPUs, for machines without an NVIDIA driver: laptops, CI, tests.

``fake_gpus = ["h100", "h100"]`` in the config gives two GPUs that the scheduler hands out
like real ones, so GPU jobs can be tried end to end without hardware. Jobs on them run
with no GPU at all; the inventory's note says so wherever the GPUs are listed.

Tests drive them with :meth:`FakeGpuInventory.set_processes` (a process gpud did not start
appears on a GPU) and :meth:`FakeGpuInventory.set_error` (NVML stops answering).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence

from gpud.domain import Gpu, GpuProcess
from gpud.gpus import GpuInventoryError, aliases_for_type

__all__ = ["FakeGpuInventory", "check_fake_types", "fake_uuid"]

_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_GIB = 1024**3
#: Memory of the common types, so memory columns look like the real thing. Sized types
#: ("a100-40gb") carry their size in the name; anything else gets 24 GiB.
_MEMORY_GIB = {
    "h100": 80,
    "h200": 141,
    "gh200": 96,
    "b200": 180,
    "a100": 80,
    "l40s": 48,
    "l40": 48,
    "a40": 48,
    "rtxa6000": 48,
    "rtx6000ada": 48,
    "l4": 24,
    "a10g": 24,
    "t4": 16,
    "v100": 16,
}
_DEFAULT_MEMORY_GIB = 24
_SIZED_RE = re.compile(r"-(\d+)gb$")


def check_fake_types(types: Sequence[str]) -> list[str]:
    """Lower-case and validate the ``fake_gpus`` list; raise ValueError saying what is wrong."""
    if isinstance(types, str):
        # A bare string would otherwise be taken letter by letter as "h", "1", "0", "0".
        raise ValueError(f"fake_gpus must be a list of GPU types, e.g. [{types!r}], not a string")
    out: list[str] = []
    for raw in types:
        t = str(raw).strip().lower()
        if not _TYPE_RE.match(t) or t == "any":
            raise ValueError(
                f"invalid fake GPU type {raw!r}: use a GPU type such as 'h100' or 'a100-80gb' "
                "(lower-case letters, digits, '.', '_' and '-'; not 'any')"
            )
        out.append(t)
    return out


def fake_uuid(index: int) -> str:
    """The UUID of fake GPU ``index``; "fake" in it makes it impossible to mistake for real."""
    return f"GPU-00000000-fake-4000-8000-{index:012d}"


def _memory_total(gpu_type: str) -> int:
    m = _SIZED_RE.search(gpu_type)
    if m:
        return int(m.group(1)) * _GIB
    return _MEMORY_GIB.get(gpu_type, _DEFAULT_MEMORY_GIB) * _GIB


class FakeGpuInventory:
    """GPUs that do not exist: ``FakeGpuInventory(["h100", "h100"])``.

    Indices follow the list; aliases are those of real GPUs of that type
    (``"a100-80gb"`` answers to ``"a100"`` too). Thread-safe: the daemon snapshots from a
    worker thread while tests change processes from theirs.
    """

    source = "fake"

    def __init__(self, types: Sequence[str], note: str | None = None) -> None:
        self.types = check_fake_types(types)
        self.note: str | None = note or "these GPUs are FAKE (fake_gpus in the config)"
        self._lock = threading.Lock()
        self._processes: dict[int, tuple[GpuProcess, ...]] = {}
        self._error: str | None = None
        self._closed = False

    def set_processes(self, index: int, processes: Iterable[GpuProcess]) -> None:
        """Make GPU ``index`` show ``processes`` (replacing any before) from the next snapshot."""
        procs = tuple(processes)
        for p in procs:
            if not isinstance(p, GpuProcess):
                raise TypeError(f"set_processes wants GpuProcess objects, got {p!r}")
        with self._lock:
            if not 0 <= index < len(self.types):
                raise IndexError(f"no fake GPU {index}: there are {len(self.types)}")
            self._processes[index] = procs

    def set_error(self, message: str | None) -> None:
        """Make every snapshot raise GpuInventoryError(message) until called with None."""
        with self._lock:
            self._error = message

    def snapshot(self) -> list[Gpu]:
        with self._lock:
            if self._closed:
                raise GpuInventoryError("the GPU inventory is closed")
            if self._error is not None:
                raise GpuInventoryError(self._error)
            gpus: list[Gpu] = []
            for index, gpu_type in enumerate(self.types):
                procs = self._processes.get(index, ())
                total = _memory_total(gpu_type)
                used = sum(p.used_memory or 0 for p in procs)
                gpus.append(
                    Gpu(
                        index=index,
                        uuid=fake_uuid(index),
                        name=f"FAKE NVIDIA {gpu_type.upper()}",
                        type=gpu_type,
                        aliases=aliases_for_type(gpu_type),
                        memory_total=total,
                        memory_used=min(used, total),
                        utilization=0,
                        memory_utilization=0,
                        processes=procs,
                        fake=True,
                    )
                )
            return gpus

    def driver_version(self) -> str | None:
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
