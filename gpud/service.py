"""Kept for importers of the old module: the daemon lives in :mod:`gpud.daemon` now."""

from gpud.daemon import (
    AlreadyRunning,
    Daemon,
    ExecutorDown,
    JobRecord,
    SubmitError,
    instance_id,
    lock_data_dir,
)

__all__ = [
    "AlreadyRunning",
    "Daemon",
    "ExecutorDown",
    "JobRecord",
    "SubmitError",
    "instance_id",
    "lock_data_dir",
]
