"""A fake executor: runs nothing, and lets a test decide what each job does.

Real processes are the rule in gpud's tests. This fake is for driving the daemon's own
logic (retries, timeouts, cancel, recovery after a restart) deterministically: each job
ends when, and how, the test says: an exit code, a result or an error, death by a signal,
a job that ignores SIGTERM, a launch that fails. Time is trio's, so under
``trio.testing.MockClock(autojump_threshold=0)`` a job scripted to run an hour ends at
once, in order. tests/test_executor_contract.py holds it to the same contract as the
process and Podman executors.

Its "processes" live in a :class:`FakeMachine`, not in the executor, as real ones live in
the kernel: a second ``FakeExecutor`` on the same machine (the daemon restarted) adopts
the jobs the first one left running. Fake pids are above Linux's largest (2**22), so they
never name a real process.

A finished job leaves in its directory what the worker runtime would (``status.json``
and ``result.pkl``), so the daemon reads its outcome exactly as it reads a real one's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal as signals
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cloudpickle  # type: ignore[import-untyped]  # ships no hints
import trio

from gpud.domain import Job, JobState
from gpud.executors.base import ExecutorRefusal, Handle, ImageInfo, LaunchSpec, Outcome
from gpud_client.jobdir import EXIT_ERROR, EXIT_OK, RESULT_FILE, STARTED_FILE, STATUS_FILE

__all__ = ["FakeExecutor", "FakeMachine", "FakeProcess", "Script"]

#: Linux pids never exceed 2**22 (pid_max's ceiling): these never collide with real ones.
FIRST_PID = 5_000_000


@dataclass(frozen=True, slots=True)
class Script:
    """What a job does once launched.

    ``after``: seconds (trio time) until it ends by itself; None: it runs until the test
    (:meth:`FakeExecutor.finish`, :meth:`FakeExecutor.kill`) or the daemon (stop) ends it.
    It then ends with ``signal`` if set (no outputs, like a process the OOM killer took),
    else with ``exit_code``, having written ``result`` (ok) or, with ``error``, a failure.
    """

    after: float | None = 0.0
    exit_code: int = EXIT_OK
    result: object = None
    error: str | None = None  # the job raised: "ValueError: bad input"
    signal: int | None = None
    #: what SIGTERM does: "exit" (ends with signal 15) or "ignore" (only SIGKILL ends it)
    on_term: Literal["exit", "ignore"] = "exit"
    #: processes the job starts beside its leader (e.g. a data loader's workers)
    children: int = 0
    #: launch fails with this message (the image vanished, the service went away)
    launch_error: str | None = None


@dataclass(slots=True)
class FakeProcess:
    """One job's leader (and its children), as the fake machine knows it."""

    job_id: int
    attempt: int
    pid: int
    pid_start: int
    job_dir: Path
    script: Script
    ends_at: float | None  # trio time it ends by itself
    children: list[int] = field(default_factory=list)
    outcome: Outcome | None = None  # set once it has ended
    ended: trio.Event = field(default_factory=trio.Event)
    terms: int = 0  # SIGTERMs it got


class FakeMachine:
    """The fake kernel: every fake process, whichever executor object started it."""

    def __init__(self) -> None:
        self._pids = itertools.count(FIRST_PID)
        self._starts = itertools.count(1)
        self.processes: dict[int, FakeProcess] = {}  # leader pid -> process

    def spawn(self, spec: LaunchSpec, script: Script, now: float) -> FakeProcess:
        ends_at = None if script.after is None else now + script.after
        p = FakeProcess(
            job_id=spec.job_id,
            attempt=spec.attempt,
            pid=next(self._pids),
            pid_start=next(self._starts),
            job_dir=spec.job_dir,
            script=script,
            ends_at=ends_at,
        )
        p.children = [next(self._pids) for _ in range(script.children)]
        self.processes[p.pid] = p
        return p

    def live(self, job_id: int | None = None) -> list[FakeProcess]:
        """Processes still running (of one job, or all), as of the last look at the time."""
        return [
            p
            for p in self.processes.values()
            if p.outcome is None and (job_id is None or p.job_id == job_id)
        ]

    def pids_of(self, job_id: int) -> list[int]:
        """Every live pid of a job: its leader's and its children's."""
        out = []
        for p in self.processes.values():
            if p.job_id == job_id:
                if p.outcome is None:
                    out.append(p.pid)
                out += p.children
        return sorted(out)

    def end(self, p: FakeProcess, outcome: Outcome, *, write: bool = True) -> None:
        """The leader exits; what it wrote (if it got that far) is in its directory.
        Its children run on until reaped, as a real job's strays would."""
        if p.outcome is not None:
            return
        if write and outcome.signal is None:
            _write_outputs(p, outcome.exit_code)
        p.outcome = outcome
        p.ended.set()

    def kill_all(self, p: FakeProcess, sig: int = signals.SIGKILL) -> None:
        self.end(p, Outcome(exit_code=None, signal=sig))
        p.children.clear()

    def settle(self, now: float | None) -> None:
        """End every process whose scripted time has come."""
        if now is None:
            return
        for p in list(self.processes.values()):
            if p.outcome is None and p.ends_at is not None and p.ends_at <= now:
                self.end(p, _scripted(p.script))


def _scripted(script: Script) -> Outcome:
    if script.signal is not None:
        return Outcome(exit_code=None, signal=script.signal)
    code = script.exit_code
    if script.error is not None and code == EXIT_OK:
        code = EXIT_ERROR
    return Outcome(exit_code=code)


def _write_outputs(p: FakeProcess, code: int | None) -> None:
    """What the worker runtime writes on its way out: result.pkl, then status.json."""
    if not p.job_dir.is_dir():
        return
    script = p.script
    ok = script.error is None and code == EXIT_OK
    kind, _, message = (script.error or "").partition(": ")
    value: object = script.result if ok else RuntimeError(script.error or f"exit {code}")
    status = {
        "attempt": p.attempt,
        "ok": ok,
        "type": None if ok else (kind or "RuntimeError"),
        "message": None if ok else message or kind,
        "traceback": None,
        "python": ".".join(str(x) for x in sys.version_info[:3]),
    }
    (p.job_dir / RESULT_FILE).write_bytes(cloudpickle.dumps(value))
    (p.job_dir / STATUS_FILE).write_text(json.dumps(status))


def _now() -> float | None:
    """trio's time, from trio or from one of its worker threads (the daemon calls reap,
    adopt and cleanup there); None outside trio altogether."""
    try:
        return trio.current_time()
    except RuntimeError:
        pass
    try:
        return trio.from_thread.run_sync(trio.current_time)
    except RuntimeError:
        return None


class FakeExecutor:
    """An executor (see gpud.executors.base) that runs nothing; a test scripts its jobs.

    Not warm-capable: a warm worker speaks the hub protocol, which a fake would have to
    reimplement; warm paths are tested with real workers.
    """

    name = "fake"

    def __init__(
        self,
        machine: FakeMachine | None = None,
        *,
        python: str = "{}.{}.{}".format(*sys.version_info[:3]),
        images: Iterable[str] = (),
        default: Script | None = None,
    ) -> None:
        self.machine = machine or FakeMachine()
        self.python = python
        self.image_names = sorted(images)
        #: what a job without a plan of its own does
        self.default = default or Script()
        self.plans: dict[int, list[Script]] = {}
        #: every launch, in order (what the daemon asked for)
        self.launched: list[LaunchSpec] = []
        self.stopped: list[tuple[int, float]] = []  # (job id, grace)
        self.cleaned: list[int] = []  # leader pids cleanup() killed
        self.started = False
        self._launch_seen: trio.Event | None = None  # set at the next launch

    # -- what a test says ----------------------------------------------------------------

    def plan(self, job_id: int, *scripts: Script) -> None:
        """What job ``job_id``'s next launches do, one script per attempt (the last one
        repeats)."""
        self.plans[job_id] = list(scripts)

    def process(self, job_id: int) -> FakeProcess:
        """The job's latest process (raises KeyError if it was never launched)."""
        found = [p for p in self.machine.processes.values() if p.job_id == job_id]
        if not found:
            raise KeyError(f"job {job_id} was never launched on this fake machine")
        return max(found, key=lambda p: p.pid)

    def finish(
        self,
        job_id: int,
        *,
        exit_code: int = EXIT_OK,
        result: object = None,
        error: str | None = None,
    ) -> None:
        """End the job now: its worker writes ``result`` (or the failure) and exits."""
        p = self.process(job_id)
        p.script = Script(
            after=0.0, exit_code=exit_code, result=result, error=error, on_term=p.script.on_term
        )
        self.machine.end(p, _scripted(p.script))

    def kill(self, job_id: int, sig: int = signals.SIGKILL) -> None:
        """Kill the job's leader from outside (the OOM killer, an admin): no outputs."""
        self.machine.end(self.process(job_id), Outcome(exit_code=None, signal=sig))

    async def wait_launched(self, job_id: int, count: int = 1) -> LaunchSpec:
        """Wait until job ``job_id`` has been launched ``count`` times; its latest spec."""
        while True:
            specs = [s for s in self.launched if s.job_id == job_id]
            if len(specs) >= count:
                return specs[-1]
            if self._launch_seen is None:
                self._launch_seen = trio.Event()
            await self._launch_seen.wait()

    # -- the executor ----------------------------------------------------------------------

    async def start(self) -> None:
        self.started = True

    async def python_for(self, image: str | None) -> tuple[str, str]:
        if image is None:
            return "", self.python
        if image not in self.image_names:
            raise ExecutorRefusal(
                f"image {image!r} is not one of this fake executor's "
                f"({', '.join(self.image_names) or 'none'})"
            )
        return image, self.python

    async def images(self) -> list[ImageInfo]:
        return [
            ImageInfo(name=n, id=f"fake-{n}", size=0, created=0.0, python=self.python)
            for n in self.image_names
        ]

    def task_dir(self, job_dir: Path) -> str:
        return str(job_dir)

    def job_for_pid(self, pid: int, handles: Iterable[Handle]) -> int | None:
        for h in handles:
            p = self.machine.processes.get(h.pid)
            if pid == h.pid or (p is not None and pid in p.children):
                return h.job_id
        return None

    def cleanup(self, active: set[int], pids: Collection[int] = ()) -> None:
        # As the Podman executor does: what jobs that are over left running goes.
        self.machine.settle(_now())
        for p in self.machine.processes.values():
            if p.job_id in active or p.pid in pids:
                continue
            if p.outcome is None or p.children:
                self.cleaned.append(p.pid)
                self.machine.kill_all(p)

    async def launch(self, spec: LaunchSpec) -> Handle:
        if spec.serve is not None:
            raise ExecutorRefusal("the fake executor keeps no warm workers")
        self.launched.append(spec)
        if self._launch_seen is not None:
            self._launch_seen.set()
            self._launch_seen = None
        scripts = self.plans.get(spec.job_id)
        script = (scripts.pop(0) if len(scripts) > 1 else scripts[0]) if scripts else self.default
        await trio.lowlevel.checkpoint()
        if script.launch_error is not None:
            raise RuntimeError(script.launch_error)
        p = self.machine.spawn(spec, script, trio.current_time())
        with contextlib.suppress(OSError):
            (spec.job_dir / STARTED_FILE).write_text(repr(trio.current_time()))
        return Handle(job_id=spec.job_id, pid=p.pid, pid_start=p.pid_start)

    async def wait(self, handle: Handle) -> Outcome:
        p = self.machine.processes.get(handle.pid)
        if p is None or p.pid_start != handle.pid_start:
            return Outcome(exit_code=None)
        if p.outcome is None and p.ends_at is not None:
            with trio.move_on_at(p.ends_at):
                await p.ended.wait()
            self.machine.settle(trio.current_time())
        await p.ended.wait()
        assert p.outcome is not None
        if handle.adopted:
            # As for a real process that is not our child: its exit status is not ours
            # to read; the daemon takes the outcome from the job directory.
            return Outcome(exit_code=None)
        return p.outcome

    async def stop(self, handle: Handle, grace: float) -> bool:
        self.stopped.append((handle.job_id, grace))
        p = self.machine.processes.get(handle.pid)
        killed = False
        if p is not None and p.outcome is None:
            p.terms += 1
            if p.script.on_term == "exit":
                self.machine.end(p, Outcome(exit_code=None, signal=signals.SIGTERM))
            else:
                killed = True
                with trio.move_on_after(grace):
                    await p.ended.wait()
                    killed = False
        self.reap(handle)
        return killed

    def reap(self, handle: Handle) -> None:
        p = self.machine.processes.get(handle.pid)
        if p is not None:
            self.machine.kill_all(p)

    def adopt(self, job: Job) -> Handle | None:
        self.machine.settle(_now())
        if job.state not in (JobState.STARTING, JobState.RUNNING):
            return None
        for p in self.machine.live(job.id):
            recorded = job.pid is not None and p.pid == job.pid and p.pid_start == job.pid_start
            # Spawned but never recorded (the daemon died in between): found by job and
            # attempt, as the process executor finds it by its environment.
            unrecorded = job.pid is None and p.attempt == job.attempt
            if recorded or unrecorded:
                return Handle(job_id=job.id, pid=p.pid, pid_start=p.pid_start, adopted=True)
        return None

    def kill_all(self) -> None:
        for p in self.machine.live():
            self.machine.kill_all(p)
