"""Durations as people write them: ``90``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``.

Shared by the ``timeout=`` option of ``@app.function`` and the CLI's ``--timeout``.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_size", "format_duration", "parse_duration"]

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_ORDER = "dhms"
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_BARE = re.compile(rf"^(?:{_NUMBER})$")
_PART = re.compile(rf"({_NUMBER})\s*([dhms])", re.IGNORECASE)
_ACCEPTED = (
    "a number of seconds (e.g. 90 or 1.5) or a duration such as '90s', '30m', '2h', "
    "'1d' or '1h30m' (units d, h, m, s, largest first)"
)


def parse_duration(value: int | float | str) -> float:
    """Return ``value`` in seconds (a non-negative, finite float).

    Raises ValueError naming the accepted forms for anything else, including units out
    of order or repeated ("30m1h", "1h1h"): such a string is more likely a typo than
    what was meant.
    """
    if isinstance(value, bool):  # True is an int; "timeout=True" is surely a mistake
        raise ValueError(f"invalid duration {value!r}: expected {_ACCEPTED}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_str(value)
    else:
        raise ValueError(
            f"invalid duration {value!r} of type {type(value).__name__}: expected {_ACCEPTED}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: expected {_ACCEPTED}")
    return seconds


def _parse_str(text: str) -> float:
    s = text.strip().lower()
    if _BARE.match(s):
        return float(s)
    total = 0.0
    pos = 0
    last_unit = -1
    for m in _PART.finditer(s):
        # Everything between two parts may only be whitespace: "1h x 30m" is rejected.
        if s[pos : m.start()].strip():
            break
        unit_rank = _ORDER.index(m.group(2))
        if unit_rank <= last_unit:
            break
        last_unit = unit_rank
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    else:
        if last_unit >= 0 and not s[pos:].strip():
            return total
    raise ValueError(f"invalid duration {text!r}: expected {_ACCEPTED}")


def format_duration(seconds: float) -> str:
    """The compact form :func:`parse_duration` reads back: ``"45s"``, ``"1h30m"``, ``"2d"``."""
    if seconds < 60:
        if seconds == int(seconds):
            return f"{int(seconds)}s"
        text = f"{seconds:.3g}"
        if "e" in text:  # "1.19e-07s" would not parse back: tiny values in plain digits
            text = f"{seconds:.6f}".rstrip("0").rstrip(".")
        return f"{text}s"
    rest = round(seconds)
    parts = []
    for unit in _ORDER:
        size = int(_UNITS[unit])
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: int | str) -> int:
    """Bytes from an int or "512M", "4G", "4GiB", "1.5g" (powers of 1024, as podman and
    docker read them); raises ValueError saying what is accepted."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be positive, not {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if m is None:
        raise ValueError(
            f"not a size: {value!r}; write bytes or a number with K, M, G or T "
            "(powers of 1024), e.g. '512M' or '16GiB'"
        )
    number = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not math.isfinite(number):  # "9" * 400 is a float, but no int (#10)
        raise ValueError(f"not a size: {value!r} is too large")
    size = int(number)
    if size <= 0:
        raise ValueError(f"a size must be positive, not {value!r}")
    return size
