"""The worker runtime, run for real: a copy of gpud_client/worker.py and cloudpickle in a
runtime directory, a job directory, a fresh interpreter with the job dir as its cwd."""

from __future__ import annotations

import ast
import os
import pickle
import platform
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from gpud_client import RemoteError, VersionMismatch
from gpud_client.jobdir import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SETUP,
    JOB_FILE,
    LAUNCHER_SOURCE,
    RESULT_FILE,
    STATUS_FILE,
    WORKER_SOURCE,
    WorkerStatus,
    install_runtime,
    read_status,
    worker_command,
    write_job_dir,
)
from gpud_client.models import JobInfo
from gpud_client.payload import dumps_args, dumps_function, load_result

JOB_ID = 5
JOB_NAME = "t.fn"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_runtime(tmp_path_factory.mktemp("runtime"))


def make_job(tmp_path: Path, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Path:
    jobdir = tmp_path / "job"
    function, _ = dumps_function(fn)
    write_job_dir(
        jobdir,
        job_id=JOB_ID,
        name=JOB_NAME,
        python=platform.python_version(),
        function=function,
        args=dumps_args(args, kwargs, fn=fn),
    )
    return jobdir


def run_worker(runtime: Path, jobdir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        worker_command(sys.executable, runtime, jobdir),
        cwd=jobdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def status_of(jobdir: Path) -> WorkerStatus:
    status = read_status(jobdir)
    assert status is not None
    return status


def result_of(jobdir: Path) -> Any:
    info = JobInfo(
        id=JOB_ID,
        name=JOB_NAME,
        state="failed",
        owner="me",
        priority=0,
        gpu=None,
        gpus=[],
        gpu_indices=[],
        submitted_at=0.0,
        started_at=None,
        ended_at=None,
        timeout=60.0,
        retries=0,
        attempt=1,
        batch_id=None,
        exit_code=None,
        error=None,
        has_result=True,
    )
    return load_result((jobdir / RESULT_FILE).read_bytes(), info)


# -- the job functions (pickled by value: this module is not importable in the worker) ---


def add(a: int, b: int = 0) -> dict[str, Any]:
    where = os.getcwd()
    os.chdir("/")  # the result must still land in the job directory
    gpud = sorted(m for m in sys.modules if m.split(".")[0] in ("gpud", "gpud_client"))
    return {"sum": a + b, "argv": sys.argv, "cwd": where, "gpud_modules": gpud}


def boom() -> None:
    raise ValueError("boom!")


class JobBroke(Exception):
    pass


def broke() -> None:
    raise JobBroke("custom")


class Picky(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def picky() -> None:
    raise Picky(1, 2)


def lock() -> threading.Lock:
    return threading.Lock()


def chatty() -> int:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    return 1


def exits(code: int | None) -> None:
    sys.exit(code)


def leaves_work_for_the_exit(where: str, code: int) -> None:
    """Leaves what Python's exit finishes: a non-daemon thread still running, an atexit
    function, and a file written to, kept alive and never flushed nor closed."""
    import atexit
    import time

    def late() -> None:
        time.sleep(0.3)
        with open(f"{where}/thread", "w") as fh:
            fh.write("done")

    def at_exit() -> None:
        # Python joins the threads first, then runs atexit functions.
        seen = "done" if os.path.exists(f"{where}/thread") else "not yet"
        with open(f"{where}/atexit", "w") as fh:
            fh.write(f"thread {seen}")

    threading.Thread(target=late).start()
    atexit.register(at_exit)
    kept = open(f"{where}/kept", "w")  # noqa: SIM115 - left open on purpose
    kept.write("buffered")
    sys._gpud_test_kept = kept  # type: ignore[attr-defined]  # alive at the exit
    if code:
        sys.exit(code)


# -- tests ------------------------------------------------------------------------------


def test_success(runtime: Path, tmp_path: Path) -> None:
    jobdir = make_job(tmp_path, add, 2, b=3)
    proc = run_worker(runtime, jobdir)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
    assert status_of(jobdir) == WorkerStatus(
        ok=True,
        type=None,
        message=None,
        traceback=None,
        python=platform.python_version(),
        attempt=0,  # job.json's attempt, copied so a restarted daemon can tell attempts apart
    )
    value = result_of(jobdir)
    assert value == {"sum": 5, "argv": [JOB_NAME], "cwd": str(jobdir), "gpud_modules": []}
    assert not list(jobdir.glob(".*.tmp"))  # the atomic writes left no temp files


def test_a_cold_job_imports_no_pathlib(runtime: Path) -> None:
    """Whatever the worker imports, every cold job pays for (#12): pathlib, with the
    urllib.parse and ipaddress it pulls in, was ~3 ms of CPU a job on this box. (-S: a
    venv's site may import it, as this one's editable install does; the worker cannot
    help that.)"""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gpud_runtime, cloudpickle; "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(runtime)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    loaded = set(out.split())
    assert {"gpud_runtime", "cloudpickle"} <= loaded
    assert not {"pathlib", "urllib.parse", "ipaddress"} & loaded


def test_exception_comes_back_with_its_traceback(runtime: Path, tmp_path: Path) -> None:
    jobdir = make_job(tmp_path, boom)
    proc = run_worker(runtime, jobdir)
    assert proc.returncode == EXIT_ERROR
    assert proc.stdout == "" and proc.stderr == ""
    status = status_of(jobdir)
    assert (status.ok, status.type, status.message) == (False, "builtins.ValueError", "boom!")
    assert status.traceback is not None
    assert status.traceback.endswith("ValueError: boom!\n")
    # The frame names the function's real source file, not cloudpickle's "<dynamic-code>".
    assert f'File "{__file__}", line ' in status.traceback and ", in boom\n" in status.traceback
    assert "gpud_worker" not in status.traceback  # the worker's own frame is trimmed
    with pytest.raises(ValueError) as info:
        result_of(jobdir)
    assert str(info.value) == "boom!"
    assert info.value.__notes__ == [
        f"Remote traceback (gpud job {JOB_ID}):\n{status.traceback.rstrip()}"
    ]


def test_user_exception_classes_come_back_as_themselves(runtime: Path, tmp_path: Path) -> None:
    jobdir = make_job(tmp_path, broke)
    assert run_worker(runtime, jobdir).returncode == EXIT_ERROR
    with pytest.raises(JobBroke, match="custom"):
        result_of(jobdir)


def test_exception_that_cannot_be_rebuilt(runtime: Path, tmp_path: Path) -> None:
    jobdir = make_job(tmp_path, picky)
    assert run_worker(runtime, jobdir).returncode == EXIT_ERROR
    with pytest.raises(RemoteError) as info:
        result_of(jobdir)
    assert info.value.type_name.endswith(".Picky") and info.value.message == "1/2"
    assert "in picky" in (info.value.remote_traceback or "")


def test_python_version_mismatch(runtime: Path, tmp_path: Path) -> None:
    jobdir = make_job(tmp_path, add, 1)
    (jobdir / JOB_FILE).write_text(
        (jobdir / JOB_FILE).read_text().replace(platform.python_version(), "2.7.18")
    )
    proc = run_worker(runtime, jobdir)
    assert proc.returncode == EXIT_SETUP
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    status = status_of(jobdir)
    assert status.ok is False and status.message is not None
    assert "pickled by Python 2.7" in status.message and f"runs Python {here}" in status.message
    assert "Python 2.7" in proc.stderr and proc.stderr.count("\n") == 1
    with pytest.raises(VersionMismatch, match="2.7"):
        result_of(jobdir)


def test_unpicklable_return_value(runtime: Path, tmp_path: Path) -> None:
    jobdir = make_job(tmp_path, lock)
    assert run_worker(runtime, jobdir).returncode == EXIT_ERROR
    status = status_of(jobdir)
    assert status.type == "pickle.PicklingError"
    assert status.message is not None
    assert f"the return value of {JOB_NAME} (a lock) could not be pickled" in status.message
    with pytest.raises(pickle.PicklingError, match="could not be pickled"):
        result_of(jobdir)


def test_missing_module_while_unpickling(runtime: Path, tmp_path: Path) -> None:
    # A function pickled by reference to a module the worker's Python cannot import.
    moddir = tmp_path / "mods"
    moddir.mkdir()
    (moddir / "gpud_test_not_installed.py").write_text("def f():\n    return 1\n")
    sys.path.insert(0, str(moddir))
    try:
        import gpud_test_not_installed  # type: ignore[import-not-found]

        function = cloudpickle.dumps(gpud_test_not_installed.f)
    finally:
        sys.path.remove(str(moddir))
        sys.modules.pop("gpud_test_not_installed", None)
    jobdir = tmp_path / "job"
    write_job_dir(
        jobdir,
        job_id=JOB_ID,
        name=JOB_NAME,
        python=platform.python_version(),
        function=function,
        args=dumps_args((), {}),
    )

    assert run_worker(runtime, jobdir).returncode == EXIT_ERROR
    assert status_of(jobdir).type == "builtins.ModuleNotFoundError"
    with pytest.raises(ModuleNotFoundError) as info:
        result_of(jobdir)
    notes = "\n".join(info.value.__notes__)
    assert "'gpud_test_not_installed' installed in the worker's Python" in notes
    assert f"Remote traceback (gpud job {JOB_ID})" in notes


def test_prints_go_to_stdout_and_stderr(runtime: Path, tmp_path: Path) -> None:
    jobdir = make_job(tmp_path, chatty)
    proc = run_worker(runtime, jobdir)
    assert proc.returncode == EXIT_OK
    assert proc.stdout == "to stdout\n"
    assert proc.stderr == "to stderr\n"
    assert result_of(jobdir) == 1


@pytest.mark.parametrize("code", [0, 7])
def test_the_process_ends_as_pythons_exit_would(runtime: Path, tmp_path: Path, code: int) -> None:
    """The worker skips the interpreter's teardown (#12), not what a job can see of its
    exit: threads joined, then atexit functions, open files flushed; the exit code is
    the job's outcome's."""
    out = tmp_path / "out"
    out.mkdir()
    jobdir = make_job(tmp_path, leaves_work_for_the_exit, str(out), code)
    proc = run_worker(runtime, jobdir)
    assert proc.returncode == (EXIT_ERROR if code else EXIT_OK), proc.stderr
    assert status_of(jobdir).ok is (not code)
    assert (out / "thread").read_text() == "done"
    assert (out / "atexit").read_text() == "thread done"
    assert (out / "kept").read_text() == "buffered"


@pytest.mark.parametrize("code", [None, 0])
def test_sys_exit_zero_is_success(runtime: Path, tmp_path: Path, code: int | None) -> None:
    jobdir = make_job(tmp_path, exits, code)
    assert run_worker(runtime, jobdir).returncode == EXIT_OK
    assert result_of(jobdir) is None


def test_sys_exit_nonzero_is_a_remote_error(runtime: Path, tmp_path: Path) -> None:
    jobdir = make_job(tmp_path, exits, 4)
    assert run_worker(runtime, jobdir).returncode == EXIT_ERROR
    with pytest.raises(RemoteError) as info:
        result_of(jobdir)
    assert info.value.type_name == "builtins.SystemExit"
    assert info.value.message == f"{JOB_NAME} called sys.exit(4)"


def test_unusable_job_dir(runtime: Path, tmp_path: Path) -> None:
    jobdir = tmp_path / "empty"
    jobdir.mkdir()
    proc = run_worker(runtime, jobdir)
    assert proc.returncode == EXIT_SETUP
    assert proc.stdout == ""
    assert proc.stderr.startswith("gpud worker: cannot read") and proc.stderr.count("\n") == 1
    assert not (jobdir / STATUS_FILE).exists()


def test_worker_imports_only_stdlib_and_cloudpickle() -> None:
    tree = ast.parse(WORKER_SOURCE.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the worker is a single file: no relative imports"
            imported.add((node.module or "").split(".")[0])
    assert imported - {"cloudpickle"} <= sys.stdlib_module_names, imported


def test_install_runtime_is_idempotent(runtime: Path) -> None:
    assert install_runtime(runtime.parent) == runtime
    assert (runtime / "gpud_runtime.py").read_bytes() == WORKER_SOURCE.read_bytes()
    assert (runtime / "gpud_worker.py").read_text() == LAUNCHER_SOURCE
    assert (runtime / "cloudpickle" / "__init__.py").is_file()


def test_runtime_is_compiled_and_readable_by_every_job_user(runtime: Path) -> None:
    """Jobs run as users who cannot write the runtime directory: without the compiled
    modules in it, every cold job compiled the worker and cloudpickle afresh (#12)."""
    tag = sys.implementation.cache_tag
    for module in (runtime / "gpud_runtime.py", runtime / "cloudpickle" / "cloudpickle.py"):
        pyc = module.parent / "__pycache__" / f"{module.stem}.{tag}.pyc"
        assert pyc.is_file(), pyc
        assert pyc.stat().st_mode & 0o444 == 0o444
    assert not (runtime / "__pycache__" / f"gpud_worker.{tag}.pyc").exists()  # a script
    for path in [runtime, *runtime.rglob("*")]:
        want = 0o755 if path.is_dir() else 0o644
        assert path.stat().st_mode & 0o777 == want, path


def test_warm_worker_takes_its_payload_inline_and_answers_with_its_status(
    runtime: Path, tmp_path: Path
) -> None:
    """A served task with ``payload`` (#12): no job.json, function.pkl or args.pkl in the
    directory; the answer carries the status and start time, and the result files are
    still written for a daemon that restarts meanwhile."""
    import json
    import socket

    hub = tmp_path / "hub.sock"
    jobdir = tmp_path / "job"
    jobdir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(hub))
    listener.listen(1)
    listener.settimeout(60)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GPUD_HUB=str(hub), GPUD_WORKER_TOKEN="t0ken")
    proc = subprocess.Popen(
        [sys.executable, "-u", str(runtime / "gpud_worker.py"), "--serve"], env=env, cwd=tmp_path
    )
    try:
        conn, _ = listener.accept()
        conn.settimeout(60)
        reader = conn.makefile("rb")
        assert json.loads(reader.readline())["hello"] == "t0ken"
        function, _ = dumps_function(add)
        answers = []
        for attempt, (a, b) in enumerate([(2, 3), (4, 5)], 1):
            args = dumps_args((a,), {"b": b}, fn=add)
            meta = {
                "job_id": JOB_ID,
                "name": JOB_NAME,
                "python": platform.python_version(),
                "attempt": attempt,
            }
            task = {
                "job_id": JOB_ID,
                "dir": str(jobdir),
                "env": {},
                "job": meta,
                "payload": [len(function), len(args)],
            }
            conn.sendall(json.dumps(task).encode() + b"\n" + function + args)
            answers.append(json.loads(reader.readline()))
            assert result_of(jobdir)["sum"] == a + b
        for attempt, done in enumerate(answers, 1):
            assert done["done"] == JOB_ID and done["code"] == 0
            assert isinstance(done["started"], float)
            assert done["status"]["ok"] is True and done["status"]["attempt"] == attempt
        assert read_status(jobdir) == WorkerStatus(**{**answers[-1]["status"]})
        assert not {"job.json", "function.pkl", "args.pkl", "started"} & {
            p.name for p in jobdir.iterdir()
        }
        reader.close()
        conn.close()
        assert proc.wait(timeout=30) == 0  # the hub hung up: the worker ends
    finally:
        proc.kill()
        proc.wait()
        listener.close()
