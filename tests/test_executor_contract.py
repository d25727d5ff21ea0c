"""The executor contract (#12): what the daemon relies on, held against every executor.

One suite, run against the process executor, the Podman executor (skipped with the
reason where Podman is missing; a failure under GPUD_REQUIRE_PODMAN=1) and
gpud.testing.FakeExecutor. Each case names a behaviour of gpud/service.py's:

* launch then wait: the exit code, or the signal that ended the job, and the worker's
  outputs in the job directory (the daemon reads the outcome from there);
* wait is cancellable (a job's timeout and cancel are a cancel scope around it);
* stop: SIGTERM, ``grace`` seconds, then SIGKILL, and nothing of the job is left;
* reap: whatever the job left running after its leader ended is killed;
* adopt: a new executor object (the daemon restarted) finds a job still running, by its
  recorded pid or, never recorded, by job and attempt; None for a job that is gone;
* cleanup at start-up leaves the jobs it is told are active alone;
* job_for_pid tells the job's processes (children too) from others;
* task_dir, python_for and images answer as the daemon uses them.

Real jobs are the worker runtime running ``exec(source)``: no test module is pickled
into them, and each behaviour is a line of Python. The fake is told the same behaviours
as scripts.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import re
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import trio

from gpud.domain import Job, JobState
from gpud.executors.base import (
    Caps,
    Executor,
    ExecutorRefusal,
    Handle,
    LaunchSpec,
    Outcome,
    capabilities,
)
from gpud.executors.process import (
    ProcessExecutor,
    find_job_processes,
    job_identity,
    reap_detached,
    resolve_worker_python,
)
from gpud.identity import JobIdentity
from gpud.testing import FakeExecutor, FakeMachine, Script
from gpud_client.jobdir import RESULT_FILE, install_runtime, job_files, read_status

from .conftest import require_podman

#: Each behaviour a case needs: the Python a real job runs, and the fake's script.
HOLD = "import time; open('ready', 'w').close(); time.sleep(120)"
CHILD = (
    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(120)']); "
)
BEHAVIOURS: dict[str, tuple[str, Script]] = {
    "ok": ("open('ready', 'w').close()", Script(after=0.0, result=None)),
    "exit7": ("import os; os._exit(7)", Script(after=0.0, exit_code=7)),
    "raise": ("raise ValueError('boom')", Script(after=0.0, error="ValueError: boom")),
    "hold": (HOLD, Script(after=None)),
    "ignore_term": (
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + HOLD,
        Script(after=None, on_term="ignore"),
    ),
    # the leader starts a process and ends; the process runs on
    "leave_child": (CHILD + "open('ready', 'w').close()", Script(after=0.0, children=1)),
    "hold_with_child": (CHILD + HOLD, Script(after=None, children=1)),
}
GRACE = 1.0  # the Podman executor's stop rounds a grace up to whole seconds
_ids = itertools.count(1)


class Harness:
    """One executor under test, and what the suite needs to do to it from outside."""

    name: str
    executor: Any  # an Executor; Any so each harness can reach its own extras
    caps: Caps
    #: Podman reports a job killed by signal N as exit code 128 + N (the container's)
    signal_as_exit_code = False

    def __init__(self, base: Path) -> None:
        self.base = base
        self.jobs_dir = base / "jobs"
        self.jobs_dir.mkdir()
        os.chmod(self.jobs_dir, 0o711)
        self.handles: list[tuple[Any, Handle]] = []

    def spec(self, behaviour: str) -> LaunchSpec:
        job_id = next(_ids)
        d = self.jobs_dir / str(job_id)
        d.mkdir(mode=0o700)
        return LaunchSpec(job_id=job_id, attempt=1, job_dir=d, log_path=d / "output.log", gpus=())

    async def launch(self, behaviour: str, executor: Any = None) -> tuple[LaunchSpec, Handle]:
        ex = executor or self.executor
        spec = self.spec(behaviour)
        self.script(ex, spec, behaviour)
        handle = await ex.launch(spec)
        self.handles.append((ex, handle))
        return spec, handle

    def script(self, executor: Any, spec: LaunchSpec, behaviour: str) -> None:
        """Tell the executor what the job does, where it does not run the job's code."""

    async def restart(self) -> Any:
        """A new executor object over the same machine, as after a daemon restart."""
        raise NotImplementedError

    async def ready(self, spec: LaunchSpec) -> None:
        """Until the job has reached its behaviour (a signal handler installed, say)."""
        assert await eventually(lambda: (spec.job_dir / "ready").exists(), 60)

    def pids(self, job_id: int) -> list[int]:
        """The job's live processes, leader and children, as this machine's pids."""
        raise NotImplementedError

    def kill(self, handle: Handle, sig: int) -> None:
        """Signal the job's leader from outside (the OOM killer, an admin)."""
        os.kill(handle.pid, sig)

    async def gone(self, job_id: int) -> bool:
        """Whether nothing of the job runs any more (the kernel may take a moment)."""
        return await eventually(lambda: not self.pids(job_id), 10)

    async def finish(self) -> None:
        """Kill and collect what a case launched (every launch is waited for, as the
        daemon does: no zombie, no open pidfd left behind)."""
        for ex, h in self.handles:
            await trio.to_thread.run_sync(ex.reap, h)
            with trio.move_on_after(10):
                await ex.wait(h)
        self.handles.clear()


class RealHarness(Harness):
    """The process and Podman executors: real jobs, run as the job user."""

    def __init__(self, base: Path, ident: JobIdentity, instance: str) -> None:
        super().__init__(base)
        self.ident = ident
        self.instance = instance

    def spec(self, behaviour: str) -> LaunchSpec:
        spec = super().spec(behaviour)
        source = BEHAVIOURS[behaviour][0]
        files = job_files(
            job_id=spec.job_id,
            name="exec",
            python=_python(),
            function=cloudpickle.dumps(exec),
            args=cloudpickle.dumps(((source,), {})),
            attempt=spec.attempt,
        )
        for name, data in files.items():
            (spec.job_dir / name).write_bytes(data)
        for path in [spec.job_dir, *spec.job_dir.iterdir()]:
            os.chown(path, self.ident.uid, self.ident.gid)
        return spec

    def pids(self, job_id: int) -> list[int]:
        # Every process of a job carries its id and the daemon's instance in its
        # environment, in a container too.
        return find_job_processes(job_id, self.instance)


class ProcessHarness(RealHarness):
    name = "process"
    caps = Caps(warm=True, job_python=True, quick_reap=True)
    #: how a root daemon switches to the job user: setpriv (vfork, #12) if found
    setpriv: bool = True

    def __init__(self, base: Path) -> None:
        super().__init__(base, job_identity("nobody"), f"contract-{os.getpid()}")
        self.runtime = install_runtime(base / "runtime")
        self.python, self.version = resolve_worker_python(None, self.ident, self.runtime)
        self.executor = self._new()

    def _new(self) -> ProcessExecutor:
        return ProcessExecutor(
            python=self.python,
            version=self.version,
            runtime_dir=self.runtime,
            identity=self.ident,
            instance=self.instance,
            setpriv=self.setpriv,
        )

    async def restart(self) -> Any:
        return self._new()


class ProcessForkHarness(ProcessHarness):
    """The user switch done inside subprocess (a fork), where setpriv is missing."""

    name = "process-fork"
    setpriv = False


class PodmanHarness(RealHarness):
    name = "podman"
    caps = Caps(warm=True, snapshots=True, image_builds=True)
    signal_as_exit_code = True

    def __init__(self, base: Path) -> None:
        super().__init__(base, job_identity("nobody"), f"contract-{os.getpid()}")
        self.runtime = install_runtime(base / "runtime")
        self.image = "localhost/gpud-python:{}.{}".format(*sys.version_info)
        self.executor = self._new()
        trio.run(self.executor.start)

    def _new(self) -> Any:
        from gpud.executors.podman import PodmanExecutor

        return PodmanExecutor(
            url="unix:///run/podman/podman.sock",
            runtime_dir=self.runtime,
            identity=self.ident,
            instance=self.instance,
            default_image=self.image,
            start_service=True,
            fake_gpus=True,
            jobs_dir=self.jobs_dir,
        )

    async def restart(self) -> Any:
        ex = self._new()
        await ex.start()
        return ex


class SlurmHarness(ProcessHarness):
    """The Slurm executor (#15) on the single-node cluster: its jobs' processes are this
    machine's, found by their environment as the process executor's are."""

    name = "slurm"
    caps = Caps(job_python=True, arrays=True)

    def _new(self) -> Any:
        from gpud.executors.slurm import SlurmExecutor, SlurmSettings

        return SlurmExecutor(
            settings=SlurmSettings(poll_interval=0.2),
            python=self.python,
            version=self.version,
            runtime_dir=self.runtime,
            identity=self.ident,
            instance=self.instance,
        )

    def kill(self, handle: Handle, sig: int) -> None:
        # handle.pid is the Slurm job id: signal the worker, the batch job's leader.
        leaders = [p for p in self.pids(handle.job_id) if _parent_is_stepd(p)]
        assert leaders, f"no process of Slurm job {handle.pid} on this machine"
        os.kill(leaders[0], sig)


def _parent_is_stepd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        return os.path.basename(os.readlink(f"/proc/{ppid}/exe")).startswith("slurmstepd")
    except (OSError, ValueError):
        return False


class FakeHarness(Harness):
    name = "fake"
    caps = Caps()

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.machine = FakeMachine()
        self.executor = FakeExecutor(self.machine, images=["fake-image"])

    def script(self, executor: Any, spec: LaunchSpec, behaviour: str) -> None:
        executor.plan(spec.job_id, BEHAVIOURS[behaviour][1])

    async def restart(self) -> Any:
        return FakeExecutor(self.machine, images=["fake-image"])

    async def ready(self, spec: LaunchSpec) -> None:
        await trio.lowlevel.checkpoint()  # a fake job is where its script says at once

    def pids(self, job_id: int) -> list[int]:
        return self.machine.pids_of(job_id)

    def kill(self, handle: Handle, sig: int) -> None:
        self.machine.end(self.machine.processes[handle.pid], Outcome(exit_code=None, signal=sig))


async def eventually(check: Callable[[], bool], within: float) -> bool:
    """Whether ``check`` holds within ``within`` s. What it looks at is another process
    or the kernel (/proc, a file a job writes): nothing to wait on but the next look."""
    with trio.move_on_after(within):
        while not check():  # noqa: ASYNC110 - no event: the state is outside this process
            await trio.sleep(0.05)
    return check()


def _python() -> str:
    return "{}.{}.{}".format(*sys.version_info[:3])


@pytest.fixture(scope="module", params=["process", "process-fork", "podman", "slurm", "fake"])
def machine(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "podman":
        require_podman()
    if request.param == "slurm":
        request.getfixturevalue("slurm_cluster")  # skips, or fails in CI, without Slurm
    if request.param != "fake" and os.geteuid() != 0:
        pytest.skip("runs jobs as the job user 'nobody': needs root (CI runs as root)")
    base = Path(tempfile.mkdtemp(prefix="gpud-contract-", dir="/tmp"))
    os.chmod(base, 0o755)
    kinds = {
        "process": ProcessHarness,
        "process-fork": ProcessForkHarness,
        "podman": PodmanHarness,
        "slurm": SlurmHarness,
        "fake": FakeHarness,
    }
    h = kinds[request.param](base)
    try:
        yield h
    finally:
        if hasattr(h.executor, "kill_all"):
            h.executor.kill_all()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def h(machine: Harness) -> AsyncIterator[Harness]:
    """The harness, with whatever a case launched reaped after it, pass or fail."""
    yield machine
    await machine.finish()


def running(spec: LaunchSpec, handle: Handle | None, state: JobState = JobState.RUNNING) -> Job:
    """The ledger's record of a launched job, as a restarted daemon reads it."""
    return Job(
        id=spec.job_id,
        function="exec",
        state=state,
        submitted_at=0.0,
        attempt=spec.attempt,
        pid=handle.pid if handle else None,
        pid_start=handle.pid_start if handle else None,
    )


# -- what it is ---------------------------------------------------------------------------


def test_it_is_an_executor_with_its_capabilities(machine: Harness) -> None:
    assert isinstance(machine.executor, Executor)
    assert capabilities(machine.executor) == machine.caps


async def test_python_for_and_images(h: Harness) -> None:
    image, version = await h.executor.python_for(None)
    assert isinstance(image, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert version.rsplit(".", 1)[0] == _python().rsplit(".", 1)[0]
    with pytest.raises(ExecutorRefusal):
        await h.executor.python_for("localhost/no-such-image-gpud-contract:0")
    for info in await h.executor.images():
        assert info.name and isinstance(info.size, int)


def test_task_dir_names_the_job_directory(machine: Harness) -> None:
    where = machine.executor.task_dir(machine.jobs_dir / "1234")
    assert isinstance(where, str) and where.endswith("/1234")


# -- launch and wait ----------------------------------------------------------------------


async def test_success_exit_code_and_outputs(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("ok")
        assert handle.job_id == spec.job_id and handle.pid > 0 and not handle.adopted
        outcome = await h.executor.wait(handle)
    assert (outcome.exit_code, outcome.signal) == (0, None)
    status = read_status(spec.job_dir)
    assert status is not None and status.ok and status.attempt == spec.attempt
    assert (spec.job_dir / RESULT_FILE).is_file()


async def test_exit_codes(h: Harness) -> None:
    with trio.fail_after(60):
        _, handle = await h.launch("exit7")
        assert (await h.executor.wait(handle)).exit_code == 7
        spec, handle = await h.launch("raise")
        outcome = await h.executor.wait(handle)
    assert outcome.exit_code == 1  # the worker's EXIT_ERROR
    status = read_status(spec.job_dir)
    assert status is not None and not status.ok and status.message == "boom"
    assert (status.type or "").rsplit(".", 1)[-1] == "ValueError"  # as the daemon reads it


async def test_a_signal_that_kills_the_job(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("hold")
        await h.ready(spec)
        h.kill(handle, signal.SIGKILL)
        outcome = await h.executor.wait(handle)
    if h.signal_as_exit_code:
        assert (outcome.exit_code, outcome.signal) == (128 + signal.SIGKILL, None)
    else:
        assert (outcome.exit_code, outcome.signal) == (None, signal.SIGKILL)
    assert read_status(spec.job_dir) is None  # it never got to write one


async def test_wait_is_cancellable(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("hold")
        await h.ready(spec)
        with trio.move_on_after(0.3) as scope:
            await h.executor.wait(handle)
        assert scope.cancelled_caught
        assert h.pids(spec.job_id)  # cancelling the wait does not stop the job
        await h.executor.stop(handle, GRACE)
        assert await h.gone(spec.job_id)


def _pidfds() -> int:
    """How many pidfds this (the test's, the daemon's) process holds."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    return n


@pytest.mark.parametrize("kind", [ProcessHarness, ProcessForkHarness])
async def test_a_job_left_running_holds_no_descriptor(kind: type[ProcessHarness]) -> None:
    """A daemon that stops leaves its busy jobs running for the next one to adopt, so
    the process executor is dropped with children it never waited for. It keeps no
    pidfd for them (a wait opens its own and closes it, even when cancelled): a kept one
    leaked, and its GC, at some later moment, warned (a ResourceWarning that failed
    an unrelated test in CI)."""
    if os.geteuid() != 0:
        pytest.skip("runs jobs as the job user 'nobody': needs root (CI runs as root)")
    base = Path(tempfile.mkdtemp(prefix="gpud-contract-", dir="/tmp"))
    os.chmod(base, 0o755)
    h = kind(base)
    try:
        before = _pidfds()
        with trio.fail_after(60):
            spec, handle = await h.launch("hold")
            await h.ready(spec)
            assert _pidfds() == before  # launched: none kept
            with trio.move_on_after(0.3) as scope:
                await h.executor.wait(handle)
            assert scope.cancelled_caught
            assert _pidfds() == before  # a cancelled wait leaves none behind
            assert h.pids(spec.job_id)  # and the job runs on
            # The executor itself dropped with the job running (its daemon stopped): no
            # warning at its collection, and the job runs on, to be reaped once it ends.
            other = h._new()
            spec2 = h.spec("hold")
            h.script(other, spec2, "hold")
            left = await other.launch(spec2)
            await h.ready(spec2)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                del other
                gc.collect()
            assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
            assert h.pids(spec2.job_id)
            assert reap_detached() >= 1
            os.killpg(left.pid, signal.SIGKILL)
            assert await eventually(lambda: reap_detached() == 0, 10)
    finally:
        await h.finish()
        shutil.rmtree(base, ignore_errors=True)
    assert _pidfds() == before


# -- stop and reap ------------------------------------------------------------------------


async def test_stop_ends_a_job_that_obeys_sigterm_without_waiting_the_grace(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("hold_with_child")
        await h.ready(spec)
        start = trio.current_time()
        assert await h.executor.stop(handle, 30.0) is False  # ended by the TERM (#14)
        assert trio.current_time() - start < 20
        assert await h.gone(spec.job_id)  # its child too


async def test_stop_kills_a_job_that_ignores_sigterm_after_the_grace(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("ignore_term")
        await h.ready(spec)
        start = trio.current_time()
        assert await h.executor.stop(handle, GRACE) is True  # took the KILL (#14)
        took = trio.current_time() - start
        assert GRACE * 0.9 <= took < GRACE + 20
        assert await h.gone(spec.job_id)


async def test_reap_kills_what_the_job_left_running(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("leave_child")
        assert (await h.executor.wait(handle)).exit_code == 0
        await trio.to_thread.run_sync(h.executor.reap, handle)
        assert await h.gone(spec.job_id)
        h.executor.reap(handle)  # again: nothing left, and no error


# -- which processes are whose -------------------------------------------------------------


async def test_job_for_pid_knows_the_jobs_processes(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("hold_with_child")
        other_spec, other = await h.launch("hold")
        await h.ready(spec)
        await h.ready(other_spec)
        assert await eventually(lambda: len(h.pids(spec.job_id)) >= 2, 20)  # leader, child
    handles = [other, handle]
    for pid in h.pids(spec.job_id):
        assert h.executor.job_for_pid(pid, handles) == spec.job_id
    assert h.executor.job_for_pid(os.getpid(), handles) is None
    assert h.executor.job_for_pid(handle.pid, []) is None


# -- after a restart -----------------------------------------------------------------------


async def test_a_new_executor_adopts_a_running_job(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("hold")
        await h.ready(spec)
        again = await h.restart()
        adopted = await trio.to_thread.run_sync(again.adopt, running(spec, handle))
        assert adopted is not None and adopted.adopted
        assert (adopted.job_id, adopted.pid) == (spec.job_id, handle.pid)
        h.handles.append((again, adopted))
        # It can be waited for, though it is not the new object's child...
        async with trio.open_nursery() as n:
            n.start_soon(again.wait, adopted)
            await trio.sleep(0.2)
            h.kill(adopted, signal.SIGTERM)
        await trio.to_thread.run_sync(again.reap, adopted)
        assert await h.gone(spec.job_id)


async def test_a_new_executor_adopts_a_job_whose_pid_was_never_recorded(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("hold")
        await h.ready(spec)
        again = await h.restart()
        job = running(spec, None, JobState.STARTING)
        adopted = await trio.to_thread.run_sync(again.adopt, job)
        assert adopted is not None and adopted.pid == handle.pid
        h.handles.append((again, adopted))
        # ...and stopped.
        await again.stop(adopted, GRACE)
        assert await h.gone(spec.job_id)


async def test_adopt_says_none_for_a_job_that_is_gone(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("ok")
        await h.executor.wait(handle)
        await trio.to_thread.run_sync(h.executor.reap, handle)
        again = await h.restart()
        assert await trio.to_thread.run_sync(again.adopt, running(spec, handle)) is None
        never = h.spec("ok")  # prepared, never launched
        job = running(never, None, JobState.STARTING)
        assert await trio.to_thread.run_sync(again.adopt, job) is None


async def test_cleanup_leaves_the_active_jobs_alone(h: Harness) -> None:
    with trio.fail_after(60):
        spec, handle = await h.launch("hold")
        listed_by_pid, by_pid = await h.launch("hold")
        await h.ready(spec)
        await h.ready(listed_by_pid)
        again = await h.restart()
        # Active by id, or (a warm worker running another job) by its recorded pid.
        await trio.to_thread.run_sync(again.cleanup, {spec.job_id}, [by_pid.pid])
        assert h.pids(spec.job_id) and h.pids(listed_by_pid.job_id)
        job = running(spec, handle)
        assert await trio.to_thread.run_sync(again.adopt, job) is not None


# -- capabilities() itself -----------------------------------------------------------------


class _Declares(FakeExecutor):
    supports_snapshots = True  # without checkpoint, restore, ...


class _Flagged(FakeExecutor):
    supports_warm = "yes"  # type: ignore[assignment]


class _OwnPython(FakeExecutor):
    supports_job_python = True  # without resolve_python


def test_per_job_interpreters_are_a_declared_capability() -> None:
    """Whether a submit's python= is checked by the executor (#11) is a capability, no
    longer ``isinstance(executor, ProcessExecutor)`` (#12)."""
    with pytest.raises(TypeError, match="declares supports_job_python but lacks .*resolve_python"):
        capabilities(_OwnPython())
    assert not capabilities(FakeExecutor()).job_python


def test_capabilities_refuses_a_promise_without_its_methods() -> None:
    with pytest.raises(TypeError, match="declares supports_snapshots but lacks .*checkpoint"):
        capabilities(_Declares())
    with pytest.raises(TypeError, match="must be True or False"):
        capabilities(_Flagged())
    with pytest.raises(TypeError, match="is not an executor: it lacks .*launch"):
        capabilities(object())
