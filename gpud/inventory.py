"""Which GPU inventory this box gets: NVML's, fake GPUs, or none.

Above both gpud.gpus (NVML, the names) and gpud.testing.fake_gpus, which imports
gpud.gpus (#12: this lived in gpud.gpus, which then imported the fakes back).
"""

from __future__ import annotations

import os

from gpud.cudackpt import Checkpointer, Support, open_cuda_checkpointer
from gpud.gpus import (
    GpuInventory,
    GpuInventoryError,
    NoGpuInventory,
    NvidiaDriverNotFound,
    NvmlInventory,
)
from gpud.testing.fake_cudackpt import fake_checkpointer_from_env
from gpud.testing.fake_gpus import FakeGpuInventory, check_fake_types

__all__ = ["open_checkpointer", "open_inventory"]


def open_inventory(fake_types: list[str]) -> GpuInventory:
    """The inventory for this box.

    * NVIDIA driver with GPUs -> :class:`NvmlInventory` (``fake_types`` is ignored);
    * NVIDIA driver without GPUs -> :class:`NoGpuInventory`, with a note;
    * no NVIDIA driver -> ``FakeGpuInventory(fake_types)`` if any, else
      :class:`NoGpuInventory`.

    Raises :class:`GpuInventoryError` when the driver is there but broken: falling back to
    fakes or to no GPUs would hide the fault, or let jobs pile onto busy GPUs.
    Raises ValueError for a fake type that is not a valid GPU type.
    """
    # Checked on every box, so a typo in the config fails everywhere, not only without GPUs.
    types = check_fake_types(fake_types)
    ignored = "fake_gpus in the config is ignored: this machine has an NVIDIA driver"
    try:
        inventory = NvmlInventory(note=ignored if types else None)
    except NvidiaDriverNotFound:
        if types:
            return FakeGpuInventory(
                types, note="no NVIDIA driver found; these GPUs are FAKE (fake_gpus in the config)"
            )
        return NoGpuInventory(
            note="no NVIDIA driver found; only CPU-only jobs run (set fake_gpus in the "
            "config to try GPU jobs on fake GPUs)"
        )
    try:
        count = inventory.device_count()
    except GpuInventoryError:
        inventory.close()
        raise
    if count == 0:
        version = inventory.driver_version()
        inventory.close()
        return NoGpuInventory(
            note=f"the NVIDIA driver ({version or 'version unknown'}) reports no GPUs; only "
            "CPU-only jobs run" + (f"; {ignored}" if types else ""),
            driver_version=version,
        )
    return inventory


def open_checkpointer(inventory: GpuInventory) -> tuple[Checkpointer | None, Support]:
    """The GPU checkpointer that goes with ``inventory`` (#13), and what to report about it.

    * real GPUs (NVML) -> the driver's CUDA checkpoint API, if this driver has it;
    * fake GPUs -> the real checkpoint logic over a fake driver, reported as "fake";
    * no GPUs -> none.

    Never raises: a driver without the API is reported (with what to do), not an error,
    because everything but parking works without it.
    """
    if inventory.source == "fake":
        ckpt = fake_checkpointer_from_env(os.environ)
        return ckpt, ckpt.supported()
    if inventory.source == "nvml":
        return open_cuda_checkpointer(inventory.driver_version())
    version = inventory.driver_version()
    return None, Support(
        ok=False,
        kind="none",
        driver_version=version,
        reason="no GPUs" + (f" (driver {version})" if version else "") + ": nothing to park",
    )
