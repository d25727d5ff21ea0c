"""Numbers at the API's edge (issue #10, items 4 and 7), against an in-process daemon.

Every number a client sends is checked against a range declared once (msgspec ``Meta``
on the wire models, :class:`gpud.api_params.Param` for query parameters): out of range
is a JSON 4xx that says the valid range, never a 500, and ``/openapi.json`` carries the
same ranges. Plus the daemon's log: the same traceback is written once a minute at most.
"""

from __future__ import annotations

import logging
import sys

import httpx
import pytest

from gpud.logthrottle import TracebackThrottle
from gpud_client.models import MAX_ID

from .test_api import assert_error, submit_body


@pytest.fixture
async def http(served):  # type: ignore[no-untyped-def]
    transport = httpx.AsyncHTTPTransport(uds=str(served.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://gpud") as c:
        yield c


HUGE = [str(2**63), str(2**64 + 5), "9" * 40, "9" * 5000]


@pytest.mark.parametrize("raw", HUGE + ["²", "١٢", "0", "-1", "1e3"])
async def test_job_ids_beyond_sqlite_are_404_on_every_job_route(
    http: httpx.AsyncClient, raw: str
) -> None:
    for method, path in [
        ("GET", ""),
        ("GET", "/logs"),
        ("GET", "/result"),
        ("GET", "/wait?timeout=0"),
        ("GET", "/outcome"),
        ("POST", "/cancel"),
    ]:
        r = await http.request(method, f"/v1/jobs/{raw}{path}")
        detail = assert_error(r, 404, "not_found")["detail"]
        assert str(MAX_ID) in detail, detail
        assert len(detail) < 300  # a 5,000-digit id is not echoed back whole
    r = await http.request("DELETE", f"/v1/snapshots/{raw}")
    assert_error(r, 422, "invalid_snapshot_id")


async def test_the_largest_id_is_merely_unknown(http: httpx.AsyncClient) -> None:
    assert_error(await http.get(f"/v1/jobs/{MAX_ID}"), 404, "not_found")
    assert_error(await http.get(f"/v1/events?job_id={MAX_ID}"), 404, "not_found")


@pytest.mark.parametrize(
    "query, words",
    [
        ("/v1/jobs?limit=1001", "limit must be from 1 to 1000"),
        ("/v1/jobs?limit=1.5", "limit must be a whole number from 1 to 1000"),
        (f"/v1/jobs?cursor={2**63}", f"cursor must be from 1 to {MAX_ID}"),
        ("/v1/jobs?cursor=" + "9" * 5000, "cursor must be a whole number"),
        ("/v1/jobs?limit=%D9%A3", "limit must be a whole number"),  # Arabic-Indic 3
        ("/v1/jobs/1/wait?timeout=nan", "timeout must be from 0 to 60"),
        ("/v1/jobs/1/wait?timeout=1e400", "timeout must be from 0 to 60"),
        ("/v1/jobs/1/logs?offset=-1", "offset must be from 0 to"),
        ("/v1/jobs/1/logs?follow=maybe", "follow must be true or false"),
        (f"/v1/events?after={2**64}", f"after must be from 0 to {MAX_ID}"),
        ("/v1/events?limit=0", "limit must be from 1 to 1000"),
        (f"/v1/events?job_id={2**63}", "job_id must be from 1 to"),
        ("/v1/queue?offset=" + str(2**40), "offset must be from 0 to 2147483648"),
        ("/v1/gpus/history?since=inf", "since must be from 0 to 1e+12"),
        ("/v1/usage?since=-5", "since must be from 0 to 1e+11"),
        ("/v1/usage?until=1e300", "until must be from 0 to 1e+11"),
        ("/v1/usage?by=week", "by must be one of: user, day, gpu-type"),
    ],
)
async def test_query_parameters_out_of_range_say_the_range(
    http: httpx.AsyncClient, query: str, words: str
) -> None:
    detail = assert_error(await http.get(query), 422, "invalid_parameter")["detail"]
    assert words in detail, detail


@pytest.mark.parametrize(
    "field, value, code, words",
    [
        ("memory", 2**80, "invalid_memory", "memory: from 16777216 to 9007199254740992"),
        ("memory", 2**53 + 1, "invalid_memory", "or null"),
        ("memory", 1024, "invalid_memory", ">= 16777216"),
        ("cpu", 1e300, "invalid_cpu", "cpu: from 0.01 to 4096"),
        ("timeout", -1, "invalid_timeout", "timeout: above 0 to 315360000 or null"),
        ("keep_warm", 2**70, "invalid_keep_warm", "keep_warm: from 0 to"),
        ("retries", 2**64, "invalid_retries", "retries: from 0 to 20"),
        ("priority", 1001, "invalid_priority", "priority: from -1000 to 1000"),
        ("name", "", "invalid_name", "name: 1 to 512 characters"),
        ("name", "n" * 513, "invalid_name", "name: 1 to 512 characters"),
        ("python", "3" * 65, "invalid_request", "python: 1 to 64 characters"),
        ("env", {"A": "nul\0"}, "invalid_env", "env"),
        ("env", {"": "x"}, "invalid_env", "env"),
    ],
)
async def test_submit_fields_out_of_range_say_the_range(
    http: httpx.AsyncClient, field: str, value: object, code: str, words: str
) -> None:
    r = await http.post("/v1/jobs", content=submit_body(**{field: value}))
    detail = assert_error(r, 422, code)["detail"]
    assert words in detail and field in detail, detail


async def test_batch_sizes(http: httpx.AsyncClient) -> None:
    import json

    req = json.loads(submit_body())
    del req["args"]
    req["inputs"] = []
    r = await http.post("/v1/jobs/batch", content=json.dumps(req))
    assert "inputs: 1 to 100000 items" in assert_error(r, 422, "invalid_batch")["detail"]


async def test_openapi_carries_the_enforced_ranges(served, http: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    doc = (await http.get("/openapi.json")).json()
    params = {
        (path, p["name"]): p["schema"]
        for path, item in doc["paths"].items()
        for op in item.values()
        for p in op.get("parameters", [])
    }
    assert params[("/v1/jobs", "limit")] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 1000,
        "default": 50,
    }
    assert params[("/v1/jobs/{job_id}", "job_id")]["maximum"] == MAX_ID
    assert params[("/v1/jobs/{job_id}/wait", "timeout")]["maximum"] == 60.0
    assert params[("/v1/events", "limit")]["maximum"] == 1000
    assert params[("/v1/usage", "since")] == {"type": "number", "minimum": 0.0, "maximum": 1e11}
    assert params[("/v1/usage", "by")]["enum"] == ["user", "day", "gpu-type"]
    schemas = doc["components"]["schemas"]
    submit = schemas["SubmitRequest"]["properties"]
    assert submit["name"]["maxLength"] == 512 and submit["name"]["minLength"] == 1
    assert schemas["BatchSubmitRequest"]["properties"]["inputs"]["maxItems"] == 100_000
    assert submit["retries"]["maximum"] == 20
    # The served document narrows what this daemon's configuration narrows.
    cfg = served.daemon.config
    timeout = next(a for a in submit["timeout"]["anyOf"] if a.get("type") == "number")
    assert timeout["maximum"] == cfg.max_timeout and timeout["exclusiveMinimum"] == 0
    warm = next(a for a in submit["keep_warm"]["anyOf"] if a.get("type") == "number")
    assert warm["maximum"] == cfg.keep_warm_max
    # And a request inside every documented range is not refused for its numbers.
    r = await http.post(
        "/v1/jobs",
        content=submit_body(
            timeout=timeout["maximum"], keep_warm=warm["maximum"], memory=2**53, retries=20
        ),
    )
    assert r.status_code == 201, r.text
    await http.post(f"/v1/jobs/{r.json()['id']}/cancel")


def _fail_here() -> None:
    raise RuntimeError("boom")


def _record(exc_site: bool = True) -> logging.LogRecord:
    try:
        _fail_here() if exc_site else int("x")
    except Exception:
        info = sys.exc_info()
    return logging.LogRecord(
        "gpud.api", logging.ERROR, __file__, 1, "internal error on %s", ("GET /v1/x",), info
    )


def test_the_same_traceback_is_logged_once_a_minute_with_a_count() -> None:
    now = [1000.0]
    throttle = TracebackThrottle(60.0, clock=lambda: now[0])
    first = _record()
    assert throttle.filter(first) and first.getMessage() == "internal error on GET /v1/x"
    assert [throttle.filter(_record()) for _ in range(500)] == [False] * 500
    # Another site is its own; a record without a traceback is never held back.
    assert throttle.filter(_record(exc_site=False))
    plain = logging.LogRecord("gpud.api", logging.WARNING, __file__, 1, "refused", (), None)
    assert all(throttle.filter(plain) for _ in range(3))
    now[0] += 61
    later = _record()
    assert throttle.filter(later)
    assert "[500 more like this in the last 61 s were not logged]" in later.getMessage()
    assert not throttle.filter(_record())


def test_the_throttle_remembers_a_bounded_number_of_sites() -> None:
    throttle = TracebackThrottle(60.0, clock=lambda: 0.0, max_sites=3)
    records = []
    for i in range(10):  # ten sites: ten distinct lines that raise
        try:
            exec(compile("\n" * i + "raise ValueError()", "<site>", "exec"))
        except ValueError:
            records.append(logging.LogRecord("x", logging.ERROR, "", 1, "m", (), sys.exc_info()))
    assert all(throttle.filter(r) for r in records)
    assert len(throttle._sites) == 3


def test_install_throttles_what_every_logger_propagates() -> None:
    """`gpud serve` installs it on the root logger's handlers, so gpud's own tracebacks
    and hypercorn's (its errorlog is the gpud.http logger) are both held back."""
    import io

    from gpud import logthrottle

    top = logging.getLogger("throttle-test")
    top.propagate = False
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    top.addHandler(handler)
    try:
        logthrottle.install(60.0, logger=top)
        for name in ("throttle-test.api", "throttle-test.http"):
            for _ in range(50):
                try:
                    _fail_here()
                except RuntimeError:
                    logging.getLogger(name).exception("internal error")
    finally:
        top.removeHandler(handler)
    # One site, whichever logger reported it: one traceback in all.
    assert out.getvalue().count("Traceback (most recent call last)") == 1


def test_usage_by_day_of_a_running_job_ends_now_not_at_a_far_until() -> None:
    """`GET /v1/usage?by=day&until=1e11` cut a running attempt into 1.1 million days
    (12 s on the event loop, a 100 MB answer) before the report took `now` (#10)."""
    import time

    from gpud.accounting import report
    from gpud.ledger.usage import AttemptUsage

    now = time.time()
    running = AttemptUsage(1, 0, "alice", now - 10, None, ("h100",), None, None)
    t0 = time.monotonic()
    r = report([running], since=0, until=1e11, by="day", now=now)
    assert time.monotonic() - t0 < 1 and 1 <= len(r.lines) <= 2
    assert abs(r.total.wall_seconds - 10) < 0.2 and abs(r.total.gpu_seconds - 10) < 0.2


async def test_usage_by_day_with_a_far_until_answers_at_once(http: httpx.AsyncClient) -> None:
    import time

    import trio

    from .test_auth import body

    r = await http.post("/v1/jobs", content=body(seconds=30))
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    with trio.fail_after(20):
        while (await http.get(f"/v1/jobs/{jid}")).json()["state"] != "running":  # noqa: ASYNC110
            await trio.sleep(0.05)
    t0 = time.monotonic()
    r = await http.get("/v1/usage?by=day&since=0&until=1e11")
    assert r.status_code == 200 and time.monotonic() - t0 < 2
    assert len(r.json()["lines"]) <= 2
    await http.post(f"/v1/jobs/{jid}/cancel")
