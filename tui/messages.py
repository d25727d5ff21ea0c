"""The messages the TUI's parts send each other, as dataclasses.

Widgets never call the app or the client: a table that wants a job opened or cancelled
posts a message, and the app (which owns the client) acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from tui.data import JobsQuery, Snapshot

__all__ = [
    "CancelRequested",
    "ConnectionLost",
    "JobCancelled",
    "OpenJob",
    "PollFailed",
    "QueryChanged",
    "SnapshotReady",
]


@dataclass
class SnapshotReady(Message):
    """A poll answered; the main screen shows it."""

    snapshot: Snapshot


@dataclass
class ConnectionLost(Message):
    """No daemon answers at the URL; polling goes on, and the next answer reconnects."""

    url: str
    reason: str


@dataclass
class PollFailed(Message):
    """The daemon answered something the TUI did not expect (shown, never raised)."""

    error: str


@dataclass
class OpenJob(Message):
    """Show this job's detail screen."""

    job_id: int


@dataclass
class CancelRequested(Message):
    """Ask to confirm, then cancel this job."""

    job_id: int
    name: str = ""
    #: the state the asker last saw; a job already final is not asked about
    state: str | None = None


@dataclass
class JobCancelled(Message):
    """The daemon answered a cancel: the job's state now, or why it failed."""

    job_id: int
    state: str | None
    error: str | None = None


@dataclass
class QueryChanged(Message):
    """The jobs table wants another filter, sort or page."""

    query: JobsQuery
