"""parse_duration: the timeout syntax shared by @app.function and the CLI."""

from __future__ import annotations

import math

import pytest

from gpud_client import format_duration, parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        (0, 0.0),
        ("90", 90.0),
        ("2.5", 2.5),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 86400 + 7200 + 180 + 4.0),
        ("1.5h", 5400.0),
        (" 2H ", 7200.0),
        ("1h 30m", 5400.0),
        ("0.5s", 0.5),
    ],
)
def test_parse_good(value: int | float | str, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "h",
        "10x",
        "1h30",
        "30m1h",
        "1h1h",
        "-5",
        "-5s",
        "1 h x",
        "abc",
        "1e3",
        "nan",
        "inf",
        -1,
        -0.5,
        math.nan,
        math.inf,
        True,
        None,
        [90],
    ],
)
def test_parse_bad(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)  # type: ignore[arg-type]
    message = str(info.value)
    # The message must teach the syntax, not merely reject the input.
    assert "number of seconds" in message
    assert "'90s'" in message and "'1h30m'" in message


@pytest.mark.parametrize("seconds", [0, 1, 45, 59.5, 60, 90, 3600, 5400, 86400, 90061])
def test_format_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.5)


def test_format_is_compact() -> None:
    assert format_duration(30) == "30s"
    assert format_duration(5400) == "1h30m"
    assert format_duration(2 * 86400) == "2d"
