"""The data directory's lock and instance id."""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from pathlib import Path

from gpud.daemon.record import (
    AlreadyRunning,
)

log = logging.getLogger("gpud")


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock for the daemon's life: two daemons on one ledger could run
    one job twice."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(
            f"another gpud is already running on {data_dir} (it holds {data_dir / 'lock'}): "
            "stop it first, or give this one another data_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def instance_id(data_dir: Path) -> str:
    """A stable id for this data directory, written once; it marks our jobs' processes."""
    p = data_dir / "instance"
    try:
        return p.read_text().strip()
    except FileNotFoundError:
        value = secrets.token_hex(8)
        p.write_text(value + "\n")
        return value
