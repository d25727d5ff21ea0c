"""The two things gpud needs from systemd, without a dependency: readiness and logging.

* :func:`notify` is sd_notify(3): one datagram to ``$NOTIFY_SOCKET``. With
  ``Type=notify`` in the unit, `systemctl start gpud` returns once the daemon says
  ``READY=1``, that is once its sockets are bound and the ledger is recovered, so units
  ordered after it (and admins' scripts) find a daemon that answers.
* :class:`JournalFormatter` prefixes each line with its syslog priority (``<4>`` for a
  warning), which journald turns into the entry's PRIORITY, so `journalctl -p warning
  -u gpud` works. It is used only when stderr is connected to the journal
  (``$JOURNAL_STREAM`` names stderr's device and inode, as systemd.exec(5) documents).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

__all__ = ["JournalFormatter", "notify", "stderr_is_journal"]


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        return False  # systemd will time the start out and say so; nothing to add here
    return True


def stderr_is_journal() -> bool:
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: journald stores the priority and adds the time."""

    _PRIORITY = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = self._PRIORITY.get(record.levelno, 6)
        # A traceback spans several lines; each becomes an entry, so each gets the prefix.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())
