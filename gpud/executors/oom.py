"""Was a container's process killed by the kernel's OOM killer? (#16)

Podman records it as ``State.OOMKilled``, from conmon watching the container's memory
cgroup; where conmon cannot (seen on a cgroup v1 host under a sandboxing kernel), the flag
stays false and an OOM kill looks like any exit 137. So the executor also reads the
cgroup's own count of OOM kills: once while the container runs, and again the moment its
first process ends, before Podman's cleanup removes the cgroup. Either one saying so is
enough; neither leaves an exit 137 as it was.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["counter_file", "kills"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def counter_file(pid: int, root: Path = CGROUP_ROOT) -> Path | None:
    """The file holding the OOM-kill count of ``pid``'s memory cgroup: cgroup v1's
    ``memory.oom_control`` or v2's ``memory.events``; None where there is none."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1 = root / "memory" / path.lstrip("/") / "memory.oom_control"
        elif controllers == "":
            v2 = root / path.lstrip("/") / "memory.events"
    for candidate in (v1, v2):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def kills(path: Path | None) -> int | None:
    """The ``oom_kill`` count in that file; None if it cannot be read (gone already)."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None
