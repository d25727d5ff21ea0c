"""Submit-to-result latency through the Slurm executor (#15), against raw sbatch in the same run.

    .venv/bin/python bench/slurm.py [--calls N]

Needs root: it starts the single-node Slurm of ../shared/ci/slurm-local.sh (and stops it
at the end if it started it), then a `gpud serve` with executor = "slurm" on a temporary
directory. It times, one after the other, N of each:

* ``gpud_remote``: ``square.remote(7)`` through the daemon, submit to result;
* ``sbatch_wait``: ``sbatch --wait`` of a script running ``python -c pass``;
* ``sbatch_poll``: ``sbatch --parsable`` of the same script, then ``squeue`` every 20 ms
  until the job is over (sbatch --wait polls less often: the fairer baseline).

It prints the median of each and gpud's ratio to both baselines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpud.testing.daemon_proc import DaemonProc  # noqa: E402

SLURM_LOCAL = REPO.parent / "shared" / "ci" / "slurm-local.sh"


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _raw(script: Path, calls: int, wait: bool) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        if wait:
            subprocess.run(["sbatch", "--wait", "-Q", "-o", "/dev/null", str(script)], check=True)
        else:
            sid = subprocess.run(
                ["sbatch", "--parsable", "-o", "/dev/null", str(script)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            while True:
                st = subprocess.run(
                    ["squeue", "-h", "-t", "all", "-j", sid, "-o", "%T"],
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                if st and st not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                    break
                time.sleep(0.02)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/slurm.py needs root (it starts a local Slurm)", file=sys.stderr)
        return 2
    was_running = subprocess.run(["bash", str(SLURM_LOCAL), "status"], capture_output=True)
    started = subprocess.run(
        ["bash", str(SLURM_LOCAL), "start"], capture_output=True, text=True, check=True
    )
    os.environ["SLURM_CONF"] = started.stdout.strip().split("=", 1)[1]
    base = Path(tempfile.mkdtemp(prefix="gpud-bench-slurm-", dir="/tmp"))
    d = DaemonProc(
        base,
        env={
            "GPUD_EXECUTOR": "slurm",
            "GPUD_GPUS": "auto",
            "GPUD_SLURM_SHARED_DIR": str(base / "shared"),
            "GPUD_RETENTION_INTERVAL": "none",
        },
    )
    try:
        d.start()
        os.environ["GPUD_URL"] = d.url
        # The admin's interpreter: this venv's may sit where the job user cannot go.
        os.environ["GPUD_JOB_PYTHON"] = "daemon"
        import gpud_client as gpud

        app = gpud.App("bench-slurm")

        @app.function()
        def square(x: int) -> int:
            return x * x

        assert square.remote(7) == 49  # warm up the daemon and the interpreter probe
        remote = []
        for _ in range(args.calls):
            t = time.perf_counter()
            assert square.remote(7) == 49
            remote.append(time.perf_counter() - t)
        app.close()
        script = base / "raw.sh"
        script.write_text(f"#!/bin/sh\nexec {sys.executable} -c pass\n")
        waited = _raw(script, args.calls, wait=True)
        polled = _raw(script, args.calls, wait=False)
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
        if was_running.returncode != 0:
            subprocess.run(["bash", str(SLURM_LOCAL), "stop"], capture_output=True)
    g, w, p = _median_ms(remote), _median_ms(waited), _median_ms(polled)
    print(f"{'metric':<14} {'median ms':>10}   ({args.calls} calls each)")
    print(f"{'gpud_remote':<14} {g:>10.0f}")
    print(f"{'sbatch_wait':<14} {w:>10.0f}")
    print(f"{'sbatch_poll':<14} {p:>10.0f}")
    print(f"ratio gpud_remote / sbatch_wait = {g / w:.2f}")
    print(f"ratio gpud_remote / sbatch_poll = {g / p:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
