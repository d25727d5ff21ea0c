"""The ledger's schema as numbered migrations, applied in order under PRAGMA user_version.

A migration is never edited once released: add a new one. Each runs in one transaction
with the user_version bump, so a crash mid-upgrade leaves the old schema intact.
"""

from __future__ import annotations

import sqlite3

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

MIGRATIONS: list[str] = [
    # 1: jobs, their attempts, the append-only event log, and payload blobs.
    """
    CREATE TABLE blobs (
        hash       TEXT PRIMARY KEY,          -- sha256 of data: one copy per function
        data       BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE batches (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        submitted_at REAL NOT NULL,
        size         INTEGER NOT NULL
    );
    CREATE TABLE jobs (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        name          TEXT NOT NULL,
        owner         TEXT NOT NULL,
        state         TEXT NOT NULL,
        priority      INTEGER NOT NULL DEFAULT 0,
        gpu           TEXT,                   -- JSON list of "type:count" options, NULL = CPU
        timeout       REAL NOT NULL,
        retries       INTEGER NOT NULL DEFAULT 0,
        attempt       INTEGER NOT NULL DEFAULT 0,
        not_before    REAL NOT NULL DEFAULT 0,
        gpus          TEXT NOT NULL DEFAULT '', -- comma-separated UUIDs held
        batch_id      INTEGER REFERENCES batches(id),
        python        TEXT NOT NULL,
        image         TEXT,
        env           TEXT NOT NULL DEFAULT '{}',
        function_hash TEXT NOT NULL REFERENCES blobs(hash),
        args          BLOB NOT NULL,
        submitted_at  REAL NOT NULL,
        started_at    REAL,
        ended_at      REAL,
        pid           INTEGER,
        pid_start     INTEGER,
        exit_code     INTEGER,
        error         TEXT,
        has_result    INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_active ON jobs(state) WHERE state IN ('queued', 'starting', 'running');
    CREATE INDEX jobs_owner ON jobs(owner, id);
    CREATE TABLE attempts (
        job_id     INTEGER NOT NULL REFERENCES jobs(id),
        attempt    INTEGER NOT NULL,
        started_at REAL NOT NULL,
        ended_at   REAL,
        state      TEXT,
        gpus       TEXT NOT NULL DEFAULT '',
        pid        INTEGER,
        exit_code  INTEGER,
        error      TEXT,
        PRIMARY KEY (job_id, attempt)
    );
    CREATE TABLE events (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id     INTEGER NOT NULL REFERENCES jobs(id),
        at         REAL NOT NULL,
        from_state TEXT,
        to_state   TEXT NOT NULL,
        reason     TEXT
    );
    CREATE INDEX events_job ON events(job_id, id);
    -- The event log is append-only: refuse edits and deletes at the database level.
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    """,
    # 2: resource limits per job (memory= and cpu=, enforced by the Podman executor).
    """
    ALTER TABLE jobs ADD COLUMN memory INTEGER;
    ALTER TABLE jobs ADD COLUMN cpus REAL;
    """,
    # 3: warm workers: how long a job's worker stays, how the job started, how fast.
    """
    ALTER TABLE jobs ADD COLUMN keep_warm REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN start_kind TEXT;
    ALTER TABLE jobs ADD COLUMN startup REAL;
    """,
    # 4 (issue #5): users with hashed tokens and quotas; accounting per attempt and GPU.
    """
    CREATE TABLE users (
        name        TEXT PRIMARY KEY,         -- the Unix user name on a root daemon
        admin       INTEGER NOT NULL DEFAULT 0,
        token_hash  TEXT UNIQUE,              -- sha256 hex of the API token; never the token
        created_at  REAL NOT NULL,
        max_gpus    INTEGER,                  -- quotas; NULL = no limit
        max_queued  INTEGER,
        max_timeout REAL
    );
    -- Wall time and GPU time in tenths of a second (100 ms granularity, exact integers
    -- that sum without rounding drift): per attempt, and totalled per job.
    ALTER TABLE attempts ADD COLUMN wall_ds INTEGER;
    ALTER TABLE attempts ADD COLUMN gpu_ds INTEGER;
    ALTER TABLE jobs ADD COLUMN wall_ds INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN gpu_ds INTEGER NOT NULL DEFAULT 0;
    -- One row per GPU an attempt held, from the moment it was handed out to the moment
    -- it was freed: by user, by day and by GPU type reports, and fair share, read this.
    CREATE TABLE gpu_usage (
        job_id     INTEGER NOT NULL REFERENCES jobs(id),
        attempt    INTEGER NOT NULL,
        owner      TEXT NOT NULL,
        gpu_uuid   TEXT NOT NULL,
        gpu_type   TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at   REAL,                      -- NULL while the attempt holds the GPU
        ds         INTEGER,
        PRIMARY KEY (job_id, attempt, gpu_uuid)
    );
    CREATE INDEX gpu_usage_end ON gpu_usage(ended_at);
    CREATE INDEX attempts_end ON attempts(ended_at);
    -- Account for what ran before this migration (GPU types were not recorded then).
    WITH RECURSIVE split(job_id, attempt, uuid, rest, started_at, ended_at) AS (
        SELECT job_id, attempt, '', gpus || ',', started_at, ended_at
        FROM attempts WHERE gpus != ''
        UNION ALL
        SELECT job_id, attempt, substr(rest, 1, instr(rest, ',') - 1),
               substr(rest, instr(rest, ',') + 1), started_at, ended_at
        FROM split WHERE rest != ''
    )
    INSERT INTO gpu_usage (job_id, attempt, owner, gpu_uuid, gpu_type, started_at,
                           ended_at, ds)
    SELECT s.job_id, s.attempt, j.owner, s.uuid, 'unknown', s.started_at, s.ended_at,
           CASE WHEN s.ended_at IS NULL THEN NULL
                ELSE max(0, CAST(round((s.ended_at - s.started_at) * 10) AS INTEGER)) END
    FROM split s JOIN jobs j ON j.id = s.job_id WHERE s.uuid != '';
    UPDATE attempts SET
        wall_ds = max(0, CAST(round((ended_at - started_at) * 10) AS INTEGER)),
        gpu_ds = (SELECT coalesce(sum(u.ds), 0) FROM gpu_usage u
                  WHERE u.job_id = attempts.job_id AND u.attempt = attempts.attempt)
    WHERE ended_at IS NOT NULL;
    UPDATE jobs SET
        wall_ds = (SELECT coalesce(sum(a.wall_ds), 0) FROM attempts a WHERE a.job_id = jobs.id),
        gpu_ds = (SELECT coalesce(sum(a.gpu_ds), 0) FROM attempts a WHERE a.job_id = jobs.id);
    """,
    # 5 (issue #4): snapshot=True jobs, and the container snapshots taken for them.
    """
    ALTER TABLE jobs ADD COLUMN snapshot INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE snapshots (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        key         TEXT NOT NULL UNIQUE,     -- sha256 of every part that must match
        parts       TEXT NOT NULL,            -- those parts, as JSON, to say what changed
        function    TEXT NOT NULL,
        owner       TEXT NOT NULL,
        image       TEXT NOT NULL,            -- the job's image, by name
        state       TEXT NOT NULL,            -- taking | ready | failed
        location    TEXT,                     -- the snapshot's directory (pages + archive)
        size        INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        last_used   REAL,
        restores    INTEGER NOT NULL DEFAULT 0,
        failures    INTEGER NOT NULL DEFAULT 0, -- consecutive; a good restore resets it
        last_error  TEXT,
        taken_by    INTEGER                   -- the job whose container was checkpointed
    );
    CREATE INDEX snapshots_owner_function ON snapshots(owner, function);
    """,
    # Images built from gpud.Image definitions (#11). (Migration 8 in the plan:
    # other branches add theirs first; renumbered on merge.)
    """
    CREATE TABLE images (
        key           TEXT PRIMARY KEY,      -- sha256 of the canonical definition
        name          TEXT NOT NULL,         -- localhost/gpud-img-<key12>:latest
        creator       TEXT NOT NULL,         -- who first asked for it
        created_at    REAL NOT NULL,
        last_used     REAL NOT NULL,         -- a job or a build asked for it
        size          INTEGER NOT NULL DEFAULT 0,
        build_seconds REAL NOT NULL DEFAULT 0,
        builds        INTEGER NOT NULL DEFAULT 0,  -- > 1: rebuilt after a collection
        spec          TEXT NOT NULL          -- the definition, as JSON
    );
    CREATE UNIQUE INDEX images_name ON images(name);
    """,
    # The interpreter a process-executor job runs with, as JSON (a PythonEnv)
    # (#11, callers' environments; after the images migration)
    """
    ALTER TABLE jobs ADD COLUMN python_env TEXT;
    """,
    # 8 (issue #10): durable launches and idempotent submits.
    """
    -- When the daemon handed this attempt to its executor (set just before the launch):
    -- on restart, an attempt without it never ran and is started again, one with it ran
    -- and its process or its outcome is looked for.
    ALTER TABLE attempts ADD COLUMN launched_at REAL;
    -- Attempts open at the upgrade may have been launched by the older gpud: say they
    -- were, so that the next start looks for their process and outcome.
    UPDATE attempts SET launched_at = started_at WHERE ended_at IS NULL;
    -- A client's idempotency key per owner: a repeated submit gets the original job
    -- (job_id) or batch (batch_id) back. Written in the submit's own transaction.
    CREATE TABLE idempotency (
        owner       TEXT NOT NULL,
        key         TEXT NOT NULL,
        fingerprint TEXT NOT NULL,            -- sha256 of what was submitted
        job_id      INTEGER,                  -- a single submit
        batch_id    INTEGER,                  -- a batch
        created_at  REAL NOT NULL,
        PRIMARY KEY (owner, key)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_created ON idempotency(created_at);
    """,
    # 9 (issue #12): retention. `gpud gc` (and the daemon, periodically) removes the rows
    # of jobs that ended more than retention_jobs ago, after rolling their accounting up.
    """
    -- What the removed jobs used, per owner, per UTC hour and per kind ('*': every
    -- attempt; a GPU type; 'cpu': attempts without GPUs), so usage reports and fair share
    -- give the same totals after the clean-up (gpud.ledger.retention has the details).
    CREATE TABLE usage_rollup (
        hour     INTEGER NOT NULL,           -- Unix time of the UTC hour's start
        owner    TEXT NOT NULL,
        kind     TEXT NOT NULL,
        jobs     INTEGER NOT NULL DEFAULT 0, -- counted in the hour their last attempt ended
        attempts INTEGER NOT NULL DEFAULT 0, -- counted in the hour they ended
        wall_ds  INTEGER NOT NULL DEFAULT 0, -- spread over the hours the attempts ran in
        gpu_ds   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, owner, kind)
    ) WITHOUT ROWID;
    -- One row: the highest job id removed so far (a missing id at or below it was removed
    -- by retention: ids are never reused) and how many were.
    CREATE TABLE retention_state (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        pruned_through INTEGER NOT NULL DEFAULT 0,
        pruned_jobs    INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO retention_state (id) VALUES (1);
    -- The jobs the running gc transaction removes; empty outside it. Only a final job
    -- may be entered, and only the events and rows of jobs entered here may be deleted:
    -- the database itself keeps the event log append-only for every other job.
    CREATE TABLE retention_pruning (job_id INTEGER PRIMARY KEY);
    CREATE TRIGGER retention_pruning_final BEFORE INSERT ON retention_pruning
        WHEN coalesce((SELECT state FROM jobs WHERE id = NEW.job_id), '')
             NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out', 'lost')
        BEGIN SELECT RAISE(ABORT, 'only final jobs are removed by retention'); END;
    DROP TRIGGER events_no_delete;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        WHEN NOT EXISTS (SELECT 1 FROM retention_pruning WHERE job_id = OLD.job_id)
        BEGIN SELECT RAISE(ABORT, 'events are append-only (only gc removes them, with their job)');
        END;
    CREATE TRIGGER jobs_no_delete BEFORE DELETE ON jobs
        WHEN NOT EXISTS (SELECT 1 FROM retention_pruning WHERE job_id = OLD.id)
        BEGIN SELECT RAISE(ABORT, 'jobs are removed only by gc, once final'); END;
    -- gc finds the jobs that ended longest ago without a scan (a job cancelled while
    -- queued has no ended_at: it ended when it was submitted, as far as retention goes),
    -- and the payloads and batches no job refers to any more.
    CREATE INDEX jobs_final_end ON jobs(coalesce(ended_at, submitted_at))
        WHERE state IN ('succeeded', 'failed', 'cancelled', 'timed_out', 'lost');
    CREATE INDEX jobs_function ON jobs(function_hash);
    CREATE INDEX jobs_batch ON jobs(batch_id) WHERE batch_id IS NOT NULL;
    """,
    # 10 (#12): every listing is a walk down an index from its cursor, never a scan and
    # sort of a million rows. `gpud ps` and GET /v1/jobs read one state at a time
    # (newest first, from the cursor down) and merge: jobs_state for an admin,
    # jobs_owner_state for a user. jobs_owner (owner, id) still serves --all of one
    # owner. jobs_state covers the partial index of the active states, which goes.
    """
    CREATE INDEX jobs_state ON jobs(state, id);
    CREATE INDEX jobs_owner_state ON jobs(owner, state, id);
    DROP INDEX jobs_active;
    """,
    # 11 (#12): a batch's concurrency limit (migration 9 already indexes jobs by batch).
    """
    ALTER TABLE batches ADD COLUMN max_concurrency INTEGER;
    """,
    # 12 (#13): suspend, resume and preemption. The event log has every suspend and resume
    # with its reason; these columns are what the daemon needs without reading it back.
    """
    ALTER TABLE jobs ADD COLUMN preemptible INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN suspended_at REAL;      -- the current suspension's start
    ALTER TABLE jobs ADD COLUMN suspend_reason TEXT;    -- "suspended by alice", ...
    ALTER TABLE jobs ADD COLUMN suspended_for INTEGER;  -- the job it was preempted for
    ALTER TABLE jobs ADD COLUMN suspended_s REAL NOT NULL DEFAULT 0; -- this attempt's, ended
    -- Tenths of a second a GPU holding spent suspended: not charged (ds leaves them out).
    ALTER TABLE gpu_usage ADD COLUMN suspended_ds INTEGER NOT NULL DEFAULT 0;
    """,
    # 13 (#14): dependencies (comma-separated ids, fixed at submit: the ids existed then,
    # so no cycle can be made) and the webhook told when the job ends.
    """
    ALTER TABLE jobs ADD COLUMN deps TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN deps_any INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN notify TEXT;
    """,
    # 14 (#12): a warm job's small
    # result, stored in the same commit as the job's end instead of a synced file
    # (gpud.daemon.results). One row per job: a later attempt's result replaces it, and
    # readers take it only for the job's current attempt.
    """
    CREATE TABLE results (
        job_id INTEGER PRIMARY KEY,
        attempt INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    """,
    # 15 (#14): the early warning before a job's timeout and its stop grace. NULL: none /
    # the daemon's defaults.
    """
    ALTER TABLE jobs ADD COLUMN signal_before REAL;
    ALTER TABLE jobs ADD COLUMN signal TEXT;
    ALTER TABLE jobs ADD COLUMN grace REAL;
    """,
]


SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    pass


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database up to SCHEMA_VERSION; return the version it was at."""
    (before,) = conn.execute("PRAGMA user_version").fetchone()
    if before > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the ledger has schema version {before}, newer than this gpud knows "
            f"({SCHEMA_VERSION}): run a newer gpud, or restore a backup"
        )
    if (
        before in (2, 3)
        and conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'users'"
        ).fetchone()
    ):
        # Pre-release builds of the shared-box work (#5) numbered their users and
        # accounting migration 2, before the Podman and warm-worker migrations were
        # merged ahead of it: that numbering cannot be upgraded in place.
        raise SchemaTooNew(
            f"the ledger has schema version {before} with a users table, as made by a "
            "pre-release build of gpud's shared-box work, whose migrations were renumbered "
            "(users and accounting are migration 4 now): move that ledger.db aside and "
            "start with a fresh one"
        )
    for version in range(before + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[version - 1]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return int(before)


def _split(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    out: list[str] = []
    buf: list[str] = []
    for line in script.splitlines():
        buf.append(line)
        candidate = "\n".join(buf).strip()
        if candidate and sqlite3.complete_statement(candidate):
            out.append(candidate)
            buf = []
    rest = "\n".join(buf).strip()
    if rest and not all(ln.strip().startswith("--") for ln in rest.splitlines()):
        out.append(rest)
    return out
