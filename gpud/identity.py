"""Who a job runs as: a Unix identity, from the submitter's account on a root daemon (#5).

At the bottom of the executor layer: the launch spec (gpud.executors.base), the process
and Podman executors, the interpreter checks (gpud.interpreters) and the users table
(gpud.users) all speak of it, and it imports nothing of theirs (#12: it lived in
gpud.executors.process, which gpud.executors.base then had to import back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["JobIdentity"]


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """The Unix identity jobs run as."""

    user: str
    uid: int
    gid: int
    home: str
    switch: bool  # True when the daemon is root and must drop to this user
    groups: tuple[int, ...] = ()  # supplementary groups (the user's, from os.getgrouplist)

    def popen_kwargs(self) -> dict[str, Any]:
        """What subprocess needs to start a process as this identity: uid, gid and exactly
        its supplementary groups (never the daemon's)."""
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}
