"""Container snapshots (issue #4): what a snapshot is keyed by, and how Podman takes
and restores one.

A snapshot is a CRIU checkpoint of a warm worker's container, taken after the function
(and, for a class, its ``@gpud.enter(snap=True)`` setup) was loaded and before its first
input, kept in the daemon's data directory: the memory pages once, and a small archive
that restores the rest (see :mod:`snapshots.podman` for why). Any number of new
containers are restored from it, concurrently; each then claims its input through the
daemon's hub like any warm worker.

This package knows Podman and CRIU, never the ledger or the scheduler: the daemon's
:mod:`gpud.snapshotter` decides when to take, restore, fall back and collect.
"""

from snapshots.key import describe_change, key_of, key_parts
from snapshots.podman import (
    SNAPSHOT_IDMAPPINGS,
    SNAPSHOT_MOUNT,
    SnapshotError,
    checkpoint_to_dir,
    remove_dir,
    restore_from_dir,
)

__all__ = [
    "SNAPSHOT_IDMAPPINGS",
    "SNAPSHOT_MOUNT",
    "SnapshotError",
    "checkpoint_to_dir",
    "describe_change",
    "key_of",
    "key_parts",
    "remove_dir",
    "restore_from_dir",
]
