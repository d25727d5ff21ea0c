"""The process executor: each job is the worker runtime in a child process of its own.

Each job gets its own session (so its own process group): cancel and timeout signal the
whole group, and whatever the job forked is stopped with it. stdout and stderr go
straight to the job's log file (not through a pipe to the daemon), so a job keeps
running and logging while the daemon restarts, and is re-adopted afterwards.

Jobs never run as root: a daemon run by a user runs jobs as that user; a daemon run as
root runs each job as its submitter's Unix user (uid, gid and groups; see
:func:`gpud.users.run_as`), and jobs of root itself as ``job_user`` (default ``nobody``).
By default a job runs with its caller's own interpreter and environment, checked at
submit (:mod:`gpud.interpreters`, #11); the admin's (``python="daemon"``) is probed
once per job user, since each may be able to run a different one.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import stat
import subprocess
import sys
from collections.abc import Collection, Iterable
from pathlib import Path

import trio

from gpud.domain import Job, JobState, PythonEnv
from gpud.executors.base import ExecutorRefusal, Handle, ImageInfo, LaunchSpec, Outcome
from gpud.identity import JobIdentity  # re-exported: the daemon and tests import it here
from gpud.interpreters import Interpreters, activation_env
from gpud.safefs import open_append
from gpud_client.jobdir import worker_command

__all__ = [
    "JobIdentity",
    "ProcessExecutor",
    "WorkerPythonError",
    "find_job_processes",
    "job_environment",
    "job_identity",
    "proc_start_time",
    "processes_with_env",
    "resolve_worker_python",
    "find_setpriv",
    "switch_user_command",
]

#: Where util-linux's setpriv lives (Debian, Ubuntu, Fedora, Arch, Alpine's util-linux).
SETPRIV_PATHS = ("/usr/bin/setpriv", "/bin/setpriv")


class WorkerPythonError(RuntimeError):
    """No interpreter the job user can run was found."""


def job_identity(job_user: str) -> JobIdentity:
    """Who jobs run as: the daemon's own user, or ``job_user`` when the daemon is root."""
    euid = os.geteuid()
    if euid != 0:
        pw = pwd.getpwuid(euid)
        return JobIdentity(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, switch=False)
    try:
        pw = pwd.getpwnam(job_user)
    except KeyError:
        raise WorkerPythonError(
            f"job_user = {job_user!r} does not exist on this machine: create it, or set "
            "job_user to an existing unprivileged user (jobs never run as root)"
        ) from None
    if pw.pw_uid == 0:
        raise WorkerPythonError(
            f"job_user = {job_user!r} is root; jobs never run as root: pick an unprivileged user"
        )
    return JobIdentity(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, switch=True)


def find_setpriv(paths: Iterable[str] = SETPRIV_PATHS) -> str | None:
    """setpriv, if installed as root's own file (a root daemon execs it before anything
    else in every job); None if not, and jobs then switch user inside subprocess.

    Why (#12): CPython 3.11 forks, rather than vforks, whenever ``user=``, ``group=`` or
    ``extra_groups=`` is given, and fork copies the daemon's page tables: 8 ms per job
    with an idle daemon's 50 MB, 30 ms at 200 MB, on this 2-core box, against 0.3 ms
    for vfork. Spawning setpriv with vfork and letting it drop to the job's user before
    it execs the worker costs one small exec instead. The pid, session and environment
    are the worker's own once setpriv has exec'd it.
    """
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (
            stat.S_ISREG(st.st_mode)
            and st.st_uid == 0
            and not st.st_mode & 0o022
            and st.st_mode & 0o111
        ):
            return path
    return None


def switch_user_command(setpriv: str, ident: JobIdentity, cmd: list[str]) -> list[str]:
    """``cmd`` run as ``ident`` through setpriv: real, effective and saved uid and gid,
    and exactly its supplementary groups, as ``Popen(user=, group=, extra_groups=)``
    sets them. A root daemon's permitted and effective capabilities go with the uid."""
    if ident.uid == 0 or ident.gid == 0:
        raise ExecutorRefusal("jobs never run as root")  # run_as never gives this
    groups = ",".join(str(g) for g in ident.groups)
    return [
        setpriv,
        f"--reuid={ident.uid}",
        f"--regid={ident.gid}",
        f"--groups={groups}" if groups else "--clear-groups",
        "--",
        *cmd,
    ]


def _probe(python: str, ident: JobIdentity, runtime_dir: Path) -> str:
    """Run ``python`` as the job user with the runtime on its path; return its version."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cloudpickle; "
        "print('%d.%d.%d' % sys.version_info[:3])"
    )
    out = subprocess.run(
        [python, "-c", code, str(runtime_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": ident.home, "LANG": "C.UTF-8"},
        **ident.popen_kwargs(),
    )
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise WorkerPythonError(lines[-1] if lines else f"exit code {out.returncode}")
    return str(out.stdout).strip()


def resolve_worker_python(
    configured: str | None, ident: JobIdentity, runtime_dir: Path
) -> tuple[str, str]:
    """Pick the interpreter jobs run with; return (path, version).

    The configured one if set; else the daemon's own; else (e.g. the daemon's venv lives
    under /root, which ``nobody`` cannot enter) the system python3 of the same minor
    version. Each candidate is probed as the job user, so a bad choice fails at start-up
    with a reason rather than at the first job.
    """
    mine = "{}.{}".format(*sys.version_info[:2])
    candidates = [configured] if configured else [sys.executable, "/usr/bin/python3"]
    errors = []
    for cand in candidates:
        if not cand:
            continue
        try:
            version = _probe(cand, ident, runtime_dir)
        except (OSError, subprocess.SubprocessError, WorkerPythonError) as e:
            errors.append(f"{cand}: {e}")
            continue
        if configured or version.rsplit(".", 1)[0] == mine:
            return cand, version
        errors.append(f"{cand}: Python {version}, not {mine}")
    raise WorkerPythonError(
        f"no Python that job user {ident.user!r} can run was found ("
        + "; ".join(errors)
        + '): set `python = "/path/to/python3"` in the config to an interpreter that user '
        "can execute"
    )


def job_environment(spec: LaunchSpec, identity: JobIdentity, instance: str) -> dict[str, str]:
    """A job's whole environment: nothing of the daemon's leaks in, and the user's env=
    cannot override what gpud sets (its GPUs, its identity)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env.update(spec.env)
    visible = ",".join(spec.gpus)
    env.update(
        {
            "HOME": identity.home,
            "USER": identity.user,
            "LOGNAME": identity.user,
            "PYTHONUNBUFFERED": "1",
            # By UUID, never by index: indices differ between NVML and CUDA's default order.
            "CUDA_VISIBLE_DEVICES": visible,
            "NVIDIA_VISIBLE_DEVICES": visible or "void",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "GPUD_JOB_ID": str(spec.job_id),
            "GPUD_ATTEMPT": str(spec.attempt),
            "GPUD_INSTANCE": instance,
        }
    )
    if spec.python_env is not None:
        # As `source bin/activate` (or `conda activate`) would: after the user's env=,
        # whose PATH, if any, it extends.
        env.update(activation_env(spec.python_env, env["PATH"]))
    return env


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


def proc_session(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[3])


def processes_with_env(*entries: str) -> list[int]:
    """Pids (that we may inspect) whose environment holds every ``NAME=value`` given."""
    want = [e.encode() for e in entries]
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if all(w in env for w in want):
            found.append(int(entry.name))
    return sorted(found)


def find_job_processes(job_id: int, instance: str, attempt: int | None = None) -> list[int]:
    """Pids whose environment marks them as job ``job_id`` of daemon ``instance`` (and
    of that attempt, if given).

    Used on restart for a job the ledger saw STARTING: its process may have been spawned
    just before the daemon died, before its pid reached the ledger.
    """
    marks = [f"GPUD_JOB_ID={job_id}", f"GPUD_INSTANCE={instance}"]
    if attempt is not None:
        marks.append(f"GPUD_ATTEMPT={attempt}")
    return processes_with_env(*marks)


def _alive(pid: int, pid_start: int | None) -> bool:
    start = proc_start_time(pid)
    if start is None:
        return False
    if pid_start is not None and start != pid_start:
        return False  # the pid was reused by another process
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


class Child(subprocess.Popen[bytes]):
    """A job's process as this executor started it. A daemon that stops leaves its busy
    jobs running for the next one to adopt, so a ``Child`` may be dropped while its
    process runs: where ``Popen`` would warn (a ResourceWarning, "still running"), it
    is set aside and reaped once it has ended (:func:`reap_detached`, at each launch)."""

    def __del__(self) -> None:
        if self.returncode is None and self.poll() is None:
            _detached.append(self)  # alive again: a later launch reaps it


#: children dropped while running (their daemon stopped first), to be reaped once ended
_detached: list[Child] = []


def reap_detached() -> int:
    """Reap the detached children that have ended; how many are left running."""
    _detached[:] = [c for c in _detached if c.poll() is None]
    return len(_detached)


async def wait_child(proc: subprocess.Popen[bytes]) -> int:
    """The exit status of our child ``proc``, waited for on a pidfd of this call's own,
    closed however the wait ends (a cancelled wait leaves no descriptor behind), then
    reaped. Several tasks may wait for one child at once: each has its own pidfd."""
    if proc.poll() is None:
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:  # reaped between the two calls: wait() has its status
            fd = -1
        if fd >= 0:
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
    return proc.wait()  # readable: it has exited, so this only reaps it


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


class ProcessExecutor:
    name = "process"
    supports_warm = True
    supports_job_python = True  # each job's own interpreter (#11): InterpreterCapable
    reap_is_a_signal = True  # killpg: reaped on the daemon's loop (Caps.quick_reap, #12)

    def __init__(
        self,
        *,
        python: str,
        version: str,
        runtime_dir: Path,
        identity: JobIdentity,
        instance: str,
        configured_python: str | None = None,
        allowed_pythons: list[str] | None = None,
        setpriv: str | None | bool = True,
    ) -> None:
        self.python = python
        self.version = version
        self.runtime_dir = runtime_dir
        self.identity = identity
        self.instance = instance
        self.configured_python = configured_python
        #: how jobs switch user: through setpriv (True: if found), or inside subprocess
        self.setpriv = (
            (find_setpriv() if setpriv is True else setpriv or None) if identity.switch else None
        )
        #: our children, by pid: plain Popen objects, which hold no descriptor (a wait opens
        #: a pidfd of its own and closes it however it ends)
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._pythons: dict[int, str] = {identity.uid: python}  # uid -> interpreter
        #: each job's own interpreter (#11), checked as its user at submit
        self.interpreters = Interpreters(runtime_dir, allowed_pythons)

    async def interpreter_for(self, ident: JobIdentity) -> str:
        """The interpreter ``ident`` can run, probed the first time (as that user) and then
        remembered; a failed probe is not, so fixing permissions needs no restart."""
        found = self._pythons.get(ident.uid)
        if found is not None:
            return found
        path, _ = await trio.to_thread.run_sync(
            resolve_worker_python, self.configured_python, ident, self.runtime_dir
        )
        self._pythons[ident.uid] = path
        return path

    async def start(self) -> None:
        return None

    async def resolve_python(
        self,
        requested: str | None,
        *,
        version: str,
        prefix: str | None,
        ident: JobIdentity,
        owner: str,
    ) -> PythonEnv:
        """The interpreter a job of ``owner`` (run as ``ident``) asking for ``requested``
        runs with: its path ("daemon" or None: the admin's); ExecutorRefusal if none."""
        if requested in (None, "daemon"):
            try:
                path = await self.interpreter_for(ident)
            except WorkerPythonError as e:
                raise ExecutorRefusal(str(e)) from None

            def daemons() -> PythonEnv:
                probe = self.interpreters.probe(path, ident)
                return self.interpreters.env_for(path, probe, kind="daemon")

            with contextlib.suppress(OSError):
                known = self.interpreters.cached(path, ident)
                if known is not None:
                    # Probed before and unchanged: a few stats, cheaper here than the
                    # thread trip every submit made (#12).
                    return self.interpreters.env_for(path, known, kind="daemon")

            try:
                return await trio.to_thread.run_sync(daemons)
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                raise ExecutorRefusal(
                    f"the daemon's interpreter {path} no longer runs for {ident.user!r} "
                    f"({e}): ask the admin to check `python` in the daemon's config"
                ) from None
        assert requested is not None
        return await trio.to_thread.run_sync(
            lambda: self.interpreters.check(
                requested, version=version, prefix=prefix, ident=ident, owner=owner
            )
        )

    async def python_for(self, image: str | None) -> tuple[str, str]:
        if image:
            raise ExecutorRefusal(
                f"image={image!r} needs the Podman executor, and this daemon runs jobs as "
                f"plain processes with Python {self.version} ({self.python}): drop image=, "
                'or ask the admin for executor = "podman"'
            )
        return "", self.version

    async def images(self) -> list[ImageInfo]:
        return []

    def task_dir(self, job_dir: Path) -> str:
        return str(job_dir)

    def job_for_pid(self, pid: int, handles: Iterable[Handle]) -> int | None:
        # Every job is its own session, led by the worker: match by session id.
        sid = proc_session(pid)
        for h in handles:
            if pid == h.pid or sid == h.pid:
                return h.job_id
        return None

    def cleanup(self, active: set[int], pids: Collection[int] = ()) -> None:
        return None  # a process job leaves nothing behind but its directory

    async def launch(self, spec: LaunchSpec) -> Handle:
        ident = spec.identity or self.identity
        if spec.python_env is not None:
            python = spec.python_env.path
        else:  # queued before #11, or adopted: the daemon's, as then
            python = await self.interpreter_for(ident)
        log_fd = open_append(spec.log_path, (ident.uid, ident.gid))
        try:
            cmd = worker_command(python, self.runtime_dir, spec.job_dir)
            env = job_environment(spec, ident, self.instance)
            if spec.serve is not None:
                cmd[-1] = "--serve"
                env["GPUD_HUB"], env["GPUD_WORKER_TOKEN"] = spec.serve
            switch = ident.popen_kwargs()
            if switch and self.setpriv is not None:
                cmd, switch = switch_user_command(self.setpriv, ident, cmd), {}

            # Not trio.lowlevel.open_process: its Process keeps a pidfd open until it is
            # waited for, and a job the daemon leaves running (a restart adopts it) is not.
            def spawn() -> subprocess.Popen[bytes]:
                return Child(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    cwd=str(spec.job_dir),
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                    **switch,
                )

            if switch:
                # subprocess forks to switch user itself: a copy of the daemon's page
                # tables, milliseconds at its size, so not on the event loop.
                proc = await trio.to_thread.run_sync(spawn)
            else:
                # No preexec_fn and no user switch: subprocess uses vfork, and Popen
                # returns once the child exec'd (setpriv, or the worker): ~0.4 ms here,
                # less than the thread trip and wake-up trio's open_process costs (#12).
                proc = spawn()
        finally:
            os.close(log_fd)
        self._procs[proc.pid] = proc
        reap_detached()
        start = proc_start_time(proc.pid)
        return Handle(job_id=spec.job_id, pid=proc.pid, pid_start=start or 0)

    async def wait(self, handle: Handle) -> Outcome:
        proc = self._procs.get(handle.pid)
        if proc is not None:
            code = await wait_child(proc)
            self._procs.pop(handle.pid, None)
            if code < 0:
                return Outcome(exit_code=None, signal=-code)
            return Outcome(exit_code=code)
        # Not our child (adopted after a restart): wait on a pidfd, which works for any
        # process we may signal, then take the outcome from the job directory.
        try:
            fd = os.pidfd_open(handle.pid)
        except ProcessLookupError:
            return Outcome(exit_code=None)
        try:
            if _alive(handle.pid, handle.pid_start):
                await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        return Outcome(exit_code=None)

    async def stop(self, handle: Handle, grace: float) -> bool:
        _killpg(handle.pid, signal.SIGTERM)
        ended = False
        with trio.move_on_after(grace):
            while _alive(handle.pid, handle.pid_start):
                proc = self._procs.get(handle.pid)
                if proc is not None:
                    await wait_child(proc)
                    break
                await trio.sleep(0.05)
            ended = True
        self.reap(handle)
        proc = self._procs.get(handle.pid)
        if proc is not None:
            # Give the kernel a moment to deliver SIGKILL, then collect the zombie.
            with trio.move_on_after(5):
                await wait_child(proc)
            self._procs.pop(handle.pid, None)
        return not ended  # True: it took SIGKILL (#14: the job's events say which)

    async def send_signal(self, handle: Handle, sig: int) -> bool:
        """Signal the job's leader, the worker (#14's early warning); False if gone."""
        if not _alive(handle.pid, handle.pid_start):
            return False
        try:
            os.kill(handle.pid, sig)
        except OSError:
            return False
        return True

    def reap(self, handle: Handle) -> None:
        # SIGKILL the whole group: a job's stray children never outlive it.
        _killpg(handle.pid, signal.SIGKILL)

    def adopt(self, job: Job) -> Handle | None:
        job_id, pid_start = job.id, job.pid_start
        pid = job.pid if job.state is JobState.RUNNING else None
        if pid is not None and _alive(pid, pid_start):
            return Handle(job_id=job_id, pid=pid, pid_start=pid_start or 0, adopted=True)
        if pid is None:
            # Spawned but never recorded: look for it by its environment.
            for p in find_job_processes(job_id, self.instance, job.attempt):
                if proc_session(p) == p:  # the session leader is the worker itself
                    return Handle(
                        job_id=job_id, pid=p, pid_start=proc_start_time(p) or 0, adopted=True
                    )
        return None

    def kill_all(self) -> None:
        """Tests and `--kill-jobs-on-exit`: stop every job this executor started."""
        for pid in list(self._procs):
            _killpg(pid, signal.SIGKILL)
        for pid, proc in list(self._procs.items()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reaped: no zombie, and no Popen warning at its GC
            self._procs.pop(pid, None)
