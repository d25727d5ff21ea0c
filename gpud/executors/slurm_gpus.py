"""The cluster's GPUs, as Slurm declares them (#15): the Slurm executor's GPU inventory.

gpud's scheduler hands GPUs out from this list as it does a box's, so a job asking for
more GPUs of a type than the whole cluster has is refused at submit, as on one box; Slurm
then picks the node and the devices (``--gres=gpu:TYPE:N``). Each GPU is named
``SLURM:node:gres_type:i``; its gpud type is the GRES type mapped back through
``slurm_gpu_types``. Read with ``sinfo`` at most every ``max_age`` s.

Which job holds which GPU comes from Slurm too (``scontrol -d -o show job``: each running
job's ``GRES=gpu:h100:1(IDX:0)`` per node), since Slurm, not gpud, picks the devices: a
gpud job is shown on the GPU Slurm gave it, and a cluster job gpud did not submit is shown
as what it is.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import threading
import time

from gpud.domain import ClusterHolder, Gpu
from gpud.executors.slurm import gpu_uuid
from gpud.gpus import GpuInventoryError, aliases_for_type

__all__ = ["SlurmGpuInventory", "expand_hostlist", "parse_gres", "parse_holders"]

_GRES_RE = re.compile(r"^gpu(?::([^:(]+))?:(\d+)")
#: one node group of a running job in ``scontrol -d -o show job``
_NODES_RE = re.compile(r"\bNodes=(\S+) CPU_IDs=\S+ Mem=\S+ GRES=(\S*)")
#: one GRES of such a group: gpu:h100:2(IDX:0-1), gpu:h100(IDX:0), gpu:1(IDX:3)
_GRES_IDX_RE = re.compile(r"gpu(?::([^:(,]+))?(?::\d+)?\(IDX:([0-9,\-]+)\)")


def parse_gres(gres: str) -> list[tuple[str, int]]:
    """sinfo's ``%G`` ("gpu:h100:2(S:0-1),gpu:a100:1") -> [(gres type, count)]; an
    untyped "gpu:4" has type "gpu"."""
    out = []
    for item in gres.split(","):
        m = _GRES_RE.match(item.strip())
        if m:
            out.append((m.group(1) or "gpu", int(m.group(2))))
    return out


def _ranges(text: str) -> list[int]:
    """ "0-2,5" -> [0, 1, 2, 5]."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out.extend(range(int(lo), int(hi if hi.isdigit() else lo) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed node names: "gpu[01-03,07],login" -> gpu01, gpu02, gpu03, gpu07,
    login (one bracket group per name, as Slurm prints them; zero padding kept)."""
    names: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", text):
        prefix, spec = m.group(1), m.group(2)
        if spec is None:
            names.append(prefix)
            continue
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            if lo.isdigit() and (not hi or hi.isdigit()):
                names.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi or lo) + 1))
    return names


def parse_holders(text: str) -> dict[tuple[str, str, int], ClusterHolder]:
    """``scontrol -d -o show job`` (one job a line) -> (node, GRES type, index) -> the
    running job holding that GPU."""
    held: dict[tuple[str, str, int], ClusterHolder] = {}
    for line in text.splitlines():
        fields = dict(
            f.split("=", 1) for f in line.split() if "=" in f and not f.startswith("Nodes=")
        )
        if fields.get("JobState") != "RUNNING" or not fields.get("JobId", "").isdigit():
            continue
        array_job, task = fields.get("ArrayJobId", ""), fields.get("ArrayTaskId", "")
        if array_job.isdigit() and task.isdigit():
            holder = ClusterHolder(
                job=f"{array_job}_{task}",
                user=fields.get("UserId", "?").split("(", 1)[0],
                key=(int(array_job), int(task) + 1),
            )
        else:
            holder = ClusterHolder(
                job=fields["JobId"],
                user=fields.get("UserId", "?").split("(", 1)[0],
                key=(int(fields["JobId"]), 0),
            )
        for nodes, gres in _NODES_RE.findall(line):
            for gtype, idx in _GRES_IDX_RE.findall(gres):
                for node in expand_hostlist(nodes):
                    for i in _ranges(idx):
                        held[(node, gtype or "gpu", i)] = holder
    return held


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
        """The cluster's GPUs (sinfo, cached for ``max_age`` s) with their holders, which
        are read anew each time: they change with every job."""
        with self._lock:
            if self._cached is None or time.monotonic() - self._at > self.max_age:
                self._cached = self._read()
                self._at = time.monotonic()
            cached = list(self._cached)
        held = self._holders()
        if held is None:
            return cached
        return [dataclasses.replace(g, cluster_holder=held.get(_where(g.uuid))) for g in cached]

    def _holders(self) -> dict[tuple[str, str, int], ClusterHolder] | None:
        """Slurm's running jobs' GPUs; None when scontrol cannot say (then no holder is
        shown, rather than a wrong one)."""
        try:
            return parse_holders(_run(["scontrol", "-d", "-o", "show", "job"]))
        except GpuInventoryError:
            return None

    def _read(self) -> list[Gpu]:
        out = _run(["sinfo", "-N", "-h", "-o", "%N|%G"])
        gpus: list[Gpu] = []
        seen: set[str] = set()
        for line in out.splitlines():
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


def _run(cmd: list[str]) -> str:
    """A Slurm command's output; GpuInventoryError saying why where it fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise GpuInventoryError(f"{cmd[0]}: {e}") from None
    if out.returncode != 0:
        raise GpuInventoryError(f"{cmd[0]} failed: {out.stderr.strip()}")
    return out.stdout


def _where(uuid: str) -> tuple[str, str, int]:
    """gpu_uuid's inverse: "SLURM:node:type:3" -> (node, type, 3)."""
    _, node, gtype, index = uuid.rsplit(":", 3) if uuid.count(":") >= 3 else ("", "", "", "-1")
    return node, gtype, int(index) if index.lstrip("-").isdigit() else -1
