"""Query and path parameters of the HTTP API, each declared once with its range.

A :class:`Param` both reads its value from a request (422 ``invalid_parameter`` with the
valid range when it is out of it or of the wrong type) and describes itself to the
OpenAPI document, so the schema cannot drift from what the daemon enforces (issue #10:
``/openapi.json`` used to leave the ranges out, and valid-looking requests got 422).
Request bodies get the same from the msgspec constraints in :mod:`gpud_client.models`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request

from gpud_client.models import MAX_ID

__all__ = ["MAX_ID", "Param", "ParamError", "parse_id"]

Kind = Literal["integer", "number", "boolean", "string"]

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


class ParamError(ValueError):
    """A query parameter the daemon cannot accept; the message says the valid range."""


def parse_id(raw: str) -> int | None:
    """A path id (``/jobs/{job_id}``) as an int, or None when it names nothing that can
    exist: not ASCII digits (``"²"`` passes ``str.isdigit``), or beyond SQLite's INTEGER."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_ID else None


def _fmt(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    description: str
    lo: float | None = None
    hi: float | None = None
    #: the value when the parameter is absent or empty (None: the handler decides)
    default: Any = None
    choices: tuple[str, ...] | None = None

    def _range(self) -> str:
        lo = "" if self.lo is None else _fmt(self.lo)
        hi = "" if self.hi is None else _fmt(self.hi)
        return f"from {lo} to {hi}" if lo and hi else f"at least {lo}" if lo else f"at most {hi}"

    def get(self, request: Request) -> Any:
        """The parameter's value in ``request``; raises :class:`ParamError`."""
        raw = request.query_params.get(self.name)
        if self.kind == "boolean":
            low = (raw or "").lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return self.default if raw is None else False
            raise ParamError(f"{self.name} must be true or false")
        if raw is None or raw == "":
            return self.default
        if self.kind == "string":
            if self.choices is not None and raw not in self.choices:
                raise ParamError(f"{self.name} must be one of: {', '.join(self.choices)}")
            return raw
        value: int | float
        try:
            # Only plain ASCII numbers: int() would also take "٣" or "1_000", and a
            # 5,000-digit number is refused before int() spends time on it.
            if not raw.isascii() or len(raw) > 40:
                raise ValueError(raw)
            value = int(raw) if self.kind == "integer" else float(raw)
        except ValueError:
            what = "a whole number" if self.kind == "integer" else "a number"
            raise ParamError(f"{self.name} must be {what} {self._range()}") from None
        if (
            not math.isfinite(value)
            or (self.lo is not None and value < self.lo)
            or (self.hi is not None and value > self.hi)
        ):
            raise ParamError(f"{self.name} must be {self._range()}")
        return value

    def schema(self) -> dict[str, Any]:
        """This parameter as an OpenAPI 3.1 parameter object."""
        sch: dict[str, Any] = {"type": self.kind}
        if self.lo is not None:
            sch["minimum"] = self.lo
        if self.hi is not None:
            sch["maximum"] = self.hi
        if self.default is not None:
            sch["default"] = self.default
        if self.choices is not None:
            sch["enum"] = list(self.choices)
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "description": self.description,
            "schema": sch,
        }
