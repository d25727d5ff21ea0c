"""``gpud.state_dir()`` (#14): where a job keeps what must survive its attempts."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["state_dir"]


def state_dir() -> Path:
    """The job's state directory (``$GPUD_STATE_DIR``): kept across the job's retries
    and resumes, readable by its owner after it ends (``gpud state JOB``), removed with
    the job's other files by retention. Save checkpoints here and look for them when the
    job starts: an attempt after a failure finds what the last one saved.

    Outside a gpud job it raises RuntimeError (there is none to keep state for)."""
    value = os.environ.get("GPUD_STATE_DIR")
    if not value:
        raise RuntimeError(
            "gpud.state_dir() is for code running as a gpud job "
            "($GPUD_STATE_DIR is not set here); run the function with "
            ".remote() or .spawn()"
        )
    return Path(value)
