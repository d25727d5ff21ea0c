"""The key of a snapshot: everything that must match for a restored container to be the
one a job would have got from a cold start.

Podman restores a container with the configuration it was checkpointed with (image,
mounts, devices, limits, user, environment), and the process with the memory it had:
so the key covers the code, the image by digest, the Python, the GPUs (by type and
count; by UUID where real devices are passed in, since those are part of the restored
configuration), the driver, gpud itself, the owner (the process runs as them), their
env=, the limits, and the daemon's container settings (volumes, network, ...).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

__all__ = ["describe_change", "key_of", "key_parts"]

#: How each part is named when a snapshot is replaced because it changed.
_LABELS = {
    "code": "the function's code",
    "image": "the image",
    "image_id": "the image's content",
    "python": "the Python version",
    "gpus": "the GPUs",
    "driver": "the NVIDIA driver",
    "gpud": "the gpud version",
    "owner": "the owner",
    "env": "env=",
    "limits": "memory=/cpu=",
    "container": "the daemon's container settings",
}


def key_parts(
    *,
    code_hash: str,
    image: str,
    image_id: str,
    python: str,
    gpus: str,
    driver: str,
    gpud_version: str,
    owner: str,
    env: Mapping[str, str],
    memory: int | None,
    cpus: float | None,
    container: str,
) -> dict[str, str]:
    return {
        "code": code_hash,
        "image": image,
        "image_id": image_id,
        "python": python,
        "gpus": gpus,
        "driver": driver,
        "gpud": gpud_version,
        "owner": owner,
        "env": hashlib.sha256(json.dumps(dict(env), sort_keys=True).encode()).hexdigest(),
        "limits": f"memory={memory} cpus={cpus}",
        "container": container,
    }


def key_of(parts: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


def describe_change(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """'the function's code and the image changed', for the log and `gpud snapshots`."""
    changed = [_LABELS.get(k, k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changed:
        return "nothing changed"
    return (
        ", ".join(changed[:-1]) + " and " + changed[-1] if len(changed) > 1 else changed[0]
    ) + " changed"
