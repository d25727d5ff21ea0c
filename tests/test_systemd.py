"""The systemd unit and gpud's side of it: readiness (sd_notify) and journald logging."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gpud import systemd

from .conftest import DaemonProc

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "gpud.service"


def test_the_unit_verifies() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    out = subprocess.run([tool, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # verify warns on stderr about problems it does not fail for: there must be none.
    assert "gpud.service" not in out.stderr, out.stderr


def test_the_unit_keeps_jobs_and_says_what_it_needs() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "KillMode=process",
        "StateDirectory=gpud",
        "RuntimeDirectory=gpud",
        "Restart=on-failure",
    ):
        assert f"\n{line}\n" in text, line
    # Nothing that would stop jobs running as their users, with GPUs, or Podman.
    for forbidden in (
        "NoNewPrivileges=yes",
        "PrivateDevices=yes",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "DynamicUser=yes",
        "CapabilityBoundingSet",
    ):
        assert f"\n{forbidden}" not in text, forbidden


@pytest.fixture
def notify_socket(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(30)
    yield s, str(tmp_path / "notify")
    s.close()


def test_notify_sends_one_datagram(notify_socket, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    sock, path = notify_socket
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False  # not under systemd: nothing to do
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1\nSTATUS=hi") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=hi"


def test_gpud_serve_says_ready_then_stopping(notify_socket, base_dir: Path) -> None:  # type: ignore[no-untyped-def]
    sock, path = notify_socket
    d = DaemonProc(base_dir, env={"NOTIFY_SOCKET": path})
    d.start()
    try:
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving on ") and str(d.socket) in ready
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        d.stop()


def test_journal_formatter_prefixes_every_line_with_its_priority() -> None:
    f = systemd.JournalFormatter()
    rec = logging.LogRecord(
        "gpud.api", logging.WARNING, __file__, 1, "refused\nsecond line", None, None
    )
    assert f.format(rec) == "<4>gpud.api: refused\n<4>second line"
    rec.levelno = logging.INFO
    assert f.format(rec).startswith("<6>")


def test_stderr_is_journal_only_when_journal_stream_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not systemd.stderr_is_journal()
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert systemd.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not systemd.stderr_is_journal()
