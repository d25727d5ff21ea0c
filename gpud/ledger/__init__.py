"""The SQLite job ledger: schema migrations, the one connection, queries."""

from gpud.ledger.schema import SCHEMA_VERSION
from gpud.ledger.store import (
    Event,
    IdempotencyKey,
    IllegalTransition,
    KeyReused,
    Ledger,
    NewJob,
    Replay,
    Step,
    UnknownJob,
)
from gpud.ledger.thread import LedgerThread

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "IdempotencyKey",
    "IllegalTransition",
    "KeyReused",
    "Ledger",
    "LedgerThread",
    "NewJob",
    "Replay",
    "Step",
    "UnknownJob",
]
