"""The client's API token: ``GPUD_TOKEN``, else a private token file.

The token file is ``$XDG_CONFIG_HOME/gpud/token`` (default ``~/.config/gpud/token``),
written by `sudo gpud admin user add NAME` for a Unix user, or by hand. Like ssh with a
private key, the client refuses a token file that others could read or write, or that
someone else owns: a token is a password, and one that others could read must be
replaced, not used.

On the daemon's Unix socket the kernel identifies the caller, and the token is not
needed (it is sent anyway, and ignored there); over TCP every request needs it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gpud_client.errors import GpudError
from gpud_client.paths import _xdg

__all__ = ["load_token", "token_path"]


def token_path() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "gpud" / "token"


def load_token() -> str | None:
    """The token to send: ``$GPUD_TOKEN``, else the token file's; None if neither exists.

    Raises GpudError for a token file that is not private (mode beyond 0600, or owned by
    someone else), naming the fix."""
    env = os.environ.get("GPUD_TOKEN", "").strip()
    if env:
        return env
    path = token_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise GpudError(f"cannot read the gpud token file {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GpudError(f"the gpud token file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise GpudError(
                f"refusing the gpud token file {path}: it belongs to uid {st.st_uid}, not to "
                "you; a token file must be your own (mode 0600)"
            )
        if st.st_mode & 0o077:
            raise GpudError(
                f"refusing the gpud token file {path}: its mode is "
                f"{stat.S_IMODE(st.st_mode):04o}, so others can read or change it. Run "
                f"`chmod 600 {path}`, and since others may have read it, ask an admin for a "
                "new token (`gpud admin token rotate NAME`)"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    token = data.decode("utf-8", "replace").strip()
    return token or None
