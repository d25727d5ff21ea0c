"""What GPUs this box has, and what is running on them.

The daemon asks a :class:`GpuInventory` for a :meth:`~GpuInventory.snapshot` every couple
of seconds from a worker thread. Three inventories exist:

* :class:`NvmlInventory` reads the real GPUs through NVML (the library behind nvidia-smi);
* ``gpud.testing.FakeGpuInventory`` invents GPUs, for machines without an NVIDIA driver;
* :class:`NoGpuInventory` has no GPUs: gpud then runs CPU-only jobs only.

:func:`gpud.inventory.open_inventory` picks one. Fakes are only ever used on a box with
no NVIDIA driver: on a box with a driver, fake GPUs would let two jobs share one real GPU
unnoticed.

GPU types are short names users write in ``gpu="h100:2"``; :func:`normalize_name` derives
them from the marketing name NVML reports.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import pynvml  # type: ignore[import-untyped]  # ships no hints

from gpud.domain import Gpu, GpuProcess

__all__ = [
    "GpuInventory",
    "GpuInventoryError",
    "NoGpuInventory",
    "NvidiaDriverNotFound",
    "NvmlInventory",
    "aliases_for_type",
    "normalize_name",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Names

#: Words that say nothing about which GPU it is: vendor and brand words, form factors
#: (SXM/PCIe/NVL boards of one chip take the same jobs), memory technology, filler.
_NOISE_RE = re.compile(
    r"^(nvidia|geforce|tesla|quadro|gpu|generation|edition|server|workstation|blackwell"
    r"|pcie|sxm\d*|nvl|fhhl|dgxs|hbm\d*e?)$"
)
#: A memory size token, e.g. "80GB" in "A100-SXM4-80GB" or "144G" in "GH200 144G HBM3e".
_MEMORY_RE = re.compile(r"^(\d+)gb?$")
#: Families whose every variant has plenty of memory, so the size in the name is dropped
#: and "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are all "h100".
#: Elsewhere (A100 40GB vs 80GB) the size decides whether a job fits, so it stays.
_SIZE_BLIND = frozenset({"h100", "h200", "h800", "h20", "gh200", "b100", "b200", "gb200"})
#: "a100-80gb" -> family "a100".
_SIZED_TYPE_RE = re.compile(r"^(?P<family>[a-z0-9][a-z0-9._-]*)-(?P<gb>\d+)gb$")


def normalize_name(name: str) -> tuple[str, tuple[str, ...]]:
    """Turn an NVML marketing name into ``(type, aliases)``.

    ``"NVIDIA H100 80GB HBM3"`` -> ``("h100", ())``; ``"NVIDIA A100-SXM4-80GB"`` ->
    ``("a100-80gb", ("a100",))``; ``"NVIDIA RTX A6000"`` -> ``("rtxa6000", ("a6000",))``.
    Unknown names get a deterministic slug: vendor words and form factors dropped, the
    rest lower-cased and kept alphanumeric. The type always matches
    ``^[a-z0-9][a-z0-9._-]*$``; a name with nothing usable in it becomes ``"unknown"``.
    """
    s = name.lower()
    # Laptop parts: keep them apart from the desktop card of the same number.
    s = s.replace("with max-q design", "maxq").replace("max-q", "maxq")
    tokens = [t for t in re.split(r"[\s\-_/,()]+", s) if t]
    memory_gb: int | None = None
    kept: list[str] = []
    for token in tokens:
        if _NOISE_RE.match(token):
            continue
        m = _MEMORY_RE.match(token)
        if m:
            memory_gb = int(m.group(1))
            continue
        kept.append(re.sub(r"[^a-z0-9]", "", token))
    family = "".join(kept) or "unknown"
    gpu_type = family
    if memory_gb is not None and family not in _SIZE_BLIND and family != "unknown":
        gpu_type = f"{family}-{memory_gb}gb"
    return gpu_type, aliases_for_type(gpu_type)


def aliases_for_type(gpu_type: str) -> tuple[str, ...]:
    """The other types a GPU of ``gpu_type`` answers to.

    A sized type answers to its family (``"a100-80gb"`` -> ``("a100",)``), so ``gpu="a100"``
    takes either size; RTX A-series cards answer to the name people say
    (``"rtxa6000"`` -> ``("a6000",)``). Being a function of the type alone, the same
    aliases apply to real and fake GPUs.
    """
    m = _SIZED_TYPE_RE.match(gpu_type)
    if m:
        family = m.group("family")
        return (family, *aliases_for_type(family))
    if re.match(r"^rtxa\d+$", gpu_type):
        return (gpu_type[3:],)
    return ()


# ---------------------------------------------------------------------------------------
# Inventories


class GpuInventoryError(RuntimeError):
    """The GPUs cannot be read; the message says what an admin should do."""


class NvidiaDriverNotFound(GpuInventoryError):
    """NVML's library is not on this machine: there is no NVIDIA driver, so no GPU."""


@runtime_checkable
class GpuInventory(Protocol):
    #: "nvml", "fake" or "none".
    source: str
    #: Something to tell a person about these GPUs (shown in status output), or None.
    note: str | None

    def snapshot(self) -> list[Gpu]:
        """The GPUs as they are now, by index. Blocking: call it from a worker thread.

        Raises :class:`GpuInventoryError` when the GPUs cannot be read.
        """
        ...

    def driver_version(self) -> str | None: ...

    def close(self) -> None:
        """Release the inventory; idempotent. :meth:`snapshot` raises afterwards."""
        ...


class NoGpuInventory:
    """A box without GPUs: every snapshot is empty, so only CPU-only jobs run."""

    source = "none"

    def __init__(self, note: str | None = None, driver_version: str | None = None) -> None:
        self.note = note
        self._driver_version = driver_version

    def snapshot(self) -> list[Gpu]:
        return []

    def driver_version(self) -> str | None:
        return self._driver_version

    def close(self) -> None:
        pass


def _nvml_error_text(e: BaseException) -> str:
    # NVMLError's str is the bare description ("Driver Not Loaded"); the class name is what
    # people search for, so give both.
    return f"{type(e).__name__}: {e}"


def _text(value: str | bytes) -> str:
    # pynvml returns str today but returned bytes in older releases.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


_T = TypeVar("_T")


class NvmlInventory:
    """The real GPUs, read through NVML.

    ``index`` is NVML's (PCI bus) order, which is what nvidia-smi shows; CUDA's default
    order may differ, so jobs should be pointed at GPUs by UUID, never by index.
    Any one reading a GPU does not support comes back as None; a GPU whose identity or
    processes cannot be read at all fails the whole snapshot, because handing out a GPU
    that might be busy is worse than handing out none.
    """

    source = "nvml"

    def __init__(self, note: str | None = None) -> None:
        """Start NVML. Raises :class:`NvidiaDriverNotFound` when there is no driver and
        :class:`GpuInventoryError` when the driver is there but NVML will not start."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound as e:
            raise NvidiaDriverNotFound(
                f"no NVIDIA driver found (NVML: {_nvml_error_text(e)})"
            ) from e
        except pynvml.NVMLError as e:
            raise GpuInventoryError(
                f"the NVIDIA driver is installed but NVML would not start "
                f"({_nvml_error_text(e)}). Run `nvidia-smi` to see what is wrong and fix "
                "the driver; gpud does not start without knowing which GPUs are busy."
            ) from e
        self._lock = threading.Lock()
        self._closed = False
        self._base_note = note
        self.note = note
        try:
            self._driver_version: str | None = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            self._driver_version = None

    def device_count(self) -> int:
        with self._lock:
            return self._count()

    def driver_version(self) -> str | None:
        return self._driver_version

    def snapshot(self) -> list[Gpu]:
        with self._lock:
            warnings: list[str] = []
            gpus = [self._read(index, warnings) for index in range(self._count())]
            # The note is rebuilt every time so a warning goes away once it no longer holds.
            self.note = "; ".join(x for x in (self._base_note, *warnings) if x) or None
            return gpus

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as e:  # nothing to do about it at shutdown
                log.debug("nvmlShutdown failed: %s", _nvml_error_text(e))

    def _count(self) -> int:
        if self._closed:
            raise GpuInventoryError("the GPU inventory is closed")
        try:
            return int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as e:
            raise GpuInventoryError(
                f"NVML cannot count the GPUs ({_nvml_error_text(e)}); run `nvidia-smi`"
            ) from e

    def _read(self, index: int, warnings: list[str]) -> Gpu:
        def failed(what: str, e: Exception) -> GpuInventoryError:
            return GpuInventoryError(
                f"NVML cannot read the {what} of GPU {index} ({_nvml_error_text(e)}); "
                "run `nvidia-smi` to check on it"
            )

        def must(what: str, fn: Callable[..., _T], *args: object) -> _T:
            try:
                return fn(*args)
            except (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError) as e:
                raise failed(what, e) from e

        def maybe(what: str, fn: Callable[..., _T], *args: object) -> _T | None:
            # Not every GPU has every sensor (GeForce cards lack some, vGPUs lack many).
            try:
                return fn(*args)
            except pynvml.NVMLError_NotSupported:
                return None
            except (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError) as e:
                raise failed(what, e) from e

        handle = must("handle", pynvml.nvmlDeviceGetHandleByIndex, index)
        name = _text(must("name", pynvml.nvmlDeviceGetName, handle))
        gpu_type, aliases = normalize_name(name)
        memory = maybe("memory", pynvml.nvmlDeviceGetMemoryInfo, handle)
        rates = maybe("utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = maybe("power draw", pynvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = maybe("power limit", pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        raw = maybe("processes", _compute_processes, handle)
        if raw is None:
            warnings.append(
                f"GPU {index} does not report its processes, so gpud cannot see programs "
                "it did not start there"
            )
        return Gpu(
            index=index,
            uuid=_text(must("UUID", pynvml.nvmlDeviceGetUUID, handle)),
            name=name,
            type=gpu_type,
            aliases=aliases,
            # Gpu has no "unknown" for memory sizes, so an unreadable one shows as 0.
            memory_total=int(memory.total) if memory is not None else 0,
            memory_used=int(memory.used) if memory is not None else 0,
            utilization=int(rates.gpu) if rates is not None else None,
            memory_utilization=int(rates.memory) if rates is not None else None,
            temperature=maybe(
                "temperature", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
            ),
            power_w=power_mw / 1000 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
            processes=tuple(
                GpuProcess(
                    pid=int(p.pid),
                    used_memory=int(p.usedGpuMemory) if p.usedGpuMemory is not None else None,
                )
                for p in raw or ()
            ),
            fake=False,
        )


def _compute_processes(handle: object) -> list[Any]:
    # Compute processes only: a desktop's Xorg holds a graphics context on the GPU forever
    # and must not make it look busy. The unversioned call wants a driver new enough for
    # the v3 struct; older drivers (< 510 or so) only have v2.
    try:
        return list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except pynvml.NVMLLibraryMismatchError:
        return list(pynvml.nvmlDeviceGetComputeRunningProcesses_v2(handle))
