"""The job ledger: one SQLite file, one connection, used from one thread.

Durability: WAL with ``synchronous=FULL``, so a transaction is on disk when COMMIT
returns; a submit is acknowledged only after its COMMIT. The daemon's thread may commit a
job's later steps (STARTING, RUNNING, its end) with ``synchronous=NORMAL`` instead
(:meth:`Ledger.set_synced`, #12): those survive a kill -9 of the daemon, and are lost on
a power cut only until the next synced COMMIT. Every state change goes through
:func:`gpud.domain.transition` inside one transaction that also appends to the event log,
so the table and its history cannot disagree.

Group commit (#12): the daemon's :class:`gpud.ledger.LedgerThread` runs the writes queued
at one moment inside one ``BEGIN IMMEDIATE ... COMMIT`` (one fsync), each call in its own
SAVEPOINT. :meth:`Ledger._tx` is what makes a method work both alone (its own
transaction) and inside such a group (a savepoint of the group's transaction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import json
import operator
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpud.domain import (
    FINAL,
    GpuRequest,
    IllegalTransition,
    Job,
    JobState,
    PythonEnv,
    transition,
)
from gpud.ledger.schema import migrate
from gpud.ledger.suspension import SUSPENSION_COLUMNS, on_step
from gpud.ledger.usage import close_attempt, open_attempt

__all__ = [
    "IDEMPOTENCY_TTL",
    "Event",
    "IdempotencyKey",
    "IllegalTransition",
    "KeyReused",
    "Ledger",
    "NewJob",
    "Replay",
    "Step",
    "UnknownJob",
]

#: How long an idempotency key answers with its original jobs (a client retries for
#: minutes at most; a day leaves room for a laptop that slept through a retry).
IDEMPOTENCY_TTL = 24 * 3600.0


class UnknownJob(KeyError):
    def __init__(self, job_id: int, *, removed: bool = False) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        #: the job existed, and retention removed it (#12)
        self.removed = removed

    def __str__(self) -> str:
        if self.removed:
            return (
                f"no job {self.job_id}: it was removed by retention (finished jobs' "
                "records are kept for the daemon's retention_jobs; see `gpud usage` for "
                "what it used)"
            )
        return f"no job {self.job_id}"


def _was_pruned(conn: sqlite3.Connection, job_id: int) -> bool:
    """Is this missing job one that retention removed? Ids are never reused, so a missing
    id at or below the highest one removed was removed (gpud.ledger.retention)."""
    r = conn.execute("SELECT pruned_through FROM retention_state WHERE id = 1").fetchone()
    return r is not None and 0 < job_id <= int(r[0])


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A client's key for one submit, per owner; ``fingerprint`` tells a retry of the same
    submit from another submit that reused the key."""

    owner: str
    key: str
    fingerprint: str


class Replay(Exception):  # noqa: N818 - not an error: the answer to a repeated key
    """The key was seen: these are the jobs its first submit made (nothing was written)."""

    def __init__(self, batch_id: int | None, ids: list[int]) -> None:
        super().__init__(batch_id, ids)
        self.batch_id, self.ids = batch_id, ids


class KeyReused(ValueError):
    """The key was seen with a different submit: a client bug, refused (422)."""


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as submitted, before it has an id."""

    name: str
    owner: str
    function_hash: str
    args: bytes
    python: str
    timeout: float
    gpu: GpuRequest | None = None
    retries: int = 0
    priority: int = 0
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    memory: int | None = None
    cpus: float | None = None
    keep_warm: float = 0.0
    snapshot: bool = False
    python_env: PythonEnv | None = None
    deps: tuple[int, ...] = ()  # #14: checked at submit (they exist, they are the owner's)
    deps_any: bool = False
    notify: str | None = None
    notify_on: tuple[str, ...] = ()
    preemptible: bool = True
    signal_before: float | None = None  # #14: the early warning, seconds before timeout
    signal: str | None = None
    grace: float | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One move of the state machine, with the columns it sets."""

    state: JobState
    reason: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    job_id: int
    at: float
    from_state: JobState | None
    to_state: JobState
    reason: str | None


# Columns a Step may set (besides state); anything else is a programming error.
_SETTABLE = frozenset(
    {
        "gpus",
        "not_before",
        "started_at",
        "ended_at",
        "pid",
        "pid_start",
        "exit_code",
        "error",
        "has_result",
        "start_kind",
        "startup",
        "gpu_types",  # not a column: the types of "gpus", for the accounting rows (#5)
        *SUSPENSION_COLUMNS,
    }
)
_JOB_COLUMNS = (
    "id, name, owner, state, priority, gpu, timeout, retries, attempt, not_before, gpus, "
    "batch_id, python, image, env, function_hash, submitted_at, started_at, ended_at, pid, "
    "pid_start, exit_code, error, has_result, memory, cpus, keep_warm, start_kind, startup, "
    "wall_ds, gpu_ds, snapshot, python_env, deps, deps_any, notify, preemptible, "
    "suspended_at, suspend_reason, suspended_for, suspended_s, signal_before, signal, grace"
)


def _row_to_job(r: sqlite3.Row) -> Job:
    gpu = GpuRequest.parse(json.loads(r["gpu"])) if r["gpu"] else None
    return Job(
        id=r["id"],
        function=r["name"],
        state=JobState(r["state"]),
        submitted_at=r["submitted_at"],
        owner=r["owner"],
        priority=r["priority"],
        gpu=gpu,
        timeout=r["timeout"],
        retries=r["retries"],
        attempt=r["attempt"],
        not_before=r["not_before"],
        gpus=tuple(g for g in r["gpus"].split(",") if g),
        batch_id=r["batch_id"],
        python=r["python"],
        image=r["image"],
        env=json.loads(r["env"]),
        started_at=r["started_at"],
        ended_at=r["ended_at"],
        pid=r["pid"],
        pid_start=r["pid_start"],
        exit_code=r["exit_code"],
        error=r["error"],
        has_result=bool(r["has_result"]),
        code_hash=r["function_hash"],
        memory=r["memory"],
        cpus=r["cpus"],
        keep_warm=r["keep_warm"],
        snapshot=bool(r["snapshot"]),
        start_kind=r["start_kind"],
        startup=r["startup"],
        wall_seconds=r["wall_ds"] / 10,
        gpu_seconds=r["gpu_ds"] / 10,
        python_env=PythonEnv.from_json(json.loads(r["python_env"])) if r["python_env"] else None,
        deps=tuple(int(i) for i in r["deps"].split(",") if i),
        deps_any=bool(r["deps_any"]),
        **_notify_fields(r["notify"]),
        preemptible=bool(r["preemptible"]),
        suspended_at=r["suspended_at"],
        suspend_reason=r["suspend_reason"],
        suspended_for=r["suspended_for"],
        suspended_s=r["suspended_s"],
        signal_before=r["signal_before"],
        signal=r["signal"],
        grace=r["grace"],
    )


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))


def _fields_of(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name) for name in _JOB_FIELDS}


def _copy_with_id(fields: dict[str, Any], job_id: int) -> Job:
    """A Job with these fields but ``job_id``, and an env dict of its own (the other
    fields are immutable: str, numbers, tuples, frozen classes)."""
    return Job(**{**fields, "id": job_id, "env": dict(fields["env"])})


#: NewJob's fields but its args: what makes two of one submit's rows alike (#12)
_ALIKE = operator.attrgetter(*(f.name for f in dataclasses.fields(NewJob) if f.name != "args"))


def all_alike(jobs: Sequence[NewJob]) -> bool:
    """Do these NewJobs differ in their ``args`` only? (About 1 us a job.)"""
    if len(jobs) < 2:
        return True
    key = _ALIKE(jobs[0])
    return all(_ALIKE(j) == key for j in jobs)


def _notify_fields(raw: str | None) -> dict[str, Any]:
    """The notify column: JSON {"url": ..., "on": [...]} (#14)."""
    if not raw:
        return {}
    data = json.loads(raw)
    return {"notify": data["url"], "notify_on": tuple(data["on"])}


def _make_private(path: Path) -> None:
    """The ledger holds every job's payload and env: readable by the daemon's user only.
    SQLite creates the -wal and -shm files with the database file's mode, so creating the
    database 0600 up front covers them; an older ledger is tightened in place."""
    # Never open and close the file once it exists: closing any descriptor of it drops
    # every POSIX lock this process holds on it, SQLite's included, and a connection of
    # another process that then closes believes it is the last one and deletes the -wal
    # and -shm files under a live daemon (its later commits would then be invisible, and
    # lost). Created here only when it does not exist yet (no locks to lose then).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, 0o600)


class Ledger:
    """Synchronous access to the ledger. Not thread-safe by design: one thread owns it
    (the daemon's :class:`gpud.ledger.LedgerThread`; a CLI or a test may own one too)."""

    def __init__(self, path: str | Path, *, query_only: bool = False) -> None:
        """Open (creating and migrating) the ledger. ``query_only``: a connection for
        reads only (LedgerThread.read), on which any write fails."""
        self.path = Path(path)
        self._owner = threading.get_ident()
        _make_private(self.path)
        self.conn = sqlite3.connect(
            str(self.path), isolation_level=None, timeout=10.0, check_same_thread=True
        )
        self.conn.row_factory = sqlite3.Row
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"could not put the ledger {self.path} in WAL mode (got {mode})")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=10000")
        migrate(self.conn)
        if query_only:
            self.conn.execute("PRAGMA query_only=ON")
        # Group commit state, driven by the LedgerThread (see gpud.ledger.thread).
        self._grouping = False  #: a group is being run: _tx joins its transaction
        self._call_savepoint = False  #: the current call's own SAVEPOINT is open
        self._names = itertools.count()
        #: the connection's synchronous level: FULL (True) or NORMAL (False); see synced()
        self._synced = True

    def close(self) -> None:
        self.conn.close()

    # -- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction around the block, rolled back on any error (including
        IllegalTransition), which is raised.

        Alone it is ``BEGIN IMMEDIATE ... COMMIT``. Inside an open transaction (a group,
        or another ``_tx``) it is a SAVEPOINT: an error undoes only this block, and the
        COMMIT (with its fsync) is the group's. In a group the first write opens the
        group's transaction, and the running call's own savepoint, so that a call that
        fails after several writes is undone as a whole.
        """
        if self._grouping:
            if not self.conn.in_transaction:
                self.conn.execute("BEGIN IMMEDIATE")
            if not self._call_savepoint:
                self.conn.execute("SAVEPOINT gpud_call")
                self._call_savepoint = True
        if not self.conn.in_transaction:
            with _Tx(self.conn) as c:
                yield c
            return
        name = f"gpud_tx{next(self._names)}"
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield self.conn
        except BaseException:
            _undo(self.conn, name)
            raise
        self.conn.execute(f"RELEASE {name}")

    @property
    def synced(self) -> bool:
        """Is the next transaction committed with ``synchronous=FULL`` (on disk when its
        COMMIT returns)? Else ``NORMAL``: in the WAL in the page cache, kept across a
        kill -9 of any process, lost on a power cut until a later synced COMMIT (or a
        checkpoint) syncs the WAL, which holds every earlier frame too (#12)."""
        return self._synced

    def set_synced(self, synced: bool) -> None:
        """Choose how the next transaction commits. SQLite refuses the change inside a
        transaction, so this is for the ledger's thread between transactions only."""
        if synced != self._synced:
            assert not self.conn.in_transaction, "synchronous set inside a transaction"
            self.conn.execute(f"PRAGMA synchronous={'FULL' if synced else 'NORMAL'}")
            self._synced = synced

    def begin_group(self) -> None:
        """From now on writes join one transaction, opened by the first of them; see
        gpud.ledger.thread. Not for use by anything but the ledger's thread."""
        self._grouping = True

    def end_call(self, ok: bool) -> None:
        """Close the current call's savepoint in a group: kept if the call returned,
        undone if it raised."""
        if self._call_savepoint:
            self._call_savepoint = False
            if ok:
                self.conn.execute("RELEASE gpud_call")
            else:
                _undo(self.conn, "gpud_call")

    def end_group(self) -> None:
        """COMMIT the group's transaction, if any call wrote; on failure it is rolled back
        (nothing of the group is kept) and the error raised."""
        self._grouping = False
        self._call_savepoint = False
        if self.conn.in_transaction:
            _Tx(self.conn).__exit__(None, None, None)

    # -- writes --------------------------------------------------------------------------

    def submit(
        self,
        jobs: Sequence[NewJob],
        function: bytes,
        now: float,
        *,
        batch: bool = False,
        idempotency: IdempotencyKey | None = None,
        max_concurrency: int | None = None,
    ) -> tuple[int | None, list[int]]:
        """Store jobs (all of one function) durably; return (batch id, job ids in order).

        With an idempotency key: raise :class:`Replay` with the original jobs if the key
        was used by its owner in the last IDEMPOTENCY_TTL seconds (:class:`KeyReused` if
        for another submit); else the key is stored in the same transaction as the jobs,
        so a submit whose answer was lost is found by its retry, across restarts."""
        if not jobs:
            return None, []
        with self._tx() as c:
            if idempotency is not None:
                self._check_key(c, idempotency, now)
            c.execute(
                "INSERT OR IGNORE INTO blobs (hash, data, created_at) VALUES (?, ?, ?)",
                (jobs[0].function_hash, function, now),
            )
            batch_id: int | None = None
            if batch:
                cur = c.execute(
                    "INSERT INTO batches (submitted_at, size, max_concurrency) VALUES (?, ?, ?)",
                    (now, len(jobs), max_concurrency),
                )
                batch_id = cur.lastrowid
            ids: list[int] = []
            for j in jobs:
                cur = c.execute(
                    "INSERT INTO jobs (name, owner, state, priority, gpu, timeout, retries, "
                    "batch_id, python, image, env, function_hash, args, submitted_at, memory, "
                    "cpus, keep_warm, snapshot, python_env, deps, deps_any, notify, "
                    "preemptible, signal_before, signal, grace) "
                    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?, ?, ?, ?, ?, ?)",
                    (
                        j.name,
                        j.owner,
                        j.priority,
                        json.dumps(j.gpu.to_spec()) if j.gpu else None,
                        j.timeout,
                        j.retries,
                        batch_id,
                        j.python,
                        j.image,
                        json.dumps(j.env, sort_keys=True),
                        j.function_hash,
                        j.args,
                        now,
                        j.memory,
                        j.cpus,
                        j.keep_warm,
                        int(j.snapshot),
                        json.dumps(j.python_env.to_json()) if j.python_env else None,
                        ",".join(map(str, j.deps)),
                        int(j.deps_any),
                        json.dumps({"url": j.notify, "on": list(j.notify_on)})
                        if j.notify
                        else None,
                        int(j.preemptible),
                        j.signal_before,
                        j.signal,
                        j.grace,
                    ),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
            c.executemany(
                "INSERT INTO events (job_id, at, from_state, to_state, reason) "
                "VALUES (?, ?, NULL, 'queued', 'submitted')",
                [(i, now) for i in ids],
            )
            if idempotency is not None:
                c.execute(
                    "INSERT INTO idempotency (owner, key, fingerprint, job_id, batch_id, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        idempotency.owner,
                        idempotency.key,
                        idempotency.fingerprint,
                        None if batch else ids[0],
                        batch_id,
                        now,
                    ),
                )
        return batch_id, ids

    def _check_key(
        self, c: sqlite3.Connection, k: IdempotencyKey, now: float, prune: bool = True
    ) -> None:
        if prune:
            # Expired keys go here, in a transaction that writes anyway (indexed: cheap).
            c.execute("DELETE FROM idempotency WHERE created_at < ?", (now - IDEMPOTENCY_TTL,))
        row = c.execute(
            "SELECT fingerprint, job_id, batch_id FROM idempotency "
            "WHERE owner = ? AND key = ? AND created_at >= ?",
            (k.owner, k.key, now - IDEMPOTENCY_TTL),
        ).fetchone()
        if row is None:
            return
        if row["fingerprint"] != k.fingerprint:
            raise KeyReused(
                f"idempotency key {k.key!r} was already used for a different submit: "
                "use a new key for each new submit, the same key only to retry one"
            )
        if row["batch_id"] is not None:
            ids = [
                r[0]
                for r in c.execute(
                    "SELECT id FROM jobs WHERE batch_id = ? ORDER BY id", (row["batch_id"],)
                )
            ]
            raise Replay(row["batch_id"], ids)
        raise Replay(None, [row["job_id"]])

    def replay(self, k: IdempotencyKey, now: float) -> None:
        """Raise Replay (or KeyReused) if the key was used; a read (no lock taken), for the
        API to answer a retry before it checks quotas the original jobs now count against."""
        self._check_key(self.conn, k, now, prune=False)

    def mark_launched(self, job_id: int, attempt: int, now: float) -> None:
        """Durably note that this attempt is being handed to the executor (just before the
        launch): a restart then knows it may have run, and looks for it."""
        with self._tx() as c:
            c.execute(
                "UPDATE attempts SET launched_at = ? WHERE job_id = ? AND attempt = ?",
                (now, job_id, attempt),
            )

    def launched(self, job_id: int, attempt: int) -> bool:
        r = self.conn.execute(
            "SELECT launched_at FROM attempts WHERE job_id = ? AND attempt = ?", (job_id, attempt)
        ).fetchone()
        return r is not None and r[0] is not None

    def advance(
        self,
        job_id: int,
        steps: Iterable[Step],
        now: float,
        *,
        expect: JobState | None = None,
        result: bytes | None = None,
    ) -> Job:
        """Apply one or more state-machine steps in one transaction; return the job after.

        With ``expect``, refuse (IllegalTransition) unless the job is in that state now: a
        caller acting on what it last saw (cancel a *queued* job) must not apply its step
        to a job that moved on meanwhile (STARTING -> CANCELLED would also be legal).

        Several steps at once is how a retry is recorded: RUNNING -> FAILED -> QUEUED is
        one commit, so no reader ever sees the job resting in FAILED with a retry due.

        ``result``: the attempt's result pickle (a warm job's, sent inline, #12), stored
        in the same transaction: the job's end and its result are kept or lost together.
        """
        with self._tx() as c:
            row = c.execute(
                "SELECT state, attempt, owner FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise UnknownJob(job_id)
            state, attempt = JobState(row["state"]), int(row["attempt"])
            steps = list(steps)
            if expect is not None and state is not expect and steps:
                raise IllegalTransition(job_id, state, steps[0].state)
            for step in steps:
                new = transition(state, step.state, job_id)
                bad = set(step.fields) - _SETTABLE
                if bad:
                    raise ValueError(f"a step cannot set {sorted(bad)}")
                cols = dict(step.fields)
                gpu_types = cols.pop("gpu_types", ())
                uuids = tuple(cols.get("gpus", ()))
                if "gpus" in cols:
                    cols["gpus"] = ",".join(cols["gpus"])
                on_step(c, job_id, attempt, state, new, now, cols)  # suspensions (#13)
                if new is JobState.STARTING:
                    attempt += 1
                    cols["attempt"] = attempt
                    c.execute(
                        "INSERT INTO attempts (job_id, attempt, started_at, gpus) "
                        "VALUES (?, ?, ?, ?)",
                        (job_id, attempt, now, cols.get("gpus", "")),
                    )
                    open_attempt(c, job_id, attempt, row["owner"], uuids, gpu_types, now)
                elif new is JobState.RUNNING:
                    # RUNNING implies launched (a warm job's task is sent right after).
                    c.execute(
                        "UPDATE attempts SET pid = coalesce(?, pid), "
                        "launched_at = coalesce(launched_at, ?) WHERE job_id = ? AND attempt = ?",
                        (cols.get("pid"), now, job_id, attempt),
                    )
                elif new in FINAL and attempt > 0 and state is not JobState.QUEUED:
                    c.execute(
                        "UPDATE attempts SET ended_at = ?, state = ?, exit_code = ?, "
                        "error = ? WHERE job_id = ? AND attempt = ?",
                        (
                            cols.get("ended_at", now),
                            new.value,
                            cols.get("exit_code"),
                            cols.get("error", step.reason),
                            job_id,
                            attempt,
                        ),
                    )
                    # The attempt's GPUs are freed in this same commit: account for them.
                    close_attempt(c, job_id, attempt, cols.get("ended_at", now))
                sets = ", ".join(f"{k} = ?" for k in cols)
                c.execute(
                    f"UPDATE jobs SET state = ?{', ' + sets if sets else ''} WHERE id = ?",
                    (new.value, *cols.values(), job_id),
                )
                c.execute(
                    "INSERT INTO events (job_id, at, from_state, to_state, reason) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (job_id, now, state.value, new.value, step.reason),
                )
                state = new
            if result is not None:
                c.execute(
                    "INSERT OR REPLACE INTO results (job_id, attempt, data) VALUES (?, ?, ?)",
                    (job_id, attempt, result),
                )
            out = c.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(out)

    def set_fields(self, job_id: int, **cols: Any) -> None:
        """Update bookkeeping columns that are not a state change (e.g. pid on adoption)."""
        bad = set(cols) - _SETTABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in cols)
        with self._tx() as c:
            c.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*cols.values(), job_id))

    # -- reads ---------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        r = self.conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if r is None:
            raise UnknownJob(job_id, removed=_was_pruned(self.conn, job_id))
        return _row_to_job(r)

    def get_many(self, ids: Sequence[int]) -> list[Job]:
        """These jobs, in the order given (UnknownJob for a missing one), as :meth:`get`
        would return each. A submit's jobs (contiguous ids) are read in one query, and
        rows alike but for their id (a batch's jobs) are parsed once: 100,000 of them
        took seconds of the ledger thread one by one, in which the daemon wrote
        nothing else (#12)."""
        if not ids:
            return []
        lo, hi = min(ids), max(ids)
        if hi - lo >= 2 * len(ids):
            return [self.get(i) for i in ids]  # scattered: one by one
        rows = self.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id BETWEEN ? AND ?", (lo, hi)
        ).fetchall()
        parsed: dict[tuple[Any, ...], dict[str, Any]] = {}
        found: dict[int, Job] = {}
        for r in rows:
            alike = tuple(r)[1:]  # every column but the id
            fields = parsed.get(alike)
            if fields is None:
                job = _row_to_job(r)
                parsed[alike] = _fields_of(job)
                found[r[0]] = job
            else:
                found[r[0]] = _copy_with_id(fields, r[0])
        return [found[i] if i in found else self.get(i) for i in ids]

    def get_alike(self, ids: Sequence[int]) -> list[Job]:
        """The jobs one :meth:`submit` just made from NewJobs that differ only in their
        ``args`` (a batch's, as the API makes them), in the order given: their rows
        differ only in their id, so the first is read and the others are copies of it
        with their own id (about 4 us each, against a read and a parse, #12)."""
        if not ids:
            return []
        first = self.get(ids[0])
        fields = _fields_of(first)
        return [first, *(_copy_with_id(fields, i) for i in ids[1:])]

    def list_jobs(
        self,
        states: Iterable[JobState] | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
        owner: str | None = None,
    ) -> list[Job]:
        """Jobs newest first; ``before`` is the cursor (only ids below it).

        Each form walks an index down from the cursor and stops after ``limit`` rows, so
        a page costs the same on a ledger of a million jobs (tests/test_ledger_pages.py
        checks the plans): no filter, the table itself; an owner, ``jobs_owner``; states,
        one walk per state (``jobs_state``, or ``jobs_owner_state`` with an owner),
        merged here. An ``IN (states)`` would make SQLite collect every row of those
        states and sort them, which is what a million finished jobs cannot afford.
        """
        if states is None:
            rows = self._page(None, owner, before, limit)
        else:
            walks = [self._page(s.value, owner, before, limit) for s in dict.fromkeys(states)]
            rows = list(itertools.islice(heapq.merge(*walks, key=lambda r: -r["id"]), limit))
        return [_row_to_job(r) for r in rows]

    def _page(
        self, state: str | None, owner: str | None, before: int | None, limit: int
    ) -> list[sqlite3.Row]:
        where: list[str] = []
        params: list[object] = []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return self.conn.execute(sql, params).fetchall()

    def active(self) -> list[Job]:
        rows = self.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs "
            "WHERE state IN ('queued', 'starting', 'running', 'suspended') ORDER BY id"
        )
        return [_row_to_job(r) for r in rows]

    def payload(self, job_id: int) -> tuple[bytes, bytes]:
        """(function bytes, args bytes) of a job, exactly as the client sent them."""
        r = self.conn.execute(
            "SELECT b.data, j.args FROM jobs j JOIN blobs b ON b.hash = j.function_hash "
            "WHERE j.id = ?",
            (job_id,),
        ).fetchone()
        if r is None:
            raise UnknownJob(job_id)
        return bytes(r[0]), bytes(r[1])

    def events(self, job_id: int) -> list[Event]:
        rows = self.conn.execute(
            "SELECT id, job_id, at, from_state, to_state, reason FROM events "
            "WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        return [
            Event(r[0], r[1], r[2], JobState(r[3]) if r[3] else None, JobState(r[4]), r[5])
            for r in rows
        ]

    def events_after(
        self,
        after: int,
        *,
        limit: int = 100,
        job_id: int | None = None,
        owner: str | None = None,
    ) -> list[Event]:
        """Events with an id above ``after``, oldest first: a cursor over the whole log
        (ids only grow, and the log is append-only), over one job's events, or over one
        owner's jobs' events."""
        sql = "SELECT id, job_id, at, from_state, to_state, reason FROM events WHERE id > ?"
        params: list[object] = [after]
        if job_id is not None:
            sql += " AND job_id = ?"
            params.append(job_id)
        if owner is not None:
            sql += " AND job_id IN (SELECT id FROM jobs WHERE owner = ?)"
            params.append(owner)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [
            Event(r[0], r[1], r[2], JobState(r[3]) if r[3] else None, JobState(r[4]), r[5])
            for r in self.conn.execute(sql, params)
        ]

    def last_event_id(self) -> int:
        """The newest event's id (0 for an empty ledger)."""
        row = self.conn.execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt", (job_id,)
        )
        return [dict(r) for r in rows]

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])


def _undo(conn: sqlite3.Connection, name: str) -> None:
    """Roll back to a savepoint and drop it. After SQLITE_FULL and the like SQLite may
    have rolled the whole transaction back already: then there is nothing to undo."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (including IllegalTransition)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, et: object, e: object, tb: object) -> None:
        if et is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                # E.g. SQLITE_FULL or SQLITE_BUSY at COMMIT: SQLite may leave the
                # transaction open; roll it back so the connection stays usable.
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
