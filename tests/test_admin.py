"""`gpud admin` (users, tokens, quotas, backup) and `gpud usage`/`whoami`, as a user would
run them, against a real daemon."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import gpud_client as gpud
from gpud.cli import EXIT
from gpud.ledger.schema import SCHEMA_VERSION
from gpud_client import Client

from .conftest import DaemonProc, UnixUser, free_port, gpud_cli


def _square(x: int, nap: float = 0.0) -> int:
    import time

    time.sleep(nap)
    return x * x


def square_on(d: DaemonProc) -> Any:
    """A function bound to this daemon (an App keeps its first connection)."""
    return gpud.App("admin-tests", url=d.url).function()(_square)


def admin(d: DaemonProc, *args: str) -> object:
    return gpud_cli("admin", "--data-dir", str(d.data_dir), *args, env=d.client_env())


def test_user_add_list_quota_rotate_remove(fresh_daemon: DaemonProc) -> None:
    d = fresh_daemon
    out = admin(d, "user", "add", "alice", "--no-token-file")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("gpud_") and len(token) > 40 and "shown once" in out.stderr
    assert admin(d, "user", "add", "alice").returncode == EXIT["error"]
    bad = admin(d, "user", "add", "no/slash")
    assert bad.returncode == EXIT["error"] and "invalid user name" in bad.stderr

    out = admin(
        d, "quota", "set", "alice", "--gpus", "2", "--queued", "100", "--max-timeout", "12h"
    )
    assert out.returncode == 0 and "alice: gpus 2, queued 100, max timeout 12h" in out.stderr
    admin(d, "quota", "set", "alice", "--queued", "none")
    users = json.loads(admin(d, "user", "list", "--json").stdout)
    assert users == [
        {
            "name": "alice",
            "admin": False,
            "has_token": True,
            "created_at": users[0]["created_at"],
            "max_gpus": 2,
            "max_queued": None,
            "max_timeout": 43200.0,
        }
    ]
    assert "alice" in admin(d, "user", "list").stdout
    assert admin(d, "user", "set", "alice", "--admin").returncode == 0
    assert json.loads(admin(d, "user", "list", "--json").stdout)[0]["admin"] is True

    # The ledger never holds the token itself.
    raw = (d.data_dir / "ledger.db").read_bytes()
    assert token.encode() not in raw

    new = admin(d, "token", "rotate", "alice", "--no-token-file").stdout.strip()
    assert new.startswith("gpud_") and new != token
    out = admin(d, "user", "remove", "alice")
    assert out.returncode == 0 and "removed alice" in out.stderr
    assert admin(d, "user", "remove", "alice").returncode == EXIT["error"]
    assert "no users" in admin(d, "user", "list").stderr


def test_admin_works_before_the_daemon_first_starts(base_dir: Path) -> None:
    """docs/cli.md: set up a box's users before its daemon ever ran (#10)."""
    port = free_port()
    d = DaemonProc(base_dir, env={"GPUD_TCP": f"127.0.0.1:{port}"})
    assert not d.data_dir.exists()
    out = admin(d, "user", "add", "alice", "--admin", "--no-token-file")
    assert out.returncode == 0, out.stderr
    assert f"created the gpud data directory {d.data_dir}" in out.stderr
    token = out.stdout.strip()
    # The modes the daemon gives them: traversable, not listable, by job users as root.
    want = 0o711 if os.geteuid() == 0 else 0o700
    for p in (d.data_dir, d.data_dir / "jobs"):
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    assert stat.S_IMODE((d.data_dir / "ledger.db").stat().st_mode) == 0o600
    # The daemon then starts on that directory and knows alice.
    d.start()
    try:
        # Over TCP, where the token says who is calling.
        assert Client(f"http://127.0.0.1:{port}", token=token).whoami().name == "alice"
    finally:
        d.stop()
    # A data directory that cannot be made is a clear error.
    (base_dir / "file").write_text("")
    out = gpud_cli("admin", "--data-dir", str(base_dir / "file" / "data"), "user", "list")
    assert out.returncode == EXIT["error"]
    assert "cannot create the gpud data directory" in out.stderr


def test_user_add_writes_the_token_file_as_the_user(fresh_daemon: DaemonProc, unix_users) -> None:  # type: ignore[no-untyped-def]
    alice: UnixUser = unix_users("alice")
    # A link planted where the token goes must not make root write through it.
    (alice.home / ".config").mkdir(mode=0o755)
    os.chown(alice.home / ".config", alice.uid, alice.gid)
    out = admin(fresh_daemon, "user", "add", alice.name)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    path = alice.home / ".config" / "gpud" / "token"
    assert f"wrote it to {path}" in out.stderr
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (alice.uid, alice.gid, 0o600)
    assert path.read_text().strip() == token
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    # Rotating replaces it; a symlink in its place is replaced, not followed.
    victim = Path(fresh_daemon.base) / "victim"
    victim.write_text("root's file\n")
    path.unlink()
    path.symlink_to(victim)
    os.lchown(path, alice.uid, alice.gid)
    out = admin(fresh_daemon, "token", "rotate", alice.name)
    assert out.returncode == 0, out.stderr
    assert victim.read_text() == "root's file\n"
    assert not path.is_symlink() and path.read_text().strip() == out.stdout.strip()


def test_backup_while_the_daemon_runs_and_restore(fresh_daemon: DaemonProc, tmp_path: Path) -> None:
    d = fresh_daemon
    square = square_on(d)
    with Client(d.url) as c:
        jobs = [square.spawn(i, 0.2) for i in range(3)]  # wall_seconds: tenths, rounded
        assert [j.get() for j in jobs] == [0, 1, 4]
        ids = [j.id for j in jobs]
        assert c.get_job(ids[0]).wall_seconds > 0
    admin(d, "user", "add", "alice", "--no-token-file")

    dest = tmp_path / "backup.db"
    out = admin(d, "backup", str(dest))
    assert out.returncode == 0, out.stderr
    assert "3 jobs" in out.stderr and f"schema version {SCHEMA_VERSION}" in out.stderr
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert not Path(str(dest) + "-wal").exists()  # one self-contained file
    conn = sqlite3.connect(dest)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3
    assert conn.execute("SELECT name FROM users").fetchall() == [("alice",)]
    conn.close()
    again = admin(d, "backup", str(dest))
    assert again.returncode == EXIT["error"] and "--force" in again.stderr
    assert admin(d, "backup", str(dest), "--force").returncode == 0

    # Restore, as docs/operations.md says: stop, copy over, drop the WAL files, start.
    assert square.remote(9) == 81
    d.stop()
    ledger = d.data_dir / "ledger.db"
    ledger.write_bytes(dest.read_bytes())
    for side in ("-wal", "-shm"):
        Path(str(ledger) + side).unlink(missing_ok=True)
    d.start()
    with Client(d.url) as c:
        listed = [j.id for j in c.list_jobs(state="succeeded").jobs]
        assert sorted(listed) == sorted(ids)  # the job after the backup is not in it
        assert c.get_job(ids[1]).has_result


def test_usage_and_whoami_commands(daemon: DaemonProc) -> None:
    # 0.3 s: usage rounds to tenths of a second, and a bare square can take 0.0 of them
    # (it did on CI once the warm and cold paths got quicker).
    assert square_on(daemon).remote(3, 0.3) == 9
    out = gpud_cli("usage", "--json", env=daemon.client_env())
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    me = json.loads(gpud_cli("whoami", "--json", env=daemon.client_env()).stdout)
    assert me["via"] == "peer" and me["admin"] is True
    assert rep["by"] == "user" and me["name"] in [x["key"] for x in rep["lines"]]
    assert rep["total"]["jobs"] >= 1 and rep["total"]["wall_seconds"] > 0
    table = gpud_cli("usage", "--since", "1h", "--by", "day", env=daemon.client_env())
    assert "DAY" in table.stdout and "TOTAL" in table.stdout
    bad = gpud_cli("usage", "--since", "yesterday-ish", env=daemon.client_env())
    assert bad.returncode == EXIT["usage"] and "7d" in bad.stderr
    who = gpud_cli("whoami", env=daemon.client_env())
    assert who.stdout.strip() == me["name"] and "peer credentials" in who.stderr
