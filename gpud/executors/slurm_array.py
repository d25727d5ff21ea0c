"""A ``.map`` as one Slurm job array (#15): the launches of one batch, gathered.

The scheduling round starts a batch's jobs side by side and tells the executor which
(:meth:`ArrayGatherer.expect`); each job's supervisor then prepares its directory and calls
``launch``. The first launch of a batch waits for the others of the round; when all have
come (or none came for ``QUIET`` s: one was cancelled, or failed to prepare), one
``sbatch --array=0-N[%limit]`` submits them all. Task ``i`` runs the ``i``-th job's own
script (written as for a single job), through a dispatcher script in the first job's
directory.

Each member's directory gets ``slurm-task`` (the array's job name, its index and its
attempt) before ``sbatch`` runs, so a daemon restarted before the array's id reached the
ledger finds the member's task again by the array's name (:func:`find_task`).
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gpud.executors.base import ExecutorRefusal, Handle, LaunchSpec
from gpud.identity import JobIdentity
from gpud.safefs import write_new

__all__ = ["TASK_FILE", "ArrayGatherer", "Member", "array_script", "read_task"]

#: seconds without a new launch of the batch after which the array is submitted with the
#: members it has (the others were cancelled or failed before launching)
QUIET = 1.0
#: a member's record of its array: "NAME INDEX ATTEMPT"
TASK_FILE = "slurm-task"


@dataclass(slots=True)
class Member:
    spec: LaunchSpec
    ident: JobIdentity
    python: str


@dataclass(slots=True)
class _Gathering:
    batch: int
    limit: int | None
    members: list[Member] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    handles: dict[int, Handle] = field(default_factory=dict)
    error: Exception | None = None


def array_script(scripts: Sequence[Path]) -> str:
    """The array's batch script: task i runs member i's own script."""
    lines = [
        "#!/bin/sh",
        "# written by gpud: one job array, a task per job",
        "case $SLURM_ARRAY_TASK_ID in",
    ]
    lines += [f"{i}) exec /bin/sh {shlex.quote(str(s))} ;;" for i, s in enumerate(scripts)]
    lines += ["esac", 'echo "gpud: no job for array task $SLURM_ARRAY_TASK_ID" >&2', "exit 3"]
    return "\n".join(lines) + "\n"


def read_task(job_dir: Path) -> tuple[str, int, int] | None:
    """(array name, index, attempt) from a member's ``slurm-task``; None if not one."""
    try:
        name, index, attempt = (job_dir / TASK_FILE).read_text().split()
        return name, int(index), int(attempt)
    except (OSError, ValueError):
        return None


#: submits the gathered members as one array: (members, array limit) -> handles by job id
Submit = Callable[[Sequence[Member], "int | None"], Awaitable[dict[int, Handle]]]


class ArrayGatherer:
    def __init__(self) -> None:
        #: job id -> (batch id, its max_concurrency) of the jobs the round is starting
        self._expected: dict[int, tuple[int, int | None]] = {}
        #: batch id -> its jobs expected and not yet launched
        self._due: dict[int, set[int]] = {}
        self._open: dict[tuple[int, int, tuple[str, ...]], _Gathering] = {}
        self.arrays = 0  # how many arrays were submitted (tests, bench)

    def expect(self, jobs: Mapping[int, tuple[int, int | None]]) -> None:
        """The round is starting these batch jobs: job id -> (batch id, limit)."""
        for job_id, (batch, limit) in jobs.items():
            self._expected[job_id] = (batch, limit)
            self._due.setdefault(batch, set()).add(job_id)

    def expects(self, job_id: int) -> bool:
        return job_id in self._expected

    async def launch(self, member: Member, args: tuple[str, ...], submit: Submit) -> Handle:
        """Launch one expected member as part of its batch's array."""
        job_id = member.spec.job_id
        batch, limit = self._expected.pop(job_id)
        due = self._due.get(batch, set())
        due.discard(job_id)
        key = (batch, member.ident.uid, args)
        g = self._open.get(key)
        if g is None:
            g = self._open[key] = _Gathering(batch, limit)
            g.members.append(member)
            await self._lead(key, g, submit)
        else:
            g.members.append(member)
            g.changed.set()
            await g.done.wait()
        if g.error is not None:
            raise g.error
        handle = g.handles.get(job_id)
        if handle is None:
            raise ExecutorRefusal(f"job {job_id} was not part of the array Slurm accepted")
        return handle

    async def _lead(
        self, key: tuple[int, int, tuple[str, ...]], g: _Gathering, submit: Submit
    ) -> None:
        """The first member of a gathering waits for the rest, then submits for all."""
        try:
            while self._due.get(g.batch):
                g.changed = trio.Event()
                with trio.move_on_after(QUIET) as quiet:
                    await g.changed.wait()
                if quiet.cancelled_caught:
                    # The rest never came: they launch on their own, if ever.
                    for job_id in self._due.pop(g.batch, set()):
                        self._expected.pop(job_id, None)
                    break
            self._due.pop(g.batch, None)
            del self._open[key]  # later launches of the batch gather anew
            self.arrays += len(g.members) > 1
            g.handles = await submit(list(g.members), g.limit)
        except Exception as e:  # noqa: BLE001 - every member fails with the submit's error
            self._open.pop(key, None)
            g.error = e
        finally:
            g.done.set()


def write_task_files(members: Sequence[Member], name: str) -> None:
    for i, m in enumerate(members):
        write_new(
            m.spec.job_dir / TASK_FILE,
            f"{name} {i} {m.spec.attempt}\n".encode(),
            (m.ident.uid, m.ident.gid),
            0o600,
        )
