"""Container snapshots (issue #4): what a snapshot is keyed by, and how Podman takes
and restores one.

A snapshot is a CRIU checkpoint of a warm worker's container, taken after the function
(and, for a class, its ``@gpud.enter(snap=True)`` setup) was loaded and before its first
input, stored in Podman's image store as a checkpoint image. Any number of new
containers are restored from it, concurrently; each then claims its input through the
daemon's hub like any warm worker.

This package knows Podman and CRIU, never the ledger or the scheduler: the daemon's
:mod:`gpud.snapshotter` decides when to take, restore, fall back and collect.
"""

from snapshots.key import describe_change, key_of, key_parts
from snapshots.podman import (
    SNAPSHOT_IDMAPPINGS,
    SnapshotError,
    checkpoint_to_image,
    image_size,
    remove_image,
    restore_from_image,
    snapshot_images,
)

__all__ = [
    "SNAPSHOT_IDMAPPINGS",
    "SnapshotError",
    "checkpoint_to_image",
    "describe_change",
    "image_size",
    "key_of",
    "key_parts",
    "remove_image",
    "restore_from_image",
    "snapshot_images",
]
