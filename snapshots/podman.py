"""Podman checkpoints kept as gpud's own files: take one from a running container, restore
new containers from it, remove it. Synchronous (podman-py is): the daemon calls these
from a thread.

podman-py has no checkpoint methods, so the libpod endpoints are called through its raw
API client (it prefixes ``/libpod``):

* ``POST /containers/{id}/checkpoint?export=true&leaveRunning=true`` dumps the container
  with CRIU and streams the dump back as a tar; the container runs on (it takes the
  first call);
* ``POST /containers/import/restore?import=true&name=NAME``, with an archive as the
  body, makes a new container from it, its processes continuing from the dump.

**Why not a checkpoint image.** Restoring from a checkpoint image (or an archive) makes
Podman copy the whole dump, memory pages included, into the new container's directory
first: 1.7 s of a 1.9 s restore for 300 MB of state. So the dump's page files are kept
once, in the snapshot's directory, and the archive that is restored holds only the rest
(a few hundred KB), with each ``pages-N.img`` a symlink to ``/gpud/snapshot/pages-N.img``.
The container was made with the snapshot's directory mounted there read-only, and CRIU
opens the page files inside the container's mount namespace, so every restore reads the
one copy (from the page cache) instead of copying it: about 0.3 s for the same restore.
The page files belong to the container's namespace root, mode 0600: CRIU (restoring as
that root) reads them; the job, running as its submitter, cannot.

Containers to be checkpointed run in a user namespace (:data:`SNAPSHOT_IDMAPPINGS`):
CRIU reads the rlimits of the processes it dumps, which needs CAP_SYS_RESOURCE over them,
and some hosts (these included) withhold that capability even from root. In a user
namespace that root created, root has every capability, so the dump works there. The
mapping is the identity for every uid and gid but 0, so a job still runs as its
submitter's own uid (never root: the namespace's root maps to an unused host uid).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHIVE",
    "NS_ROOT",
    "SNAPSHOT_IDMAPPINGS",
    "SNAPSHOT_MOUNT",
    "SnapshotError",
    "checkpoint_to_dir",
    "kill_restore",
    "remove_dir",
    "restore_from_dir",
]

#: Container uid/gid 0 -> an unused host id; every other id -> itself.
NS_ROOT = 3_000_000_000
_MAP = [
    {"container_id": 0, "host_id": NS_ROOT, "size": 1},
    {"container_id": 1, "host_id": 1, "size": NS_ROOT - 1},
]
SNAPSHOT_IDMAPPINGS: dict[str, Any] = {"UIDMap": _MAP, "GIDMap": _MAP}

#: Where a snapshot's directory is mounted in the containers it was taken from.
SNAPSHOT_MOUNT = "/gpud/snapshot"
#: The archive (everything but the memory pages) in a snapshot's directory.
ARCHIVE = "restore.tar"
_PAGES = re.compile(r"checkpoint/(pages-\d+\.img)")


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
            errors = [
                line.split(": ", 1)[-1].strip()
                for line in fh
                if "Error (" in line and "RLIMIT_NOFILE for self" not in line
            ]
    if errors:
        return "; ".join(dict.fromkeys(errors[:3]))
    return msg.splitlines()[0][:500] if msg else f"HTTP {response.status_code}"


class _Stream(io.RawIOBase):
    """A file over an HTTP response's chunks, for tarfile's streaming mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def checkpoint_to_dir(client: Any, container: str, dest: Path) -> int:
    """Checkpoint a running container (it keeps running) into ``dest``, which the
    container has mounted at :data:`SNAPSHOT_MOUNT`: its page files, and the archive
    that restores it. Returns the snapshot's size in bytes."""
    r = client.api.post(
        f"/containers/{container}/checkpoint",
        params={"export": "true", "leaveRunning": "true"},
        stream=True,
    )
    if r.status_code != 200:
        log = None
        with contextlib.suppress(Exception):
            static = client.containers.get(container).attrs.get("StaticDir")
            log = os.path.join(static, "dump.log") if static else None
        raise SnapshotError(f"checkpoint failed: {_why(r, log)}")
    size = 0
    small = io.BytesIO()
    try:
        with (
            tarfile.open(
                fileobj=io.BufferedReader(_Stream(r.iter_content(1 << 20))), mode="r|"
            ) as dump,
            tarfile.open(fileobj=small, mode="w") as out,
        ):
            for m in dump:
                pages = _PAGES.fullmatch(m.name)
                if pages is not None and m.isfile():
                    src = dump.extractfile(m)
                    assert src is not None
                    path = dest / pages.group(1)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as fh:
                        shutil.copyfileobj(src, fh, 1 << 20)
                    os.chown(path, NS_ROOT, NS_ROOT)
                    size += m.size
                    link = tarfile.TarInfo(m.name)
                    link.type, link.linkname = tarfile.SYMTYPE, f"{SNAPSHOT_MOUNT}/{path.name}"
                    out.addfile(link)
                    continue
                if m.name == "checkpoint" and m.isdir():
                    # Podman's import leaves it root's and 0600, which CRIU restoring in
                    # the user namespace cannot enter.
                    m.mode = 0o755
                out.addfile(m, dump.extractfile(m) if m.isfile() else None)
    except (tarfile.TarError, OSError) as e:
        raise SnapshotError(f"checkpoint failed: could not store the dump: {e}") from e
    data = small.getvalue()
    tmp = dest / f".{ARCHIVE}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, dest / ARCHIVE)
    return size + len(data)


def restore_from_dir(client: Any, src: Path, name: str) -> str:
    """A new container, named ``name``, restored from a snapshot directory; its id."""
    try:
        data = (src / ARCHIVE).read_bytes()
    except OSError:
        raise SnapshotError(
            f"restore failed: the snapshot's files are gone (removed outside gpud?): {src}"
        ) from None
    r = client.api.post(
        "/containers/import/restore",
        params={"import": "true", "name": name},
        data=data,
        headers={"Content-Type": "application/x-tar"},
    )
    if r.status_code != 200:
        log = None
        with contextlib.suppress(Exception):
            static = client.containers.get(name).attrs.get("StaticDir")
            log = os.path.join(static, "restore.log") if static else None
        why = _why(r, log)
        # A failed restore can leave the half-made container behind.
        with contextlib.suppress(Exception):
            client.containers.get(name).remove(force=True)
        raise SnapshotError(f"restore failed: {why}")
    return str(r.json()["Id"])


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def kill_restore(name: str) -> int:
    """Kill the runc and CRIU processes of a hung restore of container ``name`` (CRIU can
    hang for good on a damaged checkpoint), and what it restored so far; the restore
    call then fails. Returns how many processes were killed."""
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
        parents[pid] = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if (
            argv
            and argv[0].endswith(b"conmon")
            and b"-n" in argv[:-1]
            and argv[argv.index(b"-n") + 1] == name.encode()
        ):
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
