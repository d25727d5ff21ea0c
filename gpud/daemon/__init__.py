"""The daemon, split by role (docs/architecture.md, "The daemon's shape"):

- :mod:`.record`: :class:`JobRecord`, one per active job, and shared small pieces;
- :mod:`.core`: the state, recording a change (ledger, then memory), finishing an attempt;
- :mod:`.loop`: the scheduling loop (load -> decide -> apply);
- :mod:`.supervise`: one task per started job, to its end;
- :mod:`.jobfiles`: a job's directory, laid out and read back;
- :mod:`.recovery`: what a previous daemon left, after a restart;
- :mod:`.gpupoll`: the GPU inventory, polled;
- :mod:`.service`: :class:`Daemon`, the operations the API calls, and ``run()``;
- :mod:`.port`: :class:`JobService`, the narrow interface the API depends on.
"""

from gpud.daemon.datadir import instance_id, lock_data_dir
from gpud.daemon.record import AlreadyRunning, ExecutorDown, JobRecord, SubmitError
from gpud.daemon.service import Daemon

__all__ = [
    "AlreadyRunning",
    "Daemon",
    "ExecutorDown",
    "JobRecord",
    "SubmitError",
    "instance_id",
    "lock_data_dir",
]
