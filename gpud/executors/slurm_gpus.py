"""The cluster's GPUs, as Slurm declares them (#15): the Slurm executor's GPU inventory.

gpud's scheduler hands GPUs out from this list as it does a box's, so a job asking for
more GPUs of a type than the whole cluster has is refused at submit, as on one box; Slurm
then picks the node and the devices (``--gres=gpu:TYPE:N``). Each GPU is named
``SLURM:node:gres_type:i``; its gpud type is the GRES type mapped back through
``slurm_gpu_types``. Read with ``sinfo`` at most every ``max_age`` s.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

from gpud.domain import Gpu
from gpud.executors.slurm import gpu_uuid
from gpud.gpus import GpuInventoryError, aliases_for_type

__all__ = ["SlurmGpuInventory", "parse_gres"]

_GRES_RE = re.compile(r"^gpu(?::([^:(]+))?:(\d+)")


def parse_gres(gres: str) -> list[tuple[str, int]]:
    """sinfo's ``%G`` ("gpu:h100:2(S:0-1),gpu:a100:1") -> [(gres type, count)]; an
    untyped "gpu:4" has type "gpu"."""
    out = []
    for item in gres.split(","):
        m = _GRES_RE.match(item.strip())
        if m:
            out.append((m.group(1) or "gpu", int(m.group(2))))
    return out


class SlurmGpuInventory:
    source = "slurm"

    def __init__(self, gpu_types: dict[str, str], max_age: float = 10.0) -> None:
        #: the cluster's GRES type -> gpud's type
        self._back = {v: k for k, v in gpu_types.items()}
        self.max_age = max_age
        self.note: str | None = "GPUs of the Slurm cluster (from sinfo)"
        self._lock = threading.Lock()
        self._cached: list[Gpu] | None = None
        self._at = 0.0

    def snapshot(self) -> list[Gpu]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._at > self.max_age:
                self._cached = self._read()
                self._at = time.monotonic()
            return list(self._cached)

    def _read(self) -> list[Gpu]:
        try:
            out = subprocess.run(
                ["sinfo", "-N", "-h", "-o", "%N|%G"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise GpuInventoryError(f"sinfo: {e}") from None
        if out.returncode != 0:
            raise GpuInventoryError(f"sinfo failed: {out.stderr.strip()}")
        gpus: list[Gpu] = []
        seen: set[str] = set()
        for line in out.stdout.splitlines():
            node, _, gres = line.partition("|")
            if node in seen:  # a node in several partitions is listed once per partition
                continue
            seen.add(node)
            for gtype, count in parse_gres(gres):
                short = self._back.get(gtype, gtype).lower()
                for i in range(count):
                    gpus.append(
                        Gpu(
                            index=len(gpus),
                            uuid=gpu_uuid(node, gtype, i),
                            name=f"{gtype} on {node} (Slurm)",
                            type=short,
                            aliases=aliases_for_type(short),
                        )
                    )
        return gpus

    def driver_version(self) -> str | None:
        return None

    def close(self) -> None:
        return None
