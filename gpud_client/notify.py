"""``notify=`` and ``notify_on=``, checked where they are written (#14).

``notify`` is a webhook URL the daemon POSTs a JSON summary to when the job ends (if its
admin allows the URL's host); ``notify_on`` the final states that do it (default: all).
``gpud run --notify bell`` rings the terminal instead, client-side (gpud.cli_run)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["FINAL_STATES", "notify_options", "parse_states"]

FINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out", "lost")


def parse_states(states: str | Sequence[str]) -> tuple[str, ...]:
    """Final states from a list or a comma-separated string ("failed,timed_out")."""
    items = states.split(",") if isinstance(states, str) else list(states)
    out: list[str] = []
    for s in items:
        if not isinstance(s, str):
            raise TypeError(f"notify_on takes state names, not {s!r}")
        name = s.strip().lower().replace("-", "_").replace(" ", "_")
        if name in ("", "end", "ended", "all", "any"):
            if name:
                out.extend(FINAL_STATES)
            continue
        if name not in FINAL_STATES:
            raise ValueError(
                f"notify_on: {s!r} is not a final state; use some of "
                f"{', '.join(FINAL_STATES)} (or 'all')"
            )
        out.append(name)
    if not out:
        raise ValueError("notify_on names no state: use some of " + ", ".join(FINAL_STATES))
    return tuple(dict.fromkeys(out))


def notify_options(notify: str | None, notify_on: Any) -> dict[str, Any]:
    if notify is not None and (
        not isinstance(notify, str) or not notify.startswith(("http://", "https://"))
    ):
        raise ValueError(f"notify must be a webhook URL (http:// or https://), not {notify!r}")
    return {"notify": notify, "notify_on": None if notify_on is None else parse_states(notify_on)}
