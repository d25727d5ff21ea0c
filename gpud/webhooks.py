"""Where webhooks may go (#14): the admin's ``webhooks`` setting and the check a submit's
``notify=`` URL passes. Pure, and below gpud.config (which parses the setting with it).

The default is "off": a daemon often runs as root on a shared box, where anyone who can
submit could otherwise make it POST to services listening only on its loopback or the
internal network (server-side request forgery). The admin opts in, host by host."""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

__all__ = ["check_url", "parse_webhooks"]

_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$|^\[[0-9a-f:.]+\]$|^[0-9a-f:.]+$")


def parse_webhooks(value: object) -> str | list[str]:
    """The ``webhooks`` setting: "off", "any", or hosts (a list, or comma-separated)."""
    if isinstance(value, str) and value.strip().lower() in ("off", "any", "none", ""):
        v = value.strip().lower()
        return "any" if v == "any" else "off"
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(h, str) for h in items):
        raise ValueError('"off", "any", or a list of host names, e.g. ["hooks.slack.com"]')
    hosts = [h.strip().lower() for h in items if h.strip()]
    for h in hosts:
        if not _HOST_RE.match(h):
            raise ValueError(
                f"{h!r} is not a host name (write the host only, no scheme, port or path)"
            )
    return hosts or "off"


def check_url(url: str, setting: str | Sequence[str]) -> str | None:
    """Why a job may not have this webhook here (None: it may)."""
    if setting == "off":
        return (
            "webhooks are off on this daemon: ask its admin to allow your webhook's "
            'host (webhooks = ["HOST"] in its config), or use --notify bell with '
            "gpud run in the foreground"
        )
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        parts, host = None, ""
    if parts is None or parts.scheme not in ("http", "https") or not host:
        return f"notify={url!r} is not a webhook URL: write http(s)://HOST/PATH"
    if setting != "any" and host not in setting:
        return (
            f"this daemon sends webhooks only to {', '.join(setting)}, not to {host}: "
            "ask its admin to add that host to its webhooks setting"
        )
    return None
