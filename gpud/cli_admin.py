"""`gpud admin`: users, tokens, quotas and backups, on the ledger directly.

These commands open the daemon's ledger themselves (a second SQLite connection, which WAL
allows while the daemon runs) instead of going through the API, for three reasons: they
work before the daemon first starts and while it is down (setting up a box, restoring
one); they need no admin token to bootstrap the first admin; and who may run them is
decided by the operating system, since the ledger is readable by the daemon's user only
(root, for a system daemon: `sudo gpud admin ...`). The daemon re-reads the users table
every second (at once for a name or token it does not know), so changes take effect
without a restart.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

__all__ = ["admin", "write_token_file"]


def _fail(message: str) -> Any:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


@dataclass(frozen=True)
class _Where:
    config_path: str | None
    data_dir: str | None

    def ledger_path(self) -> Path:
        from gpud.config import ConfigError, load_config

        try:
            cfg = load_config(self.config_path, data_dir=self.data_dir)
        except ConfigError as e:
            _fail(str(e))
        if not cfg.data_dir.is_dir():
            # Before the daemon's first start (setting up a box): create the data directory
            # as the daemon would, modes included, so the ledger made here is the one it opens.
            from gpud.server import prepare_dirs

            try:
                prepare_dirs(cfg)
            except OSError as e:
                _fail(
                    f"cannot create the gpud data directory {cfg.data_dir}: {e}. Pass the "
                    "daemon's --data-dir or --config, or run gpud admin as the daemon's user"
                )
            click.echo(
                f"created the gpud data directory {cfg.data_dir} (the daemon uses it "
                "when it starts)",
                err=True,
            )
        return cfg.ledger_path


def _where(ctx: click.Context) -> _Where:
    """The --config/--data-dir the admin group stored on the context."""
    where = ctx.find_object(_Where)
    if where is None:
        raise RuntimeError("an admin command ran outside its group: no _Where on the context")
    return where


@contextmanager
def _ledger(ctx: click.Context) -> Iterator[Any]:
    from gpud.ledger import Ledger

    path = _where(ctx).ledger_path()
    try:
        led = Ledger(path)
    except PermissionError:
        _fail(
            f"cannot open the ledger {path}: permission denied. Run gpud admin as the "
            "daemon's user (root for a system daemon: sudo gpud admin ...)"
        )
    except (OSError, sqlite3.Error, RuntimeError) as e:
        _fail(f"cannot open the ledger {path}: {e}")
    try:
        yield led
    finally:
        led.close()


def write_token_file(user: str, token: str) -> Path:
    """Write ``token`` to ``~user/.config/gpud/token`` (mode 0600), as that user.

    Root must not write into a directory a user controls (a symlink planted there would
    make root overwrite any file), so a child process takes the user's uid, gid and
    groups first, and creates the file the way the user would.
    """
    pw = pwd.getpwnam(user)
    path = Path(pw.pw_dir) / ".config" / "gpud" / "token"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(r)
            os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.umask(0o077)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(".token.new")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, path)
            os._exit(0)
        except BaseException as e:  # noqa: BLE001 - anything goes back to the parent
            os.write(w, str(e).encode()[:1000])
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        why = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise OSError(why or f"exit status {status}")
    return path


def _give_token(name: str, token: str, no_file: bool) -> None:
    """Print the token (the one time it is shown) and, as root, hand it to the user."""
    click.echo(token)
    click.echo("(this token is shown once: gpud stores only its hash)", err=True)
    if no_file or os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(name)
    except KeyError:
        click.echo(f"{name} has no Unix account here, so no token file was written", err=True)
        return
    try:
        path = write_token_file(name, token)
    except OSError as e:
        click.echo(f"could not write {name}'s token file: {e}", err=True)
        return
    click.echo(
        f"wrote it to {path} (mode 0600, owned by {name}), where gpud's client finds it", err=True
    )


def _quota_value(text: str | None, kind: str) -> Any:
    """'none'/'unlimited' -> no limit; else a whole number, or a duration for timeouts."""
    if text is None or text.lower() in ("none", "unlimited", "-"):
        return None
    if kind == "duration":
        from gpud_client.duration import parse_duration

        try:
            return parse_duration(text)
        except ValueError as e:
            _fail(str(e))
    if not text.isdigit():
        _fail(f"{text!r} is not a whole number (or 'none' for no limit)")
    return int(text)


def _user_dict(u: Any) -> dict[str, Any]:
    q = u.quota
    return {
        "name": u.name,
        "admin": u.admin,
        "has_token": u.token_hash is not None,
        "created_at": u.created_at,
        "max_gpus": q.max_gpus,
        "max_queued": q.max_queued,
        "max_timeout": q.max_timeout,
    }


# ---------------------------------------------------------------------------------------


@click.group()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="GPUD_CONFIG",
    help="The daemon's TOML config file, to find its ledger.",
)
@click.option(
    "--data-dir",
    default=None,
    help="The daemon's data directory (default: as `gpud serve` would use).",
)
@click.pass_context
def admin(ctx: click.Context, config_path: str | None, data_dir: str | None) -> None:
    """Manage users, tokens and quotas, and back up the ledger.

    Works on the daemon's ledger directly, so run it as the daemon's user (root for a
    system daemon: sudo gpud admin ...); the daemon picks changes up within a second.
    """
    ctx.obj = _Where(config_path, data_dir)


@admin.group()
def user() -> None:
    """Add, change, remove and list users."""


@user.command("add")
@click.argument("name")
@click.option("--admin", "is_admin", is_flag=True, help="May see and act on every job.")
@click.option(
    "--no-token-file",
    is_flag=True,
    help="Only print the token; do not write it to ~NAME/.config/gpud/token.",
)
@click.pass_context
def user_add(ctx: click.Context, name: str, is_admin: bool, no_token_file: bool) -> None:
    """Add a user and print their API token (once).

    On a root daemon NAME is a Unix user's name: their jobs run as that user. Run as root
    for a Unix user, the token is also written to ~NAME/.config/gpud/token (0600, theirs).
    """
    from gpud.ledger.users import UserExists, add_user
    from gpud.users import hash_token, new_token

    token = new_token()
    with _ledger(ctx) as led:
        try:
            add_user(led, name, admin=is_admin, token_hash=hash_token(token), now=time.time())
        except (UserExists, ValueError) as e:
            _fail(str(e))
    click.echo(f"added {'admin' if is_admin else 'user'} {name}", err=True)
    _give_token(name, token, no_token_file)


@user.command("set")
@click.argument("name")
@click.option(
    "--admin/--no-admin", "is_admin", required=True, help="Make the user an admin, or take it away."
)
@click.pass_context
def user_set(ctx: click.Context, name: str, is_admin: bool) -> None:
    """Change whether a user is an admin."""
    from gpud.ledger.users import UnknownUser, set_admin

    with _ledger(ctx) as led:
        try:
            set_admin(led, name, is_admin)
        except UnknownUser as e:
            _fail(str(e))
    click.echo(f"{name} is {'now' if is_admin else 'no longer'} an admin", err=True)


@user.command("remove")
@click.argument("name")
@click.pass_context
def user_remove(ctx: click.Context, name: str) -> None:
    """Remove a user: their token stops working; their jobs and usage stay on record."""
    from gpud.ledger.users import UnknownUser, remove_user

    with _ledger(ctx) as led:
        try:
            remove_user(led, name)
        except UnknownUser as e:
            _fail(str(e))
    click.echo(f"removed {name} (queued and running jobs of theirs are not cancelled)", err=True)


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the users as JSON.")
@click.pass_context
def user_list(ctx: click.Context, as_json: bool) -> None:
    """List users with their quotas (never their tokens)."""
    from gpud.ledger.users import list_users

    with _ledger(ctx) as led:
        users = list_users(led)
    if as_json:
        click.echo(json.dumps([_user_dict(u) for u in users]))
        return
    if not users:
        click.echo("no users (root and the daemon's own user need none)", err=True)
        return
    from gpud_client.duration import format_duration

    def lim(v: Any, dur: bool = False) -> str:
        return "-" if v is None else (format_duration(v) if dur else str(v))

    click.echo(
        f"{'NAME':<20} {'ADMIN':<6} {'TOKEN':<6} {'GPUS':>5} {'QUEUED':>7} {'MAX TIMEOUT':>12}"
    )
    for u in users:
        click.echo(
            f"{u.name:<20} {'yes' if u.admin else 'no':<6} "
            f"{'yes' if u.token_hash else 'no':<6} {lim(u.quota.max_gpus):>5} "
            f"{lim(u.quota.max_queued):>7} {lim(u.quota.max_timeout, True):>12}"
        )


@admin.group()
def token() -> None:
    """Replace users' API tokens."""


@token.command("rotate")
@click.argument("name")
@click.option(
    "--no-token-file",
    is_flag=True,
    help="Only print the token; do not write it to ~NAME/.config/gpud/token.",
)
@click.pass_context
def token_rotate(ctx: click.Context, name: str, no_token_file: bool) -> None:
    """Give a user a new token; the old one stops working within a second."""
    from gpud.ledger.users import UnknownUser, set_token
    from gpud.users import hash_token, new_token

    new = new_token()
    with _ledger(ctx) as led:
        try:
            set_token(led, name, hash_token(new))
        except UnknownUser as e:
            _fail(str(e))
    _give_token(name, new, no_token_file)


@admin.group()
def quota() -> None:
    """Set users' limits."""


@quota.command("set")
@click.argument("name")
@click.option("--gpus", default=None, metavar="N|none", help="GPUs held at once.")
@click.option("--queued", default=None, metavar="N|none", help="Jobs queued at once.")
@click.option(
    "--max-timeout",
    default=None,
    metavar="DURATION|none",
    help="Longest timeout a job may ask for, e.g. 12h.",
)
@click.pass_context
def quota_set(
    ctx: click.Context, name: str, gpus: str | None, queued: str | None, max_timeout: str | None
) -> None:
    """Set a user's quotas; options not given keep their value, 'none' lifts a limit."""
    import dataclasses

    from gpud.ledger.users import UnknownUser, get_user, set_quota

    with _ledger(ctx) as led:
        try:
            q = get_user(led, name).quota
        except UnknownUser as e:
            _fail(str(e))
        changes: dict[str, Any] = {}
        if gpus is not None:
            changes["max_gpus"] = _quota_value(gpus, "int")
        if queued is not None:
            changes["max_queued"] = _quota_value(queued, "int")
        if max_timeout is not None:
            changes["max_timeout"] = _quota_value(max_timeout, "duration")
        q = set_quota(led, name, dataclasses.replace(q, **changes)).quota
    from gpud_client.duration import format_duration

    def shown(v: Any) -> str:
        return "unlimited" if v is None else str(v)

    timeout = "unlimited" if q.max_timeout is None else format_duration(q.max_timeout)
    click.echo(
        f"{name}: gpus {shown(q.max_gpus)}, queued {shown(q.max_queued)}, max timeout {timeout}",
        err=True,
    )


@admin.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@click.pass_context
def backup(ctx: click.Context, path: str, force: bool) -> None:
    """Copy the ledger to PATH with SQLite's online backup API (safe while the daemon
    runs): one consistent file, mode 0600, integrity-checked."""
    src_path = _where(ctx).ledger_path()
    dest = Path(path)
    if not src_path.exists():
        _fail(f"there is no ledger at {src_path}")
    if dest.exists() and not force:
        _fail(f"{dest} exists: pass --force to overwrite it, or choose another path")
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        src = sqlite3.connect(str(src_path), timeout=10.0)
        dst = sqlite3.connect(str(tmp))
        try:
            # Pages are copied in steps; a write by the daemon restarts the copy, so the
            # result is one consistent snapshot of the ledger.
            src.backup(dst, pages=1024)
            # A single self-contained file: leave WAL mode behind in the copy.
            dst.execute("PRAGMA journal_mode=DELETE")
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            jobs = dst.execute("SELECT count(*) FROM jobs").fetchone()[0]
            version = dst.execute("PRAGMA user_version").fetchone()[0]
        finally:
            dst.close()
            src.close()
        if check != "ok":
            _fail(
                f"the copy failed SQLite's integrity check ({check}); the ledger itself may "
                "be damaged"
            )
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, dest)
    except sqlite3.Error as e:
        _fail(f"backing up {src_path} failed: {e}")
    finally:
        tmp.unlink(missing_ok=True)
    size = dest.stat().st_size
    click.echo(
        f"backed up {src_path} to {dest}: {jobs} jobs, schema version {version}, "
        f"{size / 1e6:.1f} MB",
        err=True,
    )
