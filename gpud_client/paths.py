"""Default locations shared by the daemon and the client.

Both sides call these functions, so a daemon started with no options and a client
created with no URL meet at the same socket without any configuration.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gpud_client.errors import GpudError

__all__ = [
    "SYSTEM_DATA_DIR",
    "SYSTEM_SOCKET",
    "client_config_path",
    "default_data_dir",
    "default_socket",
    "normalise_url",
    "resolve_url",
    "socket_url",
]

#: The socket of a system-wide daemon (run as root, e.g. by systemd).
SYSTEM_SOCKET = Path("/run/gpud/gpud.sock")
SYSTEM_DATA_DIR = Path("/var/lib/gpud")


def _is_root() -> bool:
    return os.geteuid() == 0


def _xdg(var: str, fallback: str) -> Path:
    # The XDG spec says a relative value must be ignored, as if it were unset.
    value = os.environ.get(var, "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def default_data_dir() -> Path:
    """Where the daemon keeps its ledger and job directories."""
    if _is_root():
        return SYSTEM_DATA_DIR
    return _xdg("XDG_DATA_HOME", ".local/share") / "gpud"


def default_socket() -> Path:
    """The Unix socket a daemon started by this user listens on by default."""
    if _is_root():
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "gpud" / "gpud.sock"
    return default_data_dir() / "gpud.sock"


def client_config_path() -> Path:
    """The client's optional config file (``url = "..."``)."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "gpud" / "client.toml"


def socket_url(path: Path | str) -> str:
    return f"unix://{Path(path)}"


def normalise_url(url: str, source: str = "the url argument") -> str:
    """Check a daemon URL; a bare absolute path is taken as a Unix socket."""
    url = url.strip()
    if url.startswith("/"):  # a bare socket path is unambiguous enough to accept
        return socket_url(url)
    if url.startswith(("unix://", "http://", "https://")):
        return url
    raise GpudError(
        f"invalid gpud URL {url!r} (from {source}): use unix:///path/to/gpud.sock "
        "or http://host:port"
    )


def _config_url() -> str | None:
    path = client_config_path()
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None  # the common case: no config, and no TOML parser to import (#12)
    except OSError as e:
        raise GpudError(f"cannot read the gpud client config {path}: {e}") from e
    import tomllib

    try:
        with f:
            config = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        # A broken config is reported, not skipped: silently falling back to another
        # daemon than the one configured would be far more confusing.
        raise GpudError(f"cannot read the gpud client config {path}: {e}") from e
    url = config.get("url")
    if url is None:
        return None
    if not isinstance(url, str):
        raise GpudError(f'{path}: `url` must be a string, e.g. url = "http://host:8000"')
    return normalise_url(url, str(path))


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def resolve_url() -> str:
    """The daemon's URL: ``$GPUD_URL``, else the client config's ``url``, else the first
    socket that exists among this user's default and the system one.

    When no socket exists this still returns ``unix://`` + :func:`default_socket`, so that
    the error raised on connecting can name where a daemon was expected.
    """
    env = os.environ.get("GPUD_URL", "").strip()
    if env:
        return normalise_url(env, "GPUD_URL")
    configured = _config_url()
    if configured:
        return configured
    candidates = [default_socket()]
    if SYSTEM_SOCKET not in candidates:
        candidates.append(SYSTEM_SOCKET)
    for candidate in candidates:
        if _is_socket(candidate):
            return socket_url(candidate)
    return socket_url(default_socket())
