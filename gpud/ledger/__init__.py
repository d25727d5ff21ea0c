"""The SQLite job ledger: schema migrations, the one connection, queries."""

from gpud.ledger.schema import SCHEMA_VERSION
from gpud.ledger.store import Event, IllegalTransition, Ledger, NewJob, Step, UnknownJob
from gpud.ledger.thread import LedgerThread

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "IllegalTransition",
    "Ledger",
    "LedgerThread",
    "NewJob",
    "Step",
    "UnknownJob",
]
