"""The HTTP API against a daemon in the test's nursery: errors as JSON, submit, list, GPUs."""

from __future__ import annotations

import sys

import cloudpickle
import httpx
import msgspec
import pytest

from gpud_client.models import JobInfo, JobList, SubmitRequest

PY = "{}.{}.{}".format(*sys.version_info[:3])


def _square(x: int) -> int:
    return x * x


def by_value(obj: object) -> bytes:
    """Pickle with this test module by value, as the client does for user modules."""
    mod = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(mod)
    try:
        return cloudpickle.dumps(obj)
    finally:
        cloudpickle.unregister_pickle_by_value(mod)


def submit_body(**kw: object) -> bytes:
    req = SubmitRequest(
        name="t.square", function=by_value(_square), args=cloudpickle.dumps(((7,), {})), python=PY
    )
    body = msgspec.to_builtins(req)
    body.update(kw)
    return msgspec.json.encode(body)


@pytest.fixture
async def http(served):  # type: ignore[no-untyped-def]
    transport = httpx.AsyncHTTPTransport(uds=str(served.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://gpud") as c:
        yield c


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error"] == code and body["detail"]
    return body


async def test_health_and_openapi(http: httpx.AsyncClient) -> None:
    h = (await http.get("/v1/health")).json()
    assert h["status"] == "ok" and h["gpu_source"] == "fake"
    doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.") and "/v1/jobs/{job_id}/logs" in doc["paths"]
    assert "SubmitRequest" in doc["components"]["schemas"]


async def test_unknown_route_and_method_are_json(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/v1/nope"), 404, "not_found")
    assert_error(await http.delete("/v1/jobs"), 405, "method_not_allowed")


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    assert_error(await http.post("/v1/jobs", content=b"{not json"), 400, "malformed_json")


@pytest.mark.parametrize(
    "body, code",
    [
        (b'{"name": "x"}', "invalid_request"),
        (submit_body(gpu="h100:0"), "invalid_gpu"),
        (submit_body(timeout=10**6), "refused"),  # above this daemon's max_timeout
        (submit_body(timeout=10**12), "invalid_timeout"),  # above any daemon's (#10)
        (submit_body(timeout=0), "invalid_timeout"),
        (submit_body(memory=2**80), "invalid_memory"),  # was a 500 from SQLite (#10)
        (submit_body(priority=-(2**70)), "invalid_priority"),
        (submit_body(gpu="h100:3"), "refused"),
        (submit_body(gpu="a100"), "refused"),
        (submit_body(python="2.7.18"), "refused"),
        (submit_body(retries=99), "invalid_retries"),
        (submit_body(unknown_field=1), "invalid_request"),
        (submit_body(env={"A=B": "x"}), "invalid_env"),
    ],
)
async def test_bad_submits_are_422(http: httpx.AsyncClient, body: bytes, code: str) -> None:
    detail = assert_error(await http.post("/v1/jobs", content=body), 422, code)["detail"]
    if code == "refused" and b"h100:3" in body:
        assert "3 x h100" in detail and "2 x h100" in detail
    if code == "refused" and b"2.7.18" in body:
        assert "2.7.18" in detail and PY.rsplit(".", 1)[0] in detail


# The daemon answers 413 before reading the whole body; httpx then leaves its request
# stream generator unfinished, which is httpx's business, not the daemon's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_oversized_body_is_413(served, http: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    limit = served.daemon.config.max_body_bytes
    big = b"x" * (limit + 1)
    assert_error(await http.post("/v1/jobs", content=big), 413, "body_too_large")


async def test_unknown_job_is_404(http: httpx.AsyncClient) -> None:
    for path in ("/v1/jobs/12345", "/v1/jobs/12345/logs", "/v1/jobs/12345/result", "/v1/jobs/abc"):
        assert_error(await http.get(path), 404, "not_found")
    assert_error(await http.post("/v1/jobs/12345/cancel"), 404, "not_found")


async def test_bad_query_parameters_are_422(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/v1/jobs?state=bogus"), 422, "invalid_parameter")
    assert_error(await http.get("/v1/jobs?limit=0"), 422, "invalid_parameter")
    assert_error(await http.get("/v1/jobs/1/wait?timeout=x"), 422, "invalid_parameter")


async def test_submit_wait_result_roundtrip(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/jobs", content=submit_body(gpu="h100"))
    assert r.status_code == 201, r.text
    job = msgspec.json.decode(r.content, type=JobInfo)
    assert job.state in ("queued", "starting", "running") and job.gpu == ["h100:1"]
    r = await http.get(f"/v1/jobs/{job.id}/wait", params={"timeout": 30})
    done = msgspec.json.decode(r.content, type=JobInfo)
    assert done.state == "succeeded", done
    assert len(done.gpus) == 1 and done.gpu_indices in ([0], [1])
    res = await http.get(f"/v1/jobs/{job.id}/result")
    assert res.status_code == 200
    assert cloudpickle.loads(res.content) == {"ok": True, "value": 49}
    page = msgspec.json.decode((await http.get("/v1/jobs")).content, type=JobList)
    assert page.jobs[0].id == job.id


async def test_result_of_unfinished_job_is_409(served, http: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    # Both H100s busy with one job each, then a third waits: its result is not ready.
    import time

    def _sleep(s: float) -> None:
        time.sleep(s)

    body = msgspec.to_builtins(
        SubmitRequest(
            name="t.sleep",
            function=by_value(_sleep),
            args=cloudpickle.dumps(((30,), {})),
            python=PY,
            gpu="h100:2",
        )
    )
    first = (await http.post("/v1/jobs", content=msgspec.json.encode(body))).json()
    second = (await http.post("/v1/jobs", content=msgspec.json.encode(body))).json()
    assert_error(await http.get(f"/v1/jobs/{second['id']}/result"), 409, "not_finished")
    info = (await http.get(f"/v1/jobs/{second['id']}")).json()
    assert info["state"] == "queued" and info["position"] == 1
    assert f"held by job {first['id']}" in info["reason"], info["reason"]
    gpus = (await http.get("/v1/gpus")).json()
    assert {g["job_id"] for g in gpus["gpus"] if g["type"] == "h100"} == {first["id"]}
    for j in (second, first):
        assert (await http.post(f"/v1/jobs/{j['id']}/cancel")).json()["state"] == "cancelled"


async def test_gpu_with_foreign_process_is_not_handed_out(served, http: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    """A process gpud did not start on GPU 0 (NVML sees it): jobs go elsewhere or wait."""
    import trio

    from gpud.domain import GpuProcess

    inv = served.daemon.inventory
    inv.set_processes(0, [GpuProcess(pid=999_999, used_memory=1 << 30)])
    inv.set_processes(1, [GpuProcess(pid=999_998, used_memory=1 << 30)])
    with trio.fail_after(10):
        while not all(g.foreign_pids for g in served.daemon.gpus[:2]):  # noqa: ASYNC110
            await trio.sleep(0.05)
    gpus = (await http.get("/v1/gpus")).json()["gpus"]
    assert [g["busy_foreign"] for g in gpus] == [True, True, False]
    job = (await http.post("/v1/jobs", content=submit_body(gpu="h100"))).json()
    with trio.fail_after(10):
        while (info := (await http.get(f"/v1/jobs/{job['id']}")).json())["reason"] is None:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert info["state"] == "queued"
    assert "busy with processes gpud did not start" in info["reason"], info["reason"]
    assert "999999" in info["reason"]
    inv.set_processes(0, [])  # the foreign process went away: the job starts on GPU 0
    done = (await http.get(f"/v1/jobs/{job['id']}/wait", params={"timeout": 30})).json()
    assert done["state"] == "succeeded" and done["gpu_indices"] == [0]


async def test_cancel_right_after_submit_never_leaves_a_ghost(  # type: ignore[no-untyped-def]
    served, http: httpx.AsyncClient
) -> None:
    """Cancel racing the scheduler's start: every job ends cancelled (or ran to its end),
    nothing stays 'starting' in the daemon's memory, and the queue keeps moving."""
    import trio

    ids = []
    for _ in range(40):
        job = (await http.post("/v1/jobs", content=submit_body())).json()
        ids.append(job["id"])
        r = await http.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["state"] in ("cancelled", "succeeded"), r.json()
    from gpud.domain import FINAL

    with trio.fail_after(20):
        # get() answers from the daemon's memory while it holds the job: a ghost shows.
        while any([(await served.daemon.get(i)).state not in FINAL for i in ids]):  # noqa: ASYNC110
            await trio.sleep(0.05)
    led_states = {(await http.get(f"/v1/jobs/{i}")).json()["state"] for i in ids}
    assert led_states <= {"cancelled", "succeeded"}
    last = (await http.post("/v1/jobs", content=submit_body())).json()
    done = (await http.get(f"/v1/jobs/{last['id']}/wait", params={"timeout": 30})).json()
    assert done["state"] == "succeeded"
