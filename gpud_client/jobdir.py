"""The job directory contract, from the daemon's side of the worker runtime.

:mod:`gpud_client.worker` is what runs inside a job; this module holds what the process
executor (and the tests) need around it: installing the runtime directory, laying out a
job directory, the command line, and reading the worker's ``status.json``. The file
names and exit codes are imported from the worker so that there is one definition.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import py_compile
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cloudpickle  # type: ignore[import-untyped]  # ships no hints

from gpud_client.worker import (
    ARGS_FILE,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SETUP,
    FUNCTION_FILE,
    JOB_FILE,
    RESULT_FILE,
    STARTED_FILE,
    STATUS_FILE,
)

__all__ = [
    "ARGS_FILE",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_SETUP",
    "FUNCTION_FILE",
    "JOB_FILE",
    "RESULT_FILE",
    "STARTED_FILE",
    "STATUS_FILE",
    "MAX_STATUS_BYTES",
    "LAUNCHER_SOURCE",
    "WORKER_MODULE",
    "WORKER_NAME",
    "WORKER_SOURCE",
    "WorkerStatus",
    "install_runtime",
    "job_files",
    "read_status",
    "worker_command",
    "write_job_dir",
]

#: A status.json larger than this is not the worker's (it caps message and traceback).
MAX_STATUS_BYTES = 1024 * 1024

#: The worker runtime's source, copied into every runtime directory.
WORKER_SOURCE = Path(__file__).with_name("worker.py")
#: The script a job's command line runs: a three-line launcher (not "worker.py", which a
#: user's own module could easily be called).
WORKER_NAME = "gpud_worker.py"
#: The worker's source, as a module the launcher imports: an imported module is loaded
#: from its compiled form (written at install), where a script is compiled at every start.
WORKER_MODULE = "gpud_runtime"
#: The launcher. The runtime directory is the script's directory, so sys.path[0] at start.
LAUNCHER_SOURCE = (
    '"""gpud\'s worker launcher: the worker itself is gpud_runtime.py beside it."""\n'
    "import sys\n"
    f"from {WORKER_MODULE} import main\n"
    "sys.exit(main())\n"
)
#: Changed whenever the runtime directory's layout changes, so that a daemon upgrade
#: installs a new directory rather than reusing an old one laid out differently.
_LAYOUT = b"launcher+module+pyc"


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """The worker's ``status.json``: how the function ended, without unpickling anything."""

    ok: bool
    type: str | None
    message: str | None
    traceback: str | None
    python: str
    #: the attempt that wrote it (None: a worker runtime from before gpud recorded it)
    attempt: int | None = None


def _cloudpickle_dir() -> Path:
    return Path(cloudpickle.__file__).resolve().parent


def _runtime_hash() -> str:
    digest = hashlib.sha256(_LAYOUT)
    digest.update(LAUNCHER_SOURCE.encode())
    digest.update(WORKER_SOURCE.read_bytes())
    for path in sorted(_cloudpickle_dir().glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def install_runtime(base: Path) -> Path:
    """Install the worker and cloudpickle under ``base`` and return the runtime directory.

    They are compiled here, for this Python: jobs run as users who cannot write the
    directory, so without it every cold job compiled cloudpickle and the worker afresh
    (~12 ms of CPU each, #12). Another Python version finds no compiled form of its own
    and compiles in memory, as before.

    The directory is named after a hash of its contents and created by renaming a
    finished temporary directory into place, so a daemon upgrade never changes files
    under a worker that is importing them, and concurrent installs are harmless.
    """
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"runtime-{_runtime_hash()}"
    if (final / WORKER_NAME).is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".runtime-", dir=base))
    try:
        (tmp / WORKER_NAME).write_text(LAUNCHER_SOURCE, encoding="utf-8")
        shutil.copyfile(WORKER_SOURCE, tmp / f"{WORKER_MODULE}.py")
        shutil.copytree(
            _cloudpickle_dir(),
            tmp / "cloudpickle",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        # Timestamp-checked, whatever SOURCE_DATE_EPOCH says: a hash-checked .pyc would
        # read and hash its source at every import. Not the launcher: a script is never
        # loaded from a .pyc.
        compiled = compileall.compile_dir(
            tmp,
            quiet=2,
            workers=1,
            rx=_LAUNCHER_RX,
            invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
        )
        if not compiled:
            raise OSError(f"could not compile the worker runtime in {tmp}")
        for path in tmp.rglob("*"):
            # Readable by every job user, whatever the daemon's umask.
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        # mkdtemp makes it 0700; jobs may run as other users than the daemon.
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / WORKER_NAME).is_file():
                raise
            # Someone else installed the same runtime meanwhile: theirs is as good.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class _LauncherRx:
    """compileall's ``rx``: skip the launcher (a script is never loaded from a .pyc)."""

    @staticmethod
    def search(path: str) -> bool:
        return os.path.basename(path) == WORKER_NAME


_LAUNCHER_RX = _LauncherRx()


def worker_command(python: str | os.PathLike[str], runtime: Path, jobdir: Path) -> list[str]:
    """The command line of one job; run it with ``cwd=jobdir``. ``-u`` so the user's
    output reaches the log as it is printed, not when a buffer fills."""
    return [os.fspath(python), "-u", str(runtime / WORKER_NAME), str(jobdir)]


def job_files(
    *, job_id: int, name: str, python: str, function: bytes, args: bytes, attempt: int = 0
) -> dict[str, bytes]:
    """The files a job directory holds for the worker, by name. The worker copies
    ``attempt`` into its status.json."""
    meta = {"job_id": job_id, "name": name, "python": python, "attempt": attempt}
    return {
        FUNCTION_FILE: function,
        ARGS_FILE: args,
        JOB_FILE: json.dumps(meta).encode("utf-8"),
    }


def write_job_dir(
    jobdir: Path, *, job_id: int, name: str, python: str, function: bytes, args: bytes
) -> None:
    """Lay out a job directory for the worker (``jobdir`` is created if needed)."""
    jobdir.mkdir(parents=True, exist_ok=True)
    files = job_files(job_id=job_id, name=name, python=python, function=function, args=args)
    for fname, data in files.items():
        (jobdir / fname).write_bytes(data)


def read_status(jobdir: Path) -> WorkerStatus | None:
    """The worker's status, or None if it wrote none (it crashed, was killed, or exited 3
    before it could). Raises ValueError for a status file that is not the worker's."""
    try:
        # O_NOFOLLOW: the job owns its directory and could plant a link there.
        fd = os.open(jobdir / STATUS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError(f"{jobdir / STATUS_FILE} is not a regular file")
        raw = fh.read(MAX_STATUS_BYTES + 1)
    if len(raw) > MAX_STATUS_BYTES:
        raise ValueError(f"{jobdir / STATUS_FILE} is larger than a worker status can be")
    return parse_status(json.loads(raw), str(jobdir / STATUS_FILE))


def parse_status(data: object, where: str = "the status") -> WorkerStatus:
    """A worker status from its JSON (status.json's, or sent inline over the hub);
    ValueError if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        raise ValueError(f"{where} is not a gpud worker status")

    def text(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) else None

    return WorkerStatus(
        ok=data["ok"],
        type=text("type"),
        message=text("message"),
        traceback=text("traceback"),
        python=text("python") or "",
        attempt=data["attempt"] if type(data.get("attempt")) is int else None,
    )
