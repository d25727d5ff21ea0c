"""The Slurm executor (#15): each cold job is a Slurm batch job running gpud's worker runtime.

The daemon runs where ``sbatch`` works (a login node, or the box itself). A job's
directory, with its payload, log and result, lives under ``slurm_shared_dir``, which every
node mounts, so the worker writes its result and status.json where the daemon reads them,
exactly as for the process executor: those files, not Slurm's state, say whether the job
succeeded. Slurm's state says when it ended, and how where the worker could not say
(TIMEOUT, OUT_OF_MEMORY, NODE_FAIL...).

* Jobs run as their submitter: a root daemon runs ``sbatch`` itself as the job's user
  (through setpriv, as the process executor starts workers), never as root.
* The Slurm job id is the handle's ``pid`` (and so the ledger's): a restarted daemon
  re-adopts by it; a job launched but never recorded is found by its job name, which
  carries the daemon instance, the job and the attempt.
* State is polled in bulk: one ``squeue`` for every job being waited on, every
  ``POLL_INTERVAL`` s, however many jobs wait (:class:`_Poller`).
* A ``.map``'s jobs started in one round are one job array (:mod:`gpud.executors.slurm_array`),
  with the batch's ``max_concurrency`` as ``%N``; a task is named by (array id, index), the
  handle's ``pid`` and ``pid_start - 1``.
* No warm workers: each call is its own batch job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from gpud.config import Config
from gpud.domain import Job, JobState
from gpud.executors.base import ExecutorRefusal, Handle, LaunchSpec, Outcome
from gpud.executors.process import (
    ProcessExecutor,
    find_job_processes,
    job_environment,
    switch_user_command,
)
from gpud.executors.slurm_array import (
    ArrayGatherer,
    Member,
    array_script,
    read_task,
    write_task_files,
)
from gpud.identity import JobIdentity
from gpud.safefs import write_new
from gpud_client.jobdir import worker_command

__all__ = [
    "FINAL_STATES",
    "Key",
    "SlurmError",
    "SlurmExecutor",
    "SlurmSettings",
    "SlurmState",
    "check_shared_dir",
    "gpu_uuid",
    "job_name",
    "parse_squeue",
    "pending_text",
    "query_states",
    "slurm_executor",
]

log = logging.getLogger("gpud")

POLL_INTERVAL = 0.5
#: states after which the job runs no more
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "TIMEOUT",
        "CANCELLED",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
    }
)
#: polls in a row that must miss a job before it counts as gone (it has left squeue)
_MISSES = 3
_CMD_TIMEOUT = 30.0
#: a Slurm job as gpud waits on it: (job id, -1), or (array job id, task index)
Key = tuple[int, int]


def key_of(handle_or_job: Handle | Job) -> Key | None:
    """The Slurm job of a handle (or of a job as the ledger records it)."""
    sid, task = handle_or_job.pid, handle_or_job.pid_start
    if sid is None:
        return None
    return (int(sid), int(task) - 1 if task else -1)


def key_text(key: Key) -> str:
    """As scancel and squeue -j take it: "17", or "17_3" for an array task."""
    return str(key[0]) if key[1] < 0 else f"{key[0]}_{key[1]}"


class SlurmError(RuntimeError):
    """A Slurm command failed; the message is Slurm's."""


@dataclass(frozen=True, slots=True)
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra_args: tuple[str, ...] = ()
    #: gpud GPU type -> the cluster's GRES type
    gpu_types: tuple[tuple[str, str], ...] = ()
    poll_interval: float = POLL_INTERVAL


@dataclass(frozen=True, slots=True)
class SlurmState:
    state: str  # COMPLETED, PENDING, RUNNING... (a "CANCELLED by 0" is "CANCELLED")
    reason: str  # Slurm's reason: Resources, Priority, QOSMaxGRESPerUser, None...
    exit_code: int | None  # the batch script's wait status, as squeue's exit_code says it

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def gpu_uuid(node: str, gres_type: str, index: int) -> str:
    """The name a cluster GPU gets in gpud's inventory: its node, GRES type and index."""
    return f"SLURM:{node}:{gres_type}:{index}"


def gres_type_of(uuid: str) -> str | None:
    parts = uuid.split(":")
    return parts[-2] if len(parts) >= 4 and parts[0] == "SLURM" else None


def job_name(instance: str, job_id: int, attempt: int) -> str:
    """The Slurm job name of one attempt: how an unrecorded launch is found again."""
    return f"gpud-{instance[:12]}-{job_id}-{attempt}"


def _run(cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=_CMD_TIMEOUT, env=env, check=False
    )


#: squeue's fields, one task per line with -r: an array's pending tasks are listed one by one
SQUEUE_FIELDS = "ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,exit_code:|"


def parse_squeue(text: str) -> dict[Key, SlurmState]:
    """``squeue -h -r -O ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,exit_code:|`` lines ->
    states by (job id, -1) for a plain job (its task id is "N/A"), (array id, index) for a
    task of an array."""
    out: dict[Key, SlurmState] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 5 or not parts[0].isdigit():
            continue
        task = int(parts[1]) if parts[1].isdigit() else -1
        code = parts[4]
        out[(int(parts[0]), task)] = SlurmState(
            state=parts[2].split()[0] if parts[2] else "UNKNOWN",
            reason=parts[3],
            exit_code=int(code) if code.lstrip("-").isdigit() else None,
        )
    return out


def query_states(ids: Collection[int]) -> dict[Key, SlurmState]:
    """One squeue for all of ``ids`` (job or array ids; finished ones too, while Slurm keeps
    them), every array task on its own."""
    if not ids:
        return {}
    cmd = ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(str(i) for i in sorted(ids))]
    out = _run([*cmd, "-O", SQUEUE_FIELDS])
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return {}  # squeue fails so only when none of them is known any more
        raise SlurmError(f"squeue failed: {out.stderr.strip() or out.returncode}")
    return parse_squeue(out.stdout)


def outcome_of(st: SlurmState | None, memory: int | None = None) -> Outcome:
    """What the daemon is told of a job's end; status.json, where the worker wrote one,
    decides success or failure, so this matters where it did not."""
    if st is None:
        return Outcome(exit_code=None)  # gone from squeue: the files say what happened
    if st.state == "OUT_OF_MEMORY":
        return Outcome(exit_code=None, oom_killed=True, memory_limit=memory)
    if st.state in ("TIMEOUT", "DEADLINE"):
        return Outcome(exit_code=None, signal=signal.SIGKILL)
    if st.state == "CANCELLED":
        return Outcome(exit_code=None, signal=signal.SIGTERM)
    if st.state in ("COMPLETED", "FAILED") and st.exit_code is not None:
        status = st.exit_code
        if status & 0x7F:
            return Outcome(exit_code=None, signal=status & 0x7F)
        return Outcome(exit_code=(status >> 8) & 0xFF)
    if st.state in ("NODE_FAIL", "PREEMPTED", "BOOT_FAIL"):
        # Lost, through no fault of its own: retried by gpud's policy.
        return Outcome(exit_code=None, lost=f"Slurm reports {st.state} ({st.reason})")
    return Outcome(exit_code=None)


#: Slurm's commonest pending reasons, in words (`gpud ps`); others are shown as Slurm says them
PENDING_WORDS = {
    "Resources": "waiting for resources",
    "Priority": "other jobs come first",
    "Dependency": "waiting for a dependency",
    "BeginTime": "waiting for its start time",
    "JobHeldUser": "held by its user",
    "JobHeldAdmin": "held by an admin",
    "ReqNodeNotAvail": "the nodes it needs are unavailable",
    "PartitionDown": "its partition is down",
    "QOSMaxGRESPerUser": "the QOS's per-user GPU limit is reached",
    "QOSMaxCpuPerUserLimit": "the QOS's per-user CPU limit is reached",
    "QOSMaxJobsPerUserLimit": "the QOS's per-user job limit is reached",
    "AssocGrpGRES": "the account's GPU limit is reached",
    "AssocMaxJobsLimit": "the account's job limit is reached",
}


def pending_text(reason: str) -> str:
    """``gpud ps``'s words for a job Slurm holds pending: "pending in Slurm: waiting for
    resources (Resources)"."""
    words = PENDING_WORDS.get(reason)
    return f"pending in Slurm: {words} ({reason})" if words else f"pending in Slurm: {reason}"


class _Poller:
    """One squeue for every job being waited on: a waiter that finds no poll under way
    makes the next one, for all; the others wait for its answer."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.watched: dict[Key, int] = {}  # slurm job or task -> waiters
        self.states: dict[Key, SlurmState] = {}
        self.misses: dict[Key, int] = {}
        #: time.monotonic() when the last poll began: not trio's clock, whose origin is
        #: each run's own (an executor may outlive a trio run, as in the contract tests)
        self.polled_at = -math.inf
        self.polls = 0
        self._busy: trio.Event | None = None

    async def next_state(self, sid: Key, after: float) -> tuple[SlurmState | None, int]:
        """The job's state from a poll begun after ``after``, and its misses in a row."""
        while self.polled_at <= after:
            if self._busy is not None:
                await self._busy.wait()
                continue
            self._busy = trio.Event()
            try:
                await trio.sleep(max(0.0, self.polled_at + self.interval - time.monotonic()))
                ids = list(self.watched)
                began = time.monotonic()
                try:
                    found = await trio.to_thread.run_sync(query_states, {k[0] for k in ids})
                except (SlurmError, OSError, subprocess.SubprocessError) as e:
                    log.warning("polling Slurm: %s", e)
                    found = None
                self.polls += 1
                if found is not None:
                    for i in ids:
                        if i in found:
                            self.states[i] = found[i]
                            self.misses[i] = 0
                        else:
                            self.misses[i] = self.misses.get(i, 0) + 1
                self.polled_at = began
            finally:
                busy, self._busy = self._busy, None
                busy.set()
        return self.states.get(sid), self.misses.get(sid, 0)

    def watch(self, sid: Key) -> None:
        self.watched[sid] = self.watched.get(sid, 0) + 1

    def unwatch(self, sid: Key) -> None:
        n = self.watched.get(sid, 0) - 1
        if n > 0:
            self.watched[sid] = n
            return
        self.watched.pop(sid, None)
        self.states.pop(sid, None)
        self.misses.pop(sid, None)


def check_shared_dir(path: Path) -> None:
    """Start-up: the shared directory must exist (it is made if its parent does) and be
    writable, else every job would fail; say so once, here."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".gpud-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ExecutorRefusal(
            f"slurm_shared_dir = {path} is not writable by the daemon ({e.strerror or e}): "
            "point it at a directory every Slurm node mounts and the daemon can write"
        ) from None


class SlurmExecutor(ProcessExecutor):
    """Jobs as Slurm batch jobs. Interpreters are found and checked as for the process
    executor (the shared directory and the nodes are expected to see the same paths)."""

    name = "slurm"
    supports_warm = False
    supports_job_python = True
    reap_is_a_signal = False  # scancel: in a worker thread

    supports_arrays = True

    def __init__(
        self, *, settings: SlurmSettings, jobs_dir: Path | None = None, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]  # ProcessExecutor's own keywords, passed through
        self.settings = settings
        self._gres = dict(settings.gpu_types)
        self.poller = _Poller(settings.poll_interval)
        #: jobs until_started saw begin, still watched for the wait() that follows it
        self._started: set[Key] = set()
        self.arrays = ArrayGatherer()
        #: where job directories are (a restarted daemon finds an array member's task there)
        self.jobs_dir = jobs_dir
        self._memory: dict[Key, int | None] = {}  # slurm job -> memory limit, for OOM text
        self.sbatch_env = {
            k: v for k, v in os.environ.items() if k.startswith("SLURM_CONF") or k == "PATH"
        }

    async def start(self) -> None:
        out = await trio.to_thread.run_sync(_run, ["sinfo", "-h", "-o", "%P"])
        if out.returncode != 0:
            raise ExecutorRefusal(
                f'executor = "slurm" but sinfo fails: {out.stderr.strip()}: run the daemon '
                "where sbatch works (SLURM_CONF set, munge running)"
            )

    async def python_for(self, image: str | None) -> tuple[str, str]:
        if image:
            raise ExecutorRefusal(
                f"image={image!r} needs the Podman executor; this daemon submits to Slurm: "
                "drop image="
            )
        return "", self.version

    def job_for_pid(self, pid: int, handles: Iterable[Handle]) -> int | None:
        """A job's process on this machine (a node of the cluster, as on a single-node
        one), by the marks in its environment; None for other nodes' and others'."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(e.partition(b"=")[::2] for e in fh.read().split(b"\0") if e)
        except OSError:
            return None
        if env.get(b"GPUD_INSTANCE") != self.instance.encode():
            return None
        raw = env.get(b"GPUD_JOB_ID", b"")
        job_id = int(raw) if raw.isdigit() else None
        return job_id if any(h.job_id == job_id for h in handles) else None

    def cleanup(self, active: set[int], pids: Collection[int] = ()) -> None:
        return None

    # -- launch -----------------------------------------------------------------------------

    def resource_args(self, spec: LaunchSpec) -> tuple[str, ...]:
        """The sbatch options every task of an array shares: resources and settings."""
        s = self.settings
        args = ["--export=NONE", "--ntasks=1"]  # the script sets the job's whole environment
        if spec.gpus:
            types = {gres_type_of(u) for u in spec.gpus}
            gres = types.pop() if len(types) == 1 else None
            args.append(
                f"--gres=gpu:{gres}:{len(spec.gpus)}" if gres else f"--gres=gpu:{len(spec.gpus)}"
            )
        if spec.timeout is not None:
            # gpud's own timer ends the job (TERM, grace, KILL), counted from when Slurm
            # starts it; Slurm's whole minutes are a backstop for a daemon that is down.
            args.append(f"--time={math.ceil(spec.timeout / 60) + 1}")
        if spec.memory:
            args.append(f"--mem={max(1, math.ceil(spec.memory / 2**20))}M")
        if spec.cpus:
            args.append(f"--cpus-per-task={max(1, math.ceil(spec.cpus))}")
        for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
            if value:
                args.append(f"--{flag}={value}")
        return (*args, *s.extra_args)

    def sbatch_args(self, spec: LaunchSpec, name: str) -> list[str]:
        """The sbatch options of one job: resources from the job, the rest from settings."""
        return [
            "--parsable",
            f"--job-name={name}",
            f"--output={spec.log_path}",
            "--open-mode=append",
            f"--chdir={spec.job_dir}",
            *self.resource_args(spec),
        ]

    def script(
        self, spec: LaunchSpec, ident: JobIdentity, python: str, *, log: bool = False
    ) -> str:
        env = job_environment(spec, ident, self.instance)
        # Slurm says which GPUs the job got (CUDA_VISIBLE_DEVICES by index on the node).
        for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
            env.pop(k, None)
        lines = ["#!/bin/sh", "# written by gpud: one attempt of one job"]
        if log:
            # An array task: Slurm's --output names one pattern for all; each job its own log.
            lines.append(f"cd {shlex.quote(str(spec.job_dir))} || exit 1")
            lines.append(f"exec >>{shlex.quote(str(spec.log_path))} 2>&1")
        lines += [
            f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k.isidentifier()
        ]
        cmd = worker_command(python, self.runtime_dir, spec.job_dir)
        lines.append("exec " + " ".join(shlex.quote(c) for c in cmd))
        return "\n".join(lines) + "\n"

    def expect(self, jobs: dict[int, tuple[int, int | None]]) -> None:
        """The scheduling round is starting these jobs of batches: job id -> (batch id,
        max_concurrency); their launches are gathered into one array per batch."""
        self.arrays.expect(jobs)

    async def launch(self, spec: LaunchSpec) -> Handle:
        if spec.serve is not None:
            raise ExecutorRefusal("the Slurm executor keeps no warm workers")
        ident = spec.identity or self.identity
        if ident.uid == 0:
            raise ExecutorRefusal(
                "jobs never run as root: the Slurm executor will not submit as root"
            )
        if ident.switch and self.setpriv is None:
            raise ExecutorRefusal("the Slurm executor on a root daemon needs setpriv (util-linux)")
        python = (
            spec.python_env.path
            if spec.python_env is not None
            else await self.interpreter_for(ident)
        )
        member = Member(spec, ident, python)
        if self.arrays.expects(spec.job_id):
            return await self.arrays.launch(member, self.resource_args(spec), self._submit)
        return (await self._submit([member], None))[spec.job_id]

    async def _submit(self, members: Sequence[Member], limit: int | None) -> dict[int, Handle]:
        """One sbatch: a plain job for one member, an array for more."""
        first = members[0]
        spec, ident = first.spec, first.ident
        name = job_name(self.instance, spec.job_id, spec.attempt)
        if len(members) == 1:
            script = spec.job_dir / "slurm.sh"
            body = self.script(spec, ident, first.python)
            write_new(script, body.encode(), (ident.uid, ident.gid), 0o700)
            args = self.sbatch_args(spec, name)
        else:
            name += f"-x{len(members)}"
            scripts = []
            for m in members:
                scripts.append(m.spec.job_dir / "slurm.sh")
                body = self.script(m.spec, m.ident, m.python, log=True)
                write_new(scripts[-1], body.encode(), (ident.uid, ident.gid), 0o700)
            # Recorded before sbatch: a restart before the ledger has the array's id finds
            # each member by the array's name and its index.
            write_task_files(members, name)
            script = spec.job_dir / "slurm-array.sh"
            write_new(script, array_script(scripts).encode(), (ident.uid, ident.gid), 0o700)
            top = f"{len(members) - 1}" + (f"%{limit}" if limit else "")
            args = [
                "--parsable",
                f"--job-name={name}",
                f"--array=0-{top}",
                # Slurm's own words (a time limit...) per task; the jobs log to their own.
                f"--output={spec.job_dir / 'slurm-%a.out'}",
                f"--chdir={spec.job_dir}",
                *self.resource_args(spec),
            ]
        cmd = ["sbatch", *args, str(script)]
        if ident.switch:
            assert self.setpriv is not None  # checked in launch
            cmd = switch_user_command(self.setpriv, ident, cmd)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **self.sbatch_env, "HOME": ident.home}
        out = await trio.to_thread.run_sync(lambda: _run(cmd, env))
        sid_text = out.stdout.strip().split(";")[0]
        if out.returncode != 0 or not sid_text.isdigit():
            raise ExecutorRefusal(
                f"sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}"
            )
        sid = int(sid_text)
        handles: dict[int, Handle] = {}
        if len(members) == 1:
            self._memory[(sid, -1)] = spec.memory
            log.info("job %s attempt %s is Slurm job %s", spec.job_id, spec.attempt, sid)
            return {spec.job_id: Handle(job_id=spec.job_id, pid=sid, pid_start=0)}
        for i, m in enumerate(members):
            self._memory[(sid, i)] = m.spec.memory
            handles[m.spec.job_id] = Handle(job_id=m.spec.job_id, pid=sid, pid_start=i + 1)
        log.info(
            "jobs %s-%s (%d) are Slurm job array %s",
            members[0].spec.job_id,
            members[-1].spec.job_id,
            len(members),
            sid,
        )
        return handles

    # -- wait, stop ---------------------------------------------------------------------------

    async def wait(self, handle: Handle) -> Outcome:
        sid = key_of(handle)
        assert sid is not None
        if sid in self._started:
            # until_started left it watched, with the state it saw: a short job may be
            # over already, and waiting for a poll after now would add one (#15: it did,
            # 1.0 s -> 2.0 s a .remote()).
            self._started.discard(sid)
            after = -math.inf
        else:
            self.poller.watch(sid)
            after = time.monotonic()
        try:
            while True:
                st, misses = await self.poller.next_state(sid, after)
                after = self.poller.polled_at
                if st is not None and st.final:
                    return outcome_of(st, self._memory.pop(sid, None))
                if st is None and misses >= _MISSES:
                    return outcome_of(None)
        finally:
            self.poller.unwatch(sid)

    async def until_started(self, handle: Handle) -> bool:
        """Return once Slurm has started the job (or ended it, or lost sight of it): its
        timeout counts from then, not from its submit (#15). True if it was seen pending
        (it starts now), False if it was past that at the first look. Cancellable."""
        sid = key_of(handle)
        assert sid is not None
        self.poller.watch(sid)
        pended = False
        try:
            after = -math.inf  # the last poll's answer will do
            while True:
                st, misses = await self.poller.next_state(sid, after)
                after = self.poller.polled_at
                if (st is not None and st.state != "PENDING") or misses >= _MISSES:
                    # Still watched, for the wait() that follows: it starts from this state.
                    self._started.add(sid)
                    return pended
                pended = pended or st is not None
        except BaseException:
            self.poller.unwatch(sid)
            raise

    def held_note(self, job: Job) -> str | None:
        """Why Slurm has not started a job gpud has submitted, from the last poll (no
        squeue of its own); None once it runs."""
        sid = key_of(job)
        st = self.poller.states.get(sid) if sid is not None else None
        if st is None or st.state != "PENDING":
            return None
        return pending_text(st.reason)

    def state_of(self, sid: int, task: int = -1) -> SlurmState | None:
        """The job's state now, from one squeue of its own (tests, `adopt`)."""
        return query_states([sid]).get((sid, task))

    async def stop(self, handle: Handle, grace: float) -> bool:
        sid = key_of(handle)
        assert sid is not None
        await trio.to_thread.run_sync(_run, ["scancel", "--full", "--signal=TERM", key_text(sid)])
        with trio.move_on_after(grace):
            await self.wait(handle)
            return False
        # scancel without a signal: Slurm's TERM, KillWait, then KILL of the whole job.
        await trio.to_thread.run_sync(_run, ["scancel", key_text(sid)])
        with trio.move_on_after(60):
            await self.wait(handle)
        return True

    async def send_signal(self, handle: Handle, sig: int) -> bool:
        sid = key_of(handle)
        assert sid is not None
        out = await trio.to_thread.run_sync(
            _run, ["scancel", "--batch", f"--signal={int(sig)}", key_text(sid)]
        )
        return out.returncode == 0

    def reap(self, handle: Handle) -> None:
        # Ends whatever is left of it; Slurm ignores this for a job that is over.
        sid = key_of(handle)
        try:
            if sid is not None:
                _run(["scancel", key_text(sid)])
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("scancel %s: %s", handle.pid, e)
        # A process the job left that escaped Slurm's tracking (proctrack/linuxproc loses a
        # child whose parent exited; proctrack/cgroup does not): on this machine, by the
        # marks in its environment. Other nodes are Slurm's to clean.
        for pid in find_job_processes(handle.job_id, self.instance):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def adopt(self, job: Job) -> Handle | None:
        sid = key_of(job) if job.state is JobState.RUNNING else None
        if sid is None:
            sid = self._find_launch(job)
        if sid is None:
            return None
        st = self.state_of(*sid)
        if st is None or st.final:
            return None  # over: its directory says how it ended
        return Handle(job_id=job.id, pid=sid[0], pid_start=sid[1] + 1, adopted=True)

    def _find_launch(self, job: Job) -> Key | None:
        """A launch the ledger has no id of: by its job name, or its array's."""
        name, task = job_name(self.instance, job.id, job.attempt), -1
        rec = read_task(self.jobs_dir / str(job.id)) if self.jobs_dir is not None else None
        if rec is not None and rec[2] == job.attempt:
            name, task = rec[0], rec[1]
        out = _run(["squeue", "-h", "-r", "-t", "all", "-n", name, "-O", SQUEUE_FIELDS])
        found = [k for k in parse_squeue(out.stdout) if k[1] == task]
        return max(found) if found else None

    def kill_all(self) -> None:
        return None  # Slurm jobs outlive the daemon by design


def slurm_executor(
    config: Config,
    python: str,
    version: str,
    runtime: Path,
    identity: JobIdentity,
    instance: str,
) -> SlurmExecutor:
    """The Slurm executor as the daemon's config asks for it."""
    return SlurmExecutor(
        settings=SlurmSettings(
            partition=config.slurm_partition,
            account=config.slurm_account,
            qos=config.slurm_qos,
            extra_args=tuple(config.slurm_extra_args),
            gpu_types=tuple(config.slurm_gpu_types.items()),
            # A tighter loop would only load slurmctld: one squeue answers for all jobs.
            poll_interval=max(0.1, config.slurm_poll_interval),
        ),
        jobs_dir=config.jobs_dir,
        python=python,
        version=version,
        runtime_dir=runtime,
        identity=identity,
        instance=instance,
        configured_python=config.python,
        allowed_pythons=config.allowed_pythons,
    )
