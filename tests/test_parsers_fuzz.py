"""Hypothesis on what parses people's input (issue #10): GPU requests, durations, sizes,
and how `gpud run` maps a function's parameters to options.

Each parser either returns a value inside its documented range or raises ValueError
with a message; nothing else escapes (an OverflowError out of a parser would be a
traceback in the CLI or a 500 in the daemon). Valid values round-trip.
"""

from __future__ import annotations

import inspect
import json
import keyword
import math
from typing import Any

import click
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gpud.cli_run import params_command
from gpud.domain import GpuRequest
from gpud_client.duration import format_duration, parse_duration, parse_size

GPU_TYPE = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,15}", fullmatch=True).filter(
    lambda t: t not in ("none", "cpu", "false")
)
#: Text that looks like what people type, plus anything at all.
NUMBERISH = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789.:,hmsdkgtib -+e_", max_size=40),
    st.integers(min_value=0, max_value=10**500).map(str),
)


# -- GPU requests ------------------------------------------------------------------------


@given(st.one_of(st.none(), NUMBERISH, st.lists(NUMBERISH, max_size=5)))
def test_a_gpu_request_parses_or_says_what_is_valid(spec: Any) -> None:
    try:
        req = GpuRequest.parse(spec)
    except ValueError as e:
        assert "GPU" in str(e) or "gpu" in str(e).lower()
        return
    if req is not None:
        assert req.options and all(1 <= n <= 64 for _, n in req.options)


@given(st.lists(st.tuples(GPU_TYPE, st.integers(1, 64)), min_size=1, max_size=4))
def test_gpu_requests_round_trip(options: list[tuple[str, int]]) -> None:
    req = GpuRequest(tuple(options))
    assert GpuRequest.parse(req.to_spec()) == req
    assert GpuRequest.parse(",".join(req.to_spec())) == req
    # A count of one may be left out, and case and spaces do not matter.
    loose = ", ".join((t.upper() if n == 1 else f" {t}:{n} ") for t, n in options)
    assert GpuRequest.parse(loose) == req


@given(GPU_TYPE, st.one_of(st.integers(max_value=0), st.integers(min_value=65)))
def test_gpu_counts_outside_1_to_64_are_refused(gpu_type: str, count: int) -> None:
    with pytest.raises(ValueError, match="count"):
        GpuRequest.parse(f"{gpu_type}:{count}")


# -- durations and sizes ---------------------------------------------------------------


@given(
    st.one_of(
        NUMBERISH,
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**30), max_value=10**30),
    )
)
def test_a_duration_parses_to_finite_seconds_or_says_what_is_valid(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        assert "expected a number of seconds" in str(e)
        return
    assert isinstance(seconds, float) and math.isfinite(seconds) and seconds >= 0


@given(st.integers(0, 400), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_durations_in_units_add_up_and_format_back(d: int, h: int, m: int, s: int) -> None:
    text = "".join(f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if n)
    assume(text)
    total = d * 86400 + h * 3600 + m * 60 + s
    assert parse_duration(text) == total
    assert parse_duration(text.upper().replace("D", "d ")) == total
    assert parse_duration(format_duration(total)) == total


@given(st.floats(0, 10**9, allow_nan=False))
def test_format_duration_reads_back_close(seconds: float) -> None:
    back = parse_duration(format_duration(seconds))
    assert abs(back - seconds) <= max(0.5, seconds * 1e-3)


@given(st.one_of(NUMBERISH, st.integers(min_value=-(10**30), max_value=10**30)))
def test_a_size_parses_to_positive_bytes_or_says_what_is_valid(value: Any) -> None:
    try:
        size = parse_size(value)
    except ValueError as e:
        assert "size" in str(e)
        return
    assert isinstance(size, int) and size > 0


@given(
    st.integers(1, 10**6),
    st.sampled_from(["", "k", "K", "m", "M", "g", "G", "t", "T"]),
    st.sampled_from(["", "b", "ib", "iB", "B"]),
)
def test_sizes_are_powers_of_1024(n: int, unit: str, suffix: str) -> None:
    assume(unit or not suffix.startswith("i"))
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    assert parse_size(f"{n}{unit}{suffix}") == n * 1024**power


# -- gpud run: a function's parameters as options ----------------------------------------

_NAME = st.from_regex(r"[a-z][a-z0-9]{0,6}(_[a-z0-9]{1,4})?", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n)
)  # a Python parameter is never called "as"
_VALUES: dict[type, st.SearchStrategy[Any]] = {
    int: st.integers(-(10**18), 10**18),
    float: st.floats(allow_nan=False, allow_infinity=False),
    str: st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20
    ),
    bool: st.booleans(),
    list: st.lists(st.integers(-1000, 1000), max_size=4),
}


def _fn(params: list[tuple[str, type, bool, Any]]) -> Any:
    """A function with these (name, annotation, has_default, default) parameters."""

    def f(**kw: Any) -> Any:
        return kw

    sig = [
        inspect.Parameter(
            n,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=t,
            default=v if d else inspect.Parameter.empty,
        )
        for n, t, d, v in params
    ]
    f.__signature__ = inspect.Signature(sig)  # type: ignore[attr-defined]
    f.__annotations__ = {n: t for n, t, _, _ in params}
    return f


@st.composite
def _signature_and_call(draw: st.DrawFn) -> tuple[Any, list[str], dict[str, Any]]:
    names = draw(st.lists(_NAME, min_size=1, max_size=6, unique=True))
    # "--no-x" belongs to a bool x: no other parameter may be called no_x.
    assume(not any(f"no_{a}" == b for a in names for b in names))
    params, argv, want = [], [], {}
    for name in names:
        typ = draw(st.sampled_from(list(_VALUES)))
        has_default = draw(st.booleans())
        default = draw(_VALUES[typ]) if has_default else None
        given_ = not has_default or draw(st.booleans())
        params.append((name, typ, has_default, default))
        opt = "--" + name.replace("_", "-")
        if not given_:
            want[name] = default
            continue
        value = draw(_VALUES[typ])
        want[name] = value
        if typ is bool:
            argv.append(opt if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [
                opt,
                json.dumps(value) if typ is list else repr(value) if typ is float else str(value),
            ]
    return _fn(params), argv, want


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(_signature_and_call())
def test_run_maps_parameters_to_typed_options(case: tuple[Any, list[str], dict[str, Any]]) -> None:
    fn, argv, want = case
    cmd = params_command(fn, "fn")
    got = cmd.main(argv, standalone_mode=False)
    assert got == want


@given(_NAME, st.sampled_from([int, float]), st.text(max_size=10))
def test_run_refuses_a_value_of_the_wrong_type_clearly(name: str, typ: type, raw: str) -> None:
    try:
        typ(raw)
        assume(False)
    except ValueError:
        pass
    cmd = params_command(_fn([(name, typ, False, None)]), "fn")
    with pytest.raises(click.BadParameter) as e:
        cmd.main(["--" + name.replace("_", "-"), raw], standalone_mode=False)
    assert "is not a valid" in e.value.format_message()
