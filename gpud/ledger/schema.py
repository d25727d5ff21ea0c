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
