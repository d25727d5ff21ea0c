#!/usr/bin/env python3
"""Preemption on a real GPU (#13), against a running gpud with preempt_after set:

    GPUD_URL=unix:///path/gpud.sock python3 scripts/gpu_preempt_check.py [--gib 4] [--timeout 240]

1. a priority-0 torch loop on gpu="any" fills --gib GiB of GPU memory with a seeded tensor
   and adds it up step by step, writing its progress to a file;
2. a priority-10 job on gpu="any" is submitted; after the daemon's preempt_after the loop
   is suspended for it ("suspended for job N (priority 10 > 0)"): its GPU state is parked,
   NVML shows the loop's memory freed (real GPUs), its progress file stops growing;
3. the priority-10 job runs and succeeds; then the loop resumes, finishes, and its checksum
   equals the one computed before it was suspended.

Without torch (or on fake GPUs) the loop runs on the CPU, which exercises everything but the
GPU memory. Prints PASS/FAIL lines; exit 0 only if every check passed. Bounded by --timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from gpu_check_common import Report, gpu_used, until

import gpud_client as gpud  # gpu_check_common put this tree first on sys.path

REPORT = Report()
out = REPORT.check


@gpud.function(gpu="any", timeout=900, name="gpu-check.preempt_low")
def low_loop(progress: str, gib: float, steps: int) -> dict:
    import time

    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("no CUDA")
        g = torch.Generator(device="cuda")
        g.manual_seed(7)
        x = torch.randint(
            0, 1000, (int(gib * 2**30) // 8,), dtype=torch.int64, device="cuda", generator=g
        )
        first = int(x.sum().item())
        total = 0
        for i in range(steps):
            total += int(x[i::steps].sum().item())
            with open(progress, "a") as fh:
                fh.write(f"{i}\n")
            time.sleep(0.1)
        return {"before": first, "after": total, "where": "cuda"}
    except ImportError:
        total = 0
        for i in range(steps):
            total += sum(range(i * 1000, (i + 1) * 1000))
            with open(progress, "a") as fh:
                fh.write(f"{i}\n")
            time.sleep(0.1)
        return {"before": sum(range(steps * 1000)), "after": total, "where": "cpu"}


@gpud.function(gpu="any", timeout=300, priority=10, name="gpu-check.preempt_high")
def high_job() -> int:
    import time

    time.sleep(3)  # long enough to see the preempted loop stand still
    try:
        import torch

        return int(torch.arange(1000, device="cuda").sum().item())
    except ImportError:
        return sum(range(1000))


def lines(p: Path) -> int:
    try:
        return p.read_text().count("\n")
    except FileNotFoundError:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=240.0)
    a = ap.parse_args()
    deadline = time.monotonic() + a.timeout
    work = Path(tempfile.mkdtemp(prefix="gpud-preempt-"))
    os.chmod(work, 0o777)
    progress = work / "progress.txt"
    low = low_loop.spawn(str(progress), a.gib, a.steps)
    if not until(lambda: lines(progress) >= 3, deadline - time.monotonic()):
        out(False, f"the low-priority loop (job {low.id}) did not start: {low.status().reason}")
        low.cancel_quietly()
        return 1
    info = low.status()
    index = info.gpu_indices[0] if info.gpu_indices else 0
    before = gpu_used(index)
    high = high_job.spawn()
    suspended = until(lambda: low.status().state == "suspended", deadline - time.monotonic())
    st = low.status()
    out(
        suspended
        and (st.reason or "").startswith(f"suspended for job {high.id} (priority 10 > 0)"),
        f"job {low.id} was preempted for job {high.id}: {st.state}, {st.reason!r}",
    )
    if suspended:
        during = gpu_used(index)
        if before is not None and during is not None:
            out(
                during < before - a.gib * 2**30 * 0.5,
                f"NVML shows the loop's memory freed: {before / 2**30:.1f} GiB -> "
                f"{during / 2**30:.1f} GiB used on GPU {index}",
            )
        time.sleep(0.3)  # a step in flight when it stopped lands
        frozen = lines(progress)
        time.sleep(1.0)
        out(lines(progress) == frozen, f"no progress while suspended ({frozen} steps)")
    try:
        out(high_job_result(high, deadline) == sum(range(1000)), f"job {high.id} succeeded")
        v = low.get(timeout=max(1.0, deadline - time.monotonic()))
        out(
            v["before"] == v["after"],
            f"job {low.id} resumed and finished with the right "
            f"checksum on {v['where']}: {v['after']} == {v['before']}",
        )
        out(lines(progress) == a.steps, f"it made all {a.steps} steps")
    except Exception as e:  # noqa: BLE001 - a check script: report, go on
        out(False, f"{type(e).__name__}: {e}")
        low.cancel_quietly()
        high.cancel_quietly()
    return 1 if REPORT.failed else 0


def high_job_result(high, deadline: float) -> int:  # type: ignore[no-untyped-def]  # a script
    return int(high.get(timeout=max(1.0, deadline - time.monotonic())))


if __name__ == "__main__":
    sys.exit(main())
