"""gpud's worker runtime: runs one job's function in the job's own process.

The daemon copies this single file, as ``gpud_runtime.py``, next to a copy of cloudpickle
and a three-line launcher ``gpud_worker.py`` that imports it, into a runtime directory,
compiles them there, and runs ``<python> -u <runtime>/gpud_worker.py <jobdir>`` with the
job directory as the working directory (imported, this module is loaded compiled; a script
would be compiled at every job's start). It therefore imports nothing but the
standard library and cloudpickle: the job's Python need not have gpud installed. It
takes cloudpickle from the job's own environment where that has it (the caller's venv,
#11), and the runtime directory's copy otherwise.

The job directory holds, on entry:

* ``function.pkl`` - the cloudpickled function (by value, see gpud_client.payload);
* ``args.pkl`` - the cloudpickled ``(args, kwargs)``;
* ``job.json`` - ``{"job_id": 12, "name": "hello.square", "python": "3.11.7"}``, where
  ``python`` is the submitting Python, whose major.minor this Python must match.

and on exit, both written atomically (temp file, fsync, rename), ``status.json`` last:

* ``result.pkl`` - cloudpickle of ``{"ok": True, "value": value}`` or of
  ``{"ok": False, "exception": bytes | None, "type": "builtins.ValueError",
  "message": str, "traceback": str | None}``; ``exception`` is the cloudpickled exception
  object, None when it cannot be pickled and loaded back (or is a BaseException that is
  not an Exception); ``traceback`` is the formatted remote traceback, None where it would
  show only the worker's own frames (unpicklable return value, version mismatch);
* ``status.json`` - ``{"ok": bool, "type": str|null, "message": str|null,
  "traceback": str|null, "python": "3.11.2"}`` for the daemon, which never unpickles.

Exit codes: 0 the function returned; 1 it raised (or loading it or its arguments did,
or its return value could not be pickled); 3 the worker could not do its job (unusable
job directory, Python version mismatch, result not writable). For a version mismatch the
result files are still written, so the caller learns why.

Stdout and stderr belong to the user's function: the worker prints nothing there except
one line on stderr for a setup error.

``SystemExit`` from the function: ``sys.exit()`` / ``sys.exit(0)`` counts as returning
None; any other code is a failure of type ``builtins.SystemExit``. ``KeyboardInterrupt``
is a failure too. Neither is sent as an exception object, so the caller gets a
``RemoteError`` rather than having its own program exited or interrupted.

A job's process ends as Python's own exit would, less the interpreter's teardown
(:func:`_end_process`): the job's threads are waited for, its ``atexit`` functions run,
its open files and stdout/stderr are flushed, and then it ``os._exit``s.
"""

from __future__ import annotations

# No pathlib (#12): with what it imports (urllib.parse, ipaddress, fnmatch) it cost every
# cold job ~3 ms of CPU over the subprocess+cloudpickle baseline; paths here are strings.
import contextlib
import json
import os
import pickle
import sys
import time
import traceback
from types import ModuleType
from typing import Any, NoReturn

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
    "VERSION_MISMATCH_TYPE",
    "main",
]

FUNCTION_FILE = "function.pkl"
ARGS_FILE = "args.pkl"
JOB_FILE = "job.json"
RESULT_FILE = "result.pkl"
STATUS_FILE = "status.json"
STARTED_FILE = "started"
#: Where the daemon puts the results of the jobs a job ran after (#14): deps/<id>.pkl
DEPS_DIR = "deps"
#: ``gpud.result_of(job)`` pickles as ``slice(RESULT_OF_TAG, job_id, None)`` (see
#: gpud_client.deps): replaced here, in the job's own process, by that job's value.
RESULT_OF_TAG = "gpud.result_of"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_SETUP = 3

#: The ``type`` of a version-mismatch result; the client raises VersionMismatch for it.
VERSION_MISMATCH_TYPE = "gpud_client.errors.VersionMismatch"

# status.json feeds the daemon's ledger (JobInfo.error): keep it bounded. result.pkl keeps
# the full text for the caller.
_STATUS_MESSAGE_MAX = 8_000
_STATUS_TRACEBACK_MAX = 64_000

Outcome = dict[str, Any]


class Inline:
    """A warm task's payload, sent over the hub instead of through job.json,
    function.pkl and args.pkl (#12); ``started`` and ``status`` go back with the answer."""

    def __init__(
        self, job: Any, function: bytes, args: bytes, result_max: int | None = None
    ) -> None:
        self.job, self.function, self.args = job, function, args
        self.started: float | None = None
        self.status: bytes | None = None
        #: a result pickle up to this size goes back over the hub, not into files (#12)
        self.result_max = result_max
        #: that result, when it went back inline (then no file was written)
        self.result: bytes | None = None


class _SetupError(Exception):
    pass


def _say(message: str) -> None:
    print(f"gpud worker: {message}", file=sys.stderr, flush=True)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    # C accelerators: say "pickle.PicklingError", the name people import, not "_pickle.".
    public = sys.modules.get(module[1:]) if module.startswith("_") else None
    if public is not None and getattr(public, cls.__qualname__, None) is cls:
        module = public.__name__
    return f"{module}.{cls.__qualname__}"


def _failure(type_name: str, message: str, tb: str | None, exc: bytes | None = None) -> Outcome:
    return {"ok": False, "exception": exc, "type": type_name, "message": message, "traceback": tb}


def _format(exc: BaseException) -> str:
    te = traceback.TracebackException.from_exception(exc, lookup_lines=False)
    _restore_file_names(te, exc, set())
    return "".join(te.format())


def _restore_file_names(
    te: traceback.TracebackException, exc: BaseException | None, seen: set[int]
) -> None:
    """cloudpickle names the code of every by-value function "<dynamic-code>", which
    would leave the user's tracebacks without file names. It does keep the defining
    module's ``__file__`` in the function's globals: put that back into the frames."""
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for summary, frame in zip(te.stack, frames, strict=False):
        if summary.filename == "<dynamic-code>":
            file = frame.f_globals.get("__file__")
            if isinstance(file, str):
                summary.filename = file  # its line is looked up lazily, from this name
    if te.__cause__ is not None:
        _restore_file_names(te.__cause__, exc.__cause__, seen)
    if te.__context__ is not None:
        _restore_file_names(te.__context__, exc.__context__, seen)
    for sub_te, sub in zip(te.exceptions or (), getattr(exc, "exceptions", ()), strict=False):
        _restore_file_names(sub_te, sub, seen)


def _dump_exception(cloudpickle: ModuleType, exc: BaseException) -> bytes | None:
    if not isinstance(exc, Exception):
        return None
    try:
        data: bytes = cloudpickle.dumps(exc)
        # Round-trip here: an exception whose __init__ takes other arguments than it
        # passes to Exception.__init__ pickles fine and only fails to load. Better to
        # know now and send the text alone than to fail in the caller.
        cloudpickle.loads(data)
    except Exception:
        return None
    return data


def _exception_outcome(cloudpickle: ModuleType, exc: BaseException, note: str | None) -> Outcome:
    tb = _format(exc)
    if note:
        # After formatting, so the note is not repeated inside the remote traceback.
        exc.add_note(note)
    return _failure(_type_name(exc), str(exc), tb, _dump_exception(cloudpickle, exc))


def _read_job(jobdir: str, inline: Inline | None = None) -> dict[str, Any]:
    where = os.path.join(jobdir, JOB_FILE)
    if inline is not None:
        job: Any = inline.job  # sent over the hub with the task (#12)
    else:
        try:
            job = json.loads(_read_bytes(where).decode("utf-8"))
        except (OSError, ValueError) as e:
            raise _SetupError(f"cannot read {where}: {e}") from None
    if not isinstance(job, dict):
        raise _SetupError(f"{where} is not a JSON object")
    for key, kind in (("job_id", int), ("name", str), ("python", str)):
        if not isinstance(job.get(key), kind):
            raise _SetupError(f"{where}: {key!r} is missing or not a {kind.__name__}")
    return job


def _version_mismatch(job_python: str) -> str | None:
    try:
        wanted = tuple(int(x) for x in job_python.split(".")[:2])
    except ValueError:
        wanted = ()
    if len(wanted) != 2:
        raise _SetupError(f"{JOB_FILE}: python {job_python!r} is not a version like '3.11.7'")
    have = sys.version_info[:2]
    if wanted == have:
        return None
    w, h = f"{wanted[0]}.{wanted[1]}", f"{have[0]}.{have[1]}"
    return (
        f"this job was pickled by Python {w} but the worker runs Python {h} "
        f"({sys.executable}): submit from Python {h}, or configure the daemon's `python` "
        f"to a {w} interpreter"
    )


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _load(cloudpickle: ModuleType, path: str) -> Any:
    with open(path, "rb") as f:
        return cloudpickle.load(f)


def _run(
    cloudpickle: ModuleType,
    jobdir: str,
    job: dict[str, Any],
    fn_cache: dict[str, Any] | None = None,
    inline: Inline | None = None,
) -> tuple[Outcome, int]:
    name = job["name"]
    try:
        if inline is not None:
            fn = _function_from(cloudpickle, inline.function, fn_cache)
            args, kwargs = cloudpickle.loads(inline.args)
        else:
            fn = _load_function(cloudpickle, os.path.join(jobdir, FUNCTION_FILE), fn_cache)
            args, kwargs = _load(cloudpickle, os.path.join(jobdir, ARGS_FILE))
        args, kwargs = _resolve_results(cloudpickle, jobdir, args, kwargs)
    except Exception as e:
        where = getattr(e, "name", None) if isinstance(e, ImportError) else None
        hint = (
            f": is {where!r} installed in the worker's Python ({sys.executable})?" if where else ""
        )
        note = f"while loading the function and arguments of gpud job {job['job_id']}{hint}"
        return _exception_outcome(cloudpickle, e, note), EXIT_ERROR

    if inline is not None:
        # The start time goes back with the outcome, over the hub: no file, no fsync.
        inline.started = time.time()
    else:
        _mark_user_start(jobdir)
    try:
        value = fn(*args, **kwargs)
    except SystemExit as e:
        if e.code is None or e.code == 0:
            value = None
        else:
            msg = f"{name} called sys.exit({e.code!r})"
            return _failure(_type_name(e), msg, _format(_skip_worker_frame(e))), EXIT_ERROR
    except KeyboardInterrupt as e:
        msg = "the job was interrupted (KeyboardInterrupt)"
        return _failure(_type_name(e), msg, _format(_skip_worker_frame(e))), EXIT_ERROR
    except BaseException as e:
        return _exception_outcome(cloudpickle, _skip_worker_frame(e), None), EXIT_ERROR
    return {"ok": True, "value": value}, EXIT_OK


def _resolve_results(
    cloudpickle: ModuleType, jobdir: str, args: Any, kwargs: Any
) -> tuple[Any, Any]:
    """Replace ``gpud.result_of(job)`` placeholders (in the arguments, and in lists,
    tuples and dicts inside them, 4 levels deep) by that job's return value (#14)."""
    values: dict[int, Any] = {}

    def value_of(job_id: int) -> Any:
        if job_id not in values:
            path = os.path.join(jobdir, DEPS_DIR, f"{job_id}.pkl")
            try:
                outcome = _load(cloudpickle, path)
            except FileNotFoundError:
                raise LookupError(
                    f"gpud.result_of({job_id}): job {job_id} left no result for this job "
                    f"(name it in after=, and let it succeed)"
                ) from None
            if not outcome.get("ok"):
                raise RuntimeError(
                    f"gpud.result_of({job_id}): job {job_id} failed "
                    f"({outcome.get('type')}: {outcome.get('message')}), so it has no value "
                    "to pass on"
                )
            values[job_id] = outcome["value"]
        return values[job_id]

    def sub(v: Any, depth: int) -> tuple[Any, bool]:
        t = type(v)
        if t is slice and v.start == RESULT_OF_TAG and type(v.stop) is int:
            return value_of(v.stop), True
        if depth >= 4 or t not in (list, tuple, dict):
            return v, False
        if t is dict:
            pairs = [(k, sub(x, depth + 1)) for k, x in v.items()]
            if any(c for _, (_, c) in pairs):
                return {k: x for k, (x, _) in pairs}, True
            return v, False
        items = [sub(x, depth + 1) for x in v]
        if any(c for _, c in items):
            return t(x for x, _ in items), True
        return v, False

    new_args, changed = sub(tuple(args), 0)
    new_kwargs, changed_kw = sub(dict(kwargs), 0)
    if not changed and not changed_kw:
        return args, kwargs
    return new_args, new_kwargs


def _load_function(cloudpickle: ModuleType, path: str, cache: dict[str, Any] | None) -> Any:
    """The job's function; a warm worker keeps the one it loaded last, so a function's
    module-level setup (imports, a loaded model) survives to its next call."""
    if cache is None:
        return _load(cloudpickle, path)
    return _function_from(cloudpickle, _read_bytes(path), cache)


def _function_from(cloudpickle: ModuleType, data: bytes, cache: dict[str, Any] | None) -> Any:
    if cache is None:
        return cloudpickle.loads(data)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    if digest not in cache:
        cache.clear()
        cache[digest] = cloudpickle.loads(data)
    return cache[digest]


def _mark_user_start(jobdir: str) -> None:
    """When the user's code starts: for the daemon's startup-latency record, and for a
    restarted daemon, which starts again a job that never began (no such file) rather
    than marking it lost.

    Not synced (#12: an fsync here cost 4-5 ms of every cold job on this box). A daemon
    killed (-9) at any step loses nothing of it: the file is in the page cache, which a
    process's death does not touch. Only a machine crash can lose it, and then the job's
    process is gone as well: the restarted daemon starts the job again rather than marking
    it LOST, as it did before whenever the rename (never synced: no fsync of the
    directory) had not reached the disk."""
    with contextlib.suppress(OSError):
        _write_atomic(os.path.join(jobdir, STARTED_FILE), repr(time.time()).encode(), sync=False)


def _skip_worker_frame(exc: BaseException) -> BaseException:
    # The first frame is _run's call of the function: noise in the user's traceback.
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        exc.__traceback__ = tb.tb_next
    return exc


def _dump_outcome(cloudpickle: ModuleType, outcome: Outcome, name: str) -> tuple[Outcome, bytes]:
    try:
        try:
            return outcome, cloudpickle.dumps(outcome)
        except Exception as e:
            if not outcome["ok"]:
                raise  # an error outcome is plain data; this cannot be the value's fault
            what = type(outcome["value"]).__qualname__
            raise pickle.PicklingError(
                f"the return value of {name} (a {what}) could not be pickled: "
                f"{type(e).__name__}: {e}"
            ) from e
    except pickle.PicklingError as e:
        # No traceback: its frames would be the worker's and cloudpickle's, and the
        # message already says what could not be pickled and why.
        failure = _failure(_type_name(e), str(e), None, _dump_exception(cloudpickle, e))
        return failure, cloudpickle.dumps(failure)


def _clean(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    if len(text) > limit:
        text = "...[truncated]...\n" + text[-limit:]  # the end of a traceback matters most
    # Lone surrogates (undecodable file names in messages) are not valid UTF-8.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _status(outcome: Outcome, attempt: object = None) -> bytes:
    ok = bool(outcome["ok"])
    status = {
        # Which attempt wrote this (from job.json): a restarted daemon must never take
        # an earlier attempt's status for the current one's.
        "attempt": attempt if isinstance(attempt, int) else None,
        "ok": ok,
        "type": None if ok else outcome["type"],
        "message": None if ok else _clean(outcome["message"], _STATUS_MESSAGE_MAX),
        "traceback": None if ok else _clean(outcome["traceback"], _STATUS_TRACEBACK_MAX),
        "python": ".".join(str(x) for x in sys.version_info[:3]),
    }
    return json.dumps(status).encode("utf-8")


def _write_atomic(path: str, data: bytes, sync: bool = True) -> None:
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.tmp")
    # Private like the rest of the job directory: a result is the job owner's business.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_outcome(jobdir: str, result: bytes, status: bytes) -> None:
    # status.json last: once it exists, result.pkl is complete.
    _write_atomic(os.path.join(jobdir, RESULT_FILE), result)
    _write_atomic(os.path.join(jobdir, STATUS_FILE), status)
    fd = os.open(jobdir, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the renames themselves durable
    finally:
        os.close(fd)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        # User code may have closed or replaced them.
        with contextlib.suppress(Exception):
            stream.flush()


def _redirect_output(path: str | None) -> None:
    """Send stdout and stderr to a job's log file (appending, as a plain process job's log
    is written): in a container they would belong to the container runtime, and a warm
    worker writes each job's output to that job's own log."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_job(
    jobdir: str, fn_cache: dict[str, Any] | None = None, inline: Inline | None = None
) -> int:
    """Run the job in ``jobdir`` to its end: result files written, exit code returned.
    ``inline``: the job and its payload came over the hub, not as files."""
    try:
        job = _read_job(jobdir, inline)
        mismatch = _version_mismatch(job["python"])
        import cloudpickle  # type: ignore[import-untyped]  # ships no hints
    except _SetupError as e:
        _say(str(e))
        return EXIT_SETUP
    except ImportError as e:
        _say(
            f"cannot import cloudpickle (from the job's environment, or the runtime directory): {e}"
        )
        return EXIT_SETUP

    _early_warning()
    if mismatch is not None:
        outcome: Outcome = _failure(VERSION_MISMATCH_TYPE, mismatch, None)
        code = EXIT_SETUP
        _say(mismatch)
    else:
        sys.argv = [job["name"]]
        outcome, code = _run(cloudpickle, jobdir, job, fn_cache, inline)
        _flush_std()
    outcome, data = _dump_outcome(cloudpickle, outcome, job["name"])
    if code == EXIT_OK and not outcome["ok"]:
        code = EXIT_ERROR  # the value could not be pickled
    status = _status(outcome, job.get("attempt"))
    if inline is not None and inline.result_max is not None and len(data) <= inline.result_max:
        # A small result goes back over the hub, and the daemon stores it with the job's
        # end in one commit (#12): no file, no fsync. serve() writes the files after all
        # if the daemon goes away before it says it has it.
        inline.result, inline.status = data, status
        return code
    try:
        _write_outcome(jobdir, data, status)
    except OSError as e:
        _say(f"cannot write the job's result into {jobdir}: {e}")
        return EXIT_SETUP
    if inline is not None:
        inline.status = status  # written and synced: the daemon may rely on it
    return code


def _send(sock: Any, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode("utf-8") + b"\n")


def _connect_hub(hub: str) -> Any:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(hub)
    except OSError as e:
        sock.close()
        _say(f"cannot reach the daemon's worker hub {hub}: {e}")
        return None
    return sock


def _prepare(jobdir: str, fn_cache: dict[str, Any]) -> str | None:
    """Load a snapshot's function and run its snapshot setup (a class's
    ``@gpud.enter(snap=True)`` methods); None when that went well, else why not. What
    it prints goes to the log of the job that takes the snapshot."""
    try:
        import cloudpickle

        fn = _load_function(cloudpickle, os.path.join(jobdir, FUNCTION_FILE), fn_cache)
        setup = getattr(fn, "__gpud_snap__", None)
        if callable(setup):
            setup()
    except BaseException as e:  # noqa: BLE001 - the job's run reports it properly
        fn_cache.clear()
        return f"{_type_name(e)}: {e}"
    return None


def _await_go(go: str, limit: float = 3600.0) -> bool:
    """Wait, holding no connection (CRIU cannot dump one to the outside), until the
    daemon has checkpointed this process. A restored copy finds the file at once."""
    deadline = time.monotonic() + limit
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def serve(hub: str, token: str) -> int:
    """A warm worker: run job after job sent by the daemon over its hub socket, keeping
    the loaded function (and whatever its module set up) between calls of one function.

    Each task names a job directory (output goes to that job's log) and, with
    ``"payload": [n, m]``, is followed by n bytes of the function's pickle and m of the
    arguments' (job.json's content comes as ``"job"``); the answer then carries the
    start time and status.json's content as well as the exit code. The daemon ends the
    worker when it has been idle long enough (keep_warm), or needs its GPUs: it closes
    the connection or kills the process. A closed connection also ends it when the
    daemon itself goes away, after the task at hand.

    A task with ``"result_max": n`` may have its result pickle (up to n bytes) sent back
    after the answer's line (``"result": size``) instead of written to files (#12). The
    worker keeps it until the daemon says ``{"ack": job_id}`` (it has stored it); should
    the connection end before that, the worker writes the files, as it would have at
    once, so that the next daemon collects the job's outcome from them.

    A snapshot-taking worker first gets ``{"prepare": dir, "go": path, "token": t}``: it
    loads the function and runs its snapshot setup, says ``{"ready": ...}``, closes its
    connection and waits for ``go`` to exist. The daemon checkpoints it meanwhile; then
    this process and every container restored from the checkpoint reconnect, saying
    ``{"hello": t}``, and the daemon tells them apart by their container.
    """
    sock = _connect_hub(hub)
    if sock is None:
        return EXIT_SETUP
    # ack_on_task: the daemon's word that results are stored may ride on a task (#12).
    _send(sock, {"hello": token, "pid": os.getpid(), "ack_on_task": True})
    reader = sock.makefile("rb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    fn_cache: dict[str, Any] = {}
    #: results sent inline that the daemon has not yet said it stored: job id ->
    #: (job directory, result pickle, status.json's bytes)
    unacked: dict[Any, tuple[str, bytes, bytes]] = {}
    try:
        return _serve_loop(hub, sock, reader, devnull, fn_cache, unacked)
    finally:
        _write_unacked(unacked)


def _write_unacked(unacked: dict[Any, tuple[str, bytes, bytes]]) -> None:
    """The daemon went away before storing these results: write them where the next
    daemon's recovery looks (result.pkl, status.json), synced, as a cold job would."""
    for jobdir, data, status in unacked.values():
        try:
            _write_outcome(jobdir, data, status)
        except OSError as e:
            _say(f"cannot write the job's result into {jobdir}: {e}")
    unacked.clear()


def _serve_loop(
    hub: str,
    sock: Any,
    reader: Any,
    devnull: int,
    fn_cache: dict[str, Any],
    unacked: dict[Any, tuple[str, bytes, bytes]],
) -> int:
    start_dir = os.getcwd()
    while True:
        try:
            line = reader.readline()
        except OSError:
            break  # the daemon went away (a reset connection)
        if not line:
            break
        try:
            task = json.loads(line)
        except ValueError:
            break
        if not isinstance(task, dict):
            break
        if "ack" in task:
            # Results the daemon has stored: alone, or riding on the next task (#12).
            acked = task["ack"]
            for job_id in acked if isinstance(acked, list) else [acked]:
                if isinstance(job_id, (int, str)):
                    unacked.pop(job_id, None)
            if "dir" not in task:
                continue
        if "prepare" in task:
            jobdir = os.path.realpath(task["prepare"])
            _redirect_output(os.path.join(jobdir, "output.log"))
            try:
                os.chdir(jobdir)
                error = _prepare(jobdir, fn_cache)
            finally:
                _flush_std()
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                with contextlib.suppress(OSError):
                    os.chdir(start_dir)
            _send(sock, {"ready": error is None, "error": error})
            if error is not None:
                continue  # no snapshot; the job itself runs, and reports the error
            reader.close()
            sock.close()
            if not _await_go(str(task["go"])):
                return EXIT_SETUP
            sock = _connect_hub(hub)
            if sock is None:
                return EXIT_SETUP
            _send(sock, {"hello": task["token"], "pid": os.getpid(), "ack_on_task": True})
            reader = sock.makefile("rb")
            continue
        if "dir" not in task:
            break
        # Per job: which job this is, and its GPUs (a restored process has the snapshot
        # taker's environment).
        env = task.get("env")
        if isinstance(env, dict):
            os.environ.update({str(k): str(v) for k, v in env.items()})
        jobdir = os.path.realpath(task["dir"])
        try:
            inline = _read_inline(reader, task)
        except EOFError:
            break
        _redirect_output(os.path.join(jobdir, "output.log"))
        try:
            os.chdir(jobdir)
            code = run_job(jobdir, fn_cache, inline)
        finally:
            _flush_std()
            os.dup2(devnull, 1)  # between jobs, nothing reaches a job's log
            os.dup2(devnull, 2)
            with contextlib.suppress(OSError):
                os.chdir(start_dir)
        done: dict[str, Any] = {"done": task.get("job_id"), "code": code}
        tail = b""
        if inline is not None:
            # The outcome inline (#12): the daemon need not read status.json back.
            done["started"] = inline.started
            done["status"] = None if inline.status is None else json.loads(inline.status)
            if inline.result is not None and inline.status is not None:
                done["result"], tail = len(inline.result), inline.result
                unacked[task.get("job_id")] = (jobdir, inline.result, inline.status)
        try:
            sock.sendall(json.dumps(done).encode("utf-8") + b"\n" + tail)
        except OSError:
            break  # the daemon went away: the finally of serve() writes the files
    return EXIT_OK


def _read_inline(reader: Any, task: dict[str, Any]) -> Inline | None:
    """A task with ``"payload": [n_function, n_args]`` is followed on the connection by
    that many bytes of the function's pickle, then of the arguments'."""
    sizes = task.get("payload")
    if not (
        isinstance(sizes, list)
        and len(sizes) == 2
        and all(isinstance(n, int) and n >= 0 for n in sizes)
    ):
        return None
    function, args = reader.read(sizes[0]), reader.read(sizes[1])
    if len(function) != sizes[0] or len(args) != sizes[1]:
        raise EOFError("the daemon hung up in the middle of a task")
    limit = task.get("result_max")
    return Inline(
        task.get("job"), function, args, limit if isinstance(limit, int) and limit >= 0 else None
    )


def _runtime_last() -> None:
    """Move the runtime directory (sys.path[0], this script's) to the end of sys.path:
    cloudpickle then comes from the job's own environment, the version its caller
    pickled with, and the runtime's copy is the fallback for an interpreter without it."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and sys.path[0] and os.path.abspath(sys.path[0]) == here:
        sys.path.append(sys.path.pop(0))


def _on_term() -> None:
    """SIGTERM (a cancel or a timeout; SIGKILL follows after the job's grace) runs the
    exit hooks first: ``@gpud.exit`` methods and the job's own ``atexit`` functions
    (#14). Then it ends as a process killed by SIGTERM; as a container's first process
    (pid 1), whose unhandled signals the kernel drops, with exit code 128 + 15, or
    `podman stop` waited out the whole grace. A job that sets its own SIGTERM handler
    replaces this one, as it would the default."""
    import atexit
    import signal

    worker = os.getpid()

    def end(signum: int, frame: object) -> None:
        if os.getpid() != worker:
            # A child the job forked (multiprocessing) inherits this handler and a copy
            # of the exit hooks, which are the worker's to run, once: end as by default.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_IGN)  # a second TERM must not cut the hooks short
        try:
            atexit._run_exitfuncs()
        finally:
            _flush_std()
            if os.getpid() == 1:
                os._exit(128 + signum)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, end)


def _early_warning() -> None:
    """With signal_before= (#14) the daemon sends $GPUD_SIGNAL that long before the
    timeout. Left at its default action, SIGUSR1 would kill the job at once: say so in
    the log instead, unless the job set its own handler (which this never replaces)."""
    import signal

    name = os.environ.get("GPUD_SIGNAL") or ""
    sig = getattr(signal, name, None) if name.startswith("SIG") else None
    if sig is None:
        return
    current = signal.getsignal(sig)
    if current not in (signal.SIG_DFL, None) and not getattr(current, "_gpud_note", False):
        return

    def note(signum: int, frame: object) -> None:
        before = os.environ.get("GPUD_SIGNAL_BEFORE", "?")
        _say(
            f"{name}: this job's timeout is {before} s away; it will then get SIGTERM. "
            f"Save what it needs to $GPUD_STATE_DIR (set a handler for {name} to act on it)"
        )

    note._gpud_note = True  # type: ignore[attr-defined]  # a mark on a function
    with contextlib.suppress(ValueError, OSError):
        signal.signal(sig, note)


def _flush_open_files() -> None:
    """Flush every buffered file still open (a job's module-level log file, say): what
    the teardown's collection of them would have done."""
    import gc
    import io

    text, buffered = [], []
    for obj in gc.get_objects():
        kind = type(obj)
        if kind is io.TextIOWrapper:
            text.append(obj)
        elif kind is io.BufferedWriter or kind is io.BufferedRandom:
            buffered.append(obj)
    for f in text + buffered:  # a text file's buffer after the text itself
        with contextlib.suppress(Exception):  # closed, detached, or a full disk
            if not f.closed:
                f.flush()


def _end_process(code: int) -> NoReturn:
    """End a cold job's process as the interpreter's own exit would, in its order: wait
    for the job's non-daemon threads, run its ``atexit`` functions (``@gpud.exit``
    methods, logging's flush, multiprocessing's and ``weakref.finalize``'s clean-ups),
    flush stdout, stderr and the files it left open. Then ``os._exit``, without the
    teardown of every module and object: 10-20 ms of a cold job's process on this
    2-core box once cloudpickle is imported, more than anything else gpud adds (#12).
    ``__del__`` of objects still alive at that point does not run, which Python does not
    promise at exit either; the result and status files are written and synced already."""
    import threading

    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls
    with contextlib.suppress(BaseException):
        import atexit

        atexit._run_exitfuncs()  # prints a failing callback's traceback, as at exit
    with contextlib.suppress(BaseException):
        _flush_open_files()
    _flush_std()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    _runtime_last()
    _on_term()
    if len(argv) == 2 and argv[1] == "--serve":
        hub, token = os.environ.get("GPUD_HUB"), os.environ.pop("GPUD_WORKER_TOKEN", "")
        if not hub or not token:
            _say("gpud_worker.py --serve needs GPUD_HUB and GPUD_WORKER_TOKEN")
            return EXIT_SETUP
        return serve(hub, token)
    _redirect_output(os.environ.get("GPUD_LOG_FILE"))
    if len(argv) != 2:
        _say("usage: gpud_worker.py JOBDIR | --serve")
        return EXIT_SETUP
    # Absolute, so a function that calls os.chdir() does not move where results go.
    _end_process(run_job(os.path.realpath(argv[1])))


if __name__ == "__main__":
    sys.exit(main())
