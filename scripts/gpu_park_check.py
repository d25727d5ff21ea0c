#!/usr/bin/env python3
"""Parking an idle warm worker on a real GPU (#13 item 2), against a running gpud:

    GPUD_URL=unix:///path/gpud.sock python3 scripts/gpu_park_check.py [--gib 8] \
        [--log daemon.log] [--timeout 240]

1. a keep_warm torch function loads --gib GiB onto its GPU (a seeded tensor) and returns
   its checksum: a cold call, timed;
2. a job needing that GPU (gpu="any", the only free one is the worker's on a one-GPU box;
   on a bigger box it asks for every GPU) is submitted: the idle worker is parked, not
   ended. `gpud gpus` lists it with its size, NVML shows its memory freed while the job
   runs, and the job itself sees the memory free (torch.cuda.mem_get_info);
3. the next call of the function unparks it: the same process (pid), start_kind
   "unparked", its tensor's checksum intact; its wall time and startup are printed against
   a cold call that loads the same state (target: < 2 s);
4. with --log (the daemon's log), the park and unpark seconds and GB/s are printed against
   the PCIe link's limit (NVML's max link generation and width).

Without torch (or on fake GPUs) the state is a bytearray in host memory: everything but
the GPU memory is exercised. Prints PASS/FAIL lines; exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from gpu_check_common import Report, gpu_used, pcie_gbps, until

import gpud_client as gpud  # gpu_check_common put this tree first on sys.path
from gpud_client import Client

REPORT = Report()
out, info = REPORT.check, REPORT.info
_state: dict = {}


def model(gib: float) -> dict:
    """Loads its state once per process (the module global survives warm calls)."""
    import os
    import time

    t0 = time.monotonic()
    loaded = "x" in _state
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("no CUDA")
        if not loaded:
            g = torch.Generator(device="cuda")
            g.manual_seed(13)
            _state["x"] = torch.randint(
                0, 1000, (int(gib * 2**30) // 8,), dtype=torch.int64, device="cuda", generator=g
            )
            torch.cuda.synchronize()
        checksum = int(_state["x"].sum().item())
        where = "cuda"
    except ImportError:
        if not loaded:
            _state["x"] = bytearray(os.urandom(1 << 20)) * max(1, int(gib * 1024) // 64)
        checksum = sum(_state["x"][::4096])
        where = "cpu"
    return {
        "pid": os.getpid(),
        "checksum": checksum,
        "loaded_before": loaded,
        "seconds": time.monotonic() - t0,
        "where": where,
    }


def needy(hold: float) -> dict:
    import time

    free = total = None
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
    except ImportError:
        pass
    time.sleep(hold)  # long enough for NVML to be read meanwhile
    return {"free": free, "total": total}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--log", type=Path, default=None, help="the daemon's log, for figures")
    ap.add_argument("--timeout", type=float, default=240.0)
    a = ap.parse_args()
    deadline = time.monotonic() + a.timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    mod = sys.modules[__name__]
    import cloudpickle

    cloudpickle.register_pickle_by_value(mod)  # the functions travel by value, not by import
    warm = gpud.function(model, gpu="any", keep_warm=600, timeout=600, name="gpu-check.park_model")
    cold = gpud.function(
        model, gpu="any", timeout=600, name="gpu-check.park_cold", env={"GPU_CHECK": "cold"}
    )
    with Client() as c:
        n_gpus = len(c.gpus().gpus)
    t0 = time.monotonic()
    h1 = warm.spawn(a.gib)
    first = h1.get(timeout=left())
    first_wall = time.monotonic() - t0
    s1 = h1.status()
    index = s1.gpu_indices[0] if s1.gpu_indices else 0
    info(
        f"cold call (job {h1.id}): loaded {a.gib:g} GiB on {first['where']} GPU {index} in "
        f"{first['seconds']:.2f} s; wall {first_wall:.2f} s, startup {s1.startup}"
    )
    before = gpu_used(index)

    # 2. a job that needs the worker's GPU: every GPU of the box.
    hn = gpud.function(
        needy,
        gpu=f"any:{n_gpus}" if n_gpus > 1 else "any",
        timeout=300,
        name="gpu-check.park_needy",
    ).spawn(4.0)
    with Client() as c:
        parked_ok = until(lambda: len(c.gpus().parked) == 1, left())
        parked = c.gpus().parked
    out(
        parked_ok,
        f"the idle worker was parked for job {hn.id}: "
        + (f"{parked[0].bytes / 2**30:.2f} GiB in host memory" if parked else "none listed"),
    )
    during = None
    if until(lambda: hn.status().state == "running", left()):
        time.sleep(1.0)
        during = gpu_used(index)
    if before is not None and during is not None:
        out(
            during < before - a.gib * 2**30 * 0.8,
            f"NVML shows the worker's memory freed: {before / 2**30:.1f} GiB -> "
            f"{during / 2**30:.1f} GiB used on GPU {index}",
        )
    got = hn.get(timeout=left())
    if got["free"] is not None:
        info(f"job {hn.id} saw {got['free'] / 2**30:.1f} of {got['total'] / 2**30:.1f} GiB free")

    # 3. the next call unparks it.
    t0 = time.monotonic()
    h3 = warm.spawn(a.gib)
    third = h3.get(timeout=left())
    wall = time.monotonic() - t0
    s3 = h3.status()
    out(
        s3.start_kind == "unparked" and third["pid"] == first["pid"] and third["loaded_before"],
        f"the next call (job {h3.id}) unparked the same process: start_kind {s3.start_kind}, "
        f"pid {third['pid']} (was {first['pid']})",
    )
    out(
        third["checksum"] == first["checksum"],
        f"its tensor's checksum is intact: {third['checksum']} == {first['checksum']}",
    )
    t0 = time.monotonic()
    hc = cold.spawn(a.gib)
    cold_r = hc.get(timeout=left())
    cold_wall = time.monotonic() - t0
    out(
        wall < 2.0,
        f"unparked call: {wall:.2f} s wall (startup {s3.startup}) against a cold "
        f"call loading the same state: {cold_wall:.2f} s (startup {hc.status().startup}, "
        f"load {cold_r['seconds']:.2f} s): {cold_wall / max(wall, 1e-9):.1f}x",
    )

    # 4. the daemon's figures.
    if a.log is not None and a.log.exists():
        text = a.log.read_text(errors="replace")
        limit = pcie_gbps(index)
        for what in ("parked", "unparked"):
            m = re.findall(
                rf"{what} warm worker \d+ .*?(\d+) MiB.*? in ([\d.]+) s \(([\d.]+) "
                r"GB/s\)",
                text,
            )
            if m:
                mib, secs, gbps = m[-1]
                info(
                    f"{what}: {int(mib) / 1024:.2f} GiB in {float(secs):.2f} s = {gbps} GB/s"
                    + (
                        f" ({float(gbps) / limit:.0%} of the PCIe link's {limit:.0f} GB/s)"
                        if limit
                        else ""
                    )
                )
    return 1 if REPORT.failed else 0


if __name__ == "__main__":
    sys.exit(main())
