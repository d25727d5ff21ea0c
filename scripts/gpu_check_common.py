"""What the GPU machine's Python checks share (scripts/gpu_ckpt_check.py,
gpu_preempt_check.py, gpu_park_check.py): the PASS/FAIL report that scripts/gpu-check.sh
counts, NVML reads that say None where there is no NVML (fake GPUs), and a bounded wait.

Importing it puts the repository first on sys.path, so the checks import this tree's gpud
without installing it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: GB/s per lane and direction after line encoding (8b/10b for gen 1-2, 128b/130b for 3-5,
#: FLIT for 6).
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


class Report:
    """PASS/FAIL lines, counted; figures for a JSON summary."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.figures: dict[str, object] = {}

    def check(self, good: bool, text: str) -> bool:
        print(("PASS: " if good else "FAIL: ") + text, flush=True)
        if good:
            self.passed += 1
        else:
            self.failed += 1
        return good

    def info(self, text: str) -> None:
        print("      " + text, flush=True)


def gpu_used(index: int) -> int | None:
    """Bytes in use on GPU `index` by NVML; None without NVML (fake GPUs): not measured."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:  # noqa: BLE001 - no NVML, fake GPUs: not measured
        return None


def pcie_gbps(index: int) -> float | None:
    """GPU `index`'s PCIe link limit in GB/s, one direction (its max generation and width);
    None where NVML cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        gen = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
        width = pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)
        per_lane = PCIE_LANE_GBS.get(int(gen))
        return per_lane * int(width) if per_lane else None
    except Exception:  # noqa: BLE001 - a check script: report, go on
        return None


def until(pred: Callable[[], bool], timeout: float) -> bool:
    """Polls `pred` every 0.1 s until it is true (True) or `timeout` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False
