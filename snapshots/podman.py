"""Podman checkpoint images: take one from a running container, restore new containers
from it, remove it. Synchronous (podman-py is): the daemon calls these from a thread.

podman-py has no checkpoint methods, so the libpod endpoints are called through its raw
API client (it prefixes ``/libpod``):

* ``POST /containers/{id}/checkpoint?createImage=NAME&leaveRunning=true`` dumps the
  container with CRIU into a local image and lets it run on (it takes the first call);
* ``POST /containers/{image id}/restore?name=NAME`` makes a new container from that
  image, its processes continuing from the dump. One image restores any number of times.

Containers to be checkpointed run in a user namespace (:data:`SNAPSHOT_IDMAPPINGS`):
CRIU reads the rlimits of the processes it dumps, which needs CAP_SYS_RESOURCE over them,
and some hosts (these included) withhold that capability even from root. In a user
namespace that root created, root has every capability, so the dump works there. The
mapping is the identity for every uid and gid but 0, so a job still runs as its
submitter's own uid (never root: the namespace's root maps to an unused host uid).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

__all__ = [
    "SNAPSHOT_IDMAPPINGS",
    "SnapshotError",
    "checkpoint_to_image",
    "image_size",
    "kill_restore",
    "remove_image",
    "restore_from_image",
    "snapshot_images",
]

#: Container uid/gid 0 -> an unused host id; every other id -> itself.
_NS_ROOT = 3_000_000_000
_MAP = [{"container_id": 0, "host_id": _NS_ROOT, "size": 1},
        {"container_id": 1, "host_id": 1, "size": _NS_ROOT - 1}]
SNAPSHOT_IDMAPPINGS: dict[str, Any] = {"UIDMap": _MAP, "GIDMap": _MAP}


class SnapshotError(RuntimeError):
    """A checkpoint or restore Podman refused; the message says what CRIU said."""


def _why(response: Any, log: str | None = None) -> str:
    try:
        body = response.json()
        msg = str(body.get("cause") or body.get("message") or body)
    except ValueError:
        msg = response.text[:500]
    # Podman's message is the runc command line; CRIU's own log has the reason.
    errors: list[str] = []
    if log:
        with contextlib.suppress(OSError), open(log, errors="replace") as fh:
            errors = [line.split(": ", 1)[-1].strip() for line in fh if "Error (" in line]
    if errors:
        return "; ".join(dict.fromkeys(errors[:3]))
    return msg.splitlines()[0][:500] if msg else f"HTTP {response.status_code}"


def checkpoint_to_image(client: Any, container: str, image_name: str) -> str:
    """Checkpoint a running container into a new local image; it keeps running. Returns
    the image's id."""
    r = client.api.post(f"/containers/{container}/checkpoint",
                        params={"createImage": image_name, "leaveRunning": "true"})
    if r.status_code != 200:
        log = None
        with contextlib.suppress(Exception):
            static = client.containers.get(container).attrs.get("StaticDir")
            log = os.path.join(static, "dump.log") if static else None
        raise SnapshotError(f"checkpoint failed: {_why(r, log)}")
    return str(client.images.get(image_name).id)


def restore_from_image(client: Any, image_id: str, name: str) -> str:
    """A new container, named ``name``, restored from a checkpoint image; its id."""
    r = client.api.post(f"/containers/{image_id}/restore", params={"name": name})
    if r.status_code != 200:
        # A failed restore can leave the half-made container behind.
        with contextlib.suppress(Exception):
            client.containers.get(name).remove(force=True)
        if r.status_code == 404:
            raise SnapshotError("restore failed: the checkpoint image is not in Podman's "
                                "store (removed outside gpud?)")
        raise SnapshotError(f"restore failed: {_why(r)}")
    return str(r.json()["Id"])


def image_size(client: Any, image_id: str) -> int:
    return int(client.images.get(image_id).attrs.get("Size") or 0)


def remove_image(client: Any, image_id: str) -> None:
    import podman.errors

    with contextlib.suppress(podman.errors.NotFound, podman.errors.ImageNotFound):
        client.images.remove(image_id, force=True)


def snapshot_images(client: Any, prefix: str) -> dict[str, str]:
    """id -> name of the images in the store whose name starts with ``prefix``."""
    out: dict[str, str] = {}
    for img in client.images.list():
        for tag in img.tags or []:
            if tag.startswith(prefix):
                out[img.id] = tag
    return out


def kill_restore(name: str) -> int:
    """Kill the runc and CRIU processes of a hung restore of container ``name`` (CRIU can
    hang for good on a damaged checkpoint); the restore call then fails. Returns how many
    processes were killed."""
    parents: dict[int, int] = {}
    conmons: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(stat[stat.rindex(b")") + 2:].split()[1])
        if argv and argv[0].endswith(b"conmon") and b"-n" in argv[:-1] \
                and argv[argv.index(b"-n") + 1] == name.encode():
            conmons.append(pid)
    doomed: set[int] = set()
    frontier = set(conmons)
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in doomed}
        doomed |= frontier
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(doomed)
