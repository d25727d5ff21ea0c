"""What one user can learn about another's jobs (issue #10, item 3).

Two users (real Unix users as root, as in tests/test_auth.py) and an admin against a real
daemon over TCP. docs/architecture.md: job ids and owners are public (honest queueing:
"GPU 0 held by job 41 (alice)"); job names, arguments, logs and results stay private.
Every read endpoint a user can reach is checked for another user's private strings.
"""

from __future__ import annotations

import httpx
import trio

from gpud.api_watch import OTHERS_JOB

# Fixtures shared with the authentication tests: alice, bob and carol (admin) with tokens.
from .test_auth import bearer, body, people, tcp, unix_users_or_names  # noqa: F401

SECRET_NAME = "alice_secret_project.train"
SECRET_ENV = "hunter2-env-value"


async def _queue_settled(tcp: httpx.AsyncClient, token: str, n: int) -> list[dict]:  # noqa: F811
    """The queue once the scheduler has placed all ``n`` queued jobs."""
    with trio.fail_after(20):
        while True:  # noqa: ASYNC110 - polling the API
            page = (await tcp.get("/v1/queue", headers=bearer(token))).json()
            if page["total"] == n and all(j["position"] for j in page["jobs"]):
                return list(page["jobs"])
            await trio.sleep(0.05)


async def test_others_see_the_queue_but_not_what_is_private(people, tcp: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    (alice, a_tok), (bob, b_tok), (_, c_tok) = people["alice"], people["bob"], people["carol"]
    private = {"name": SECRET_NAME, "env": {"TRAINING_SECRET": SECRET_ENV}}
    # alice's first job holds both H100s; her second and bob's wait behind it.
    r = await tcp.post(
        "/v1/jobs", headers=bearer(a_tok), content=body(gpu="h100:2", seconds=30, **private)
    )
    assert r.status_code == 201, r.text
    held = r.json()["id"]
    r = await tcp.post(
        "/v1/jobs",
        headers=bearer(a_tok),
        content=body(gpu="h100", memory=2**30, retries=3, **private),
    )
    assert r.status_code == 201, r.text
    a_queued = r.json()["id"]
    r = await tcp.post("/v1/jobs", headers=bearer(b_tok), content=body(gpu="h100", name="bob.eval"))
    assert r.status_code == 201, r.text
    b_queued = r.json()["id"]
    with trio.fail_after(20):
        # Polling the API: there is no event to wait on in another process.
        while (await tcp.get(f"/v1/jobs/{held}", headers=bearer(a_tok))).json()[  # noqa: ASYNC110
            "state"
        ] != "running":
            await trio.sleep(0.05)

    # bob sees the whole queue, so his position makes sense (fair share puts his job
    # first, as alice holds two GPUs already) ...
    queue = await _queue_settled(tcp, b_tok, 2)
    assert {j["id"] for j in queue} == {a_queued, b_queued}
    assert [j["position"] for j in queue] == [1, 2]
    theirs, mine = sorted(queue, key=lambda j: j["id"] != a_queued)
    # ... with what the queue needs: owner, request, state, priority, timeout, reason ...
    assert theirs["owner"] == alice and theirs["gpu"] == ["h100:1"]
    assert theirs["state"] == "queued" and theirs["private"] is True
    assert f"held by job {held} ({alice})" in theirs["reason"]
    # ... and nothing private to alice: no name, Python, limits.
    assert theirs["name"] == OTHERS_JOB
    assert (theirs["python"], theirs["memory"], theirs["has_result"]) == ("", None, False)
    assert theirs["python_path"] is None and theirs["python_prefix"] is None
    # bob's own entry is whole; it names the job holding the GPUs by id and owner.
    assert mine["name"] == "bob.eval" and mine["private"] is False
    assert f"job {held} ({alice})" in mine["reason"]

    # Nothing bob can read carries alice's job name or env, anywhere in the bytes.
    as_bob = bearer(b_tok)
    for path in (
        "/v1/queue",
        "/v1/queue?limit=1000",
        "/v1/events",
        "/v1/events?limit=1000",
        "/v1/gpus",
        "/v1/gpus/history",
        "/v1/jobs",
        "/v1/jobs?state=queued,running",
        f"/v1/jobs/{b_queued}",
        "/v1/usage",
        "/v1/usage?by=day",
        "/v1/snapshots",
        "/v1/whoami",
    ):
        r = await tcp.get(path, headers=as_bob)
        assert r.status_code == 200, (path, r.text)
        assert SECRET_NAME not in r.text and SECRET_ENV not in r.text, path
    # The GPUs show who holds them (public), not what runs there.
    gpus = (await tcp.get("/v1/gpus", headers=as_bob)).json()["gpus"]
    assert sorted((g["job_id"], g["owner"]) for g in gpus if g["job_id"]) == [
        (held, alice),
        (held, alice),
    ]
    # The events bob gets are his own job's only.
    events = (await tcp.get("/v1/events", headers=as_bob)).json()["events"]
    assert events and {e["job_id"] for e in events} == {b_queued}
    # Reading alice's jobs directly is refused, without echoing their contents.
    for path in (
        f"/v1/jobs/{held}",
        f"/v1/jobs/{held}/logs",
        f"/v1/jobs/{a_queued}/outcome",
        f"/v1/events?job_id={held}",
    ):
        r = await tcp.get(path, headers=as_bob)
        assert r.status_code == 403 and SECRET_NAME not in r.text, path

    # alice sees her own jobs in full, bob's as another user's; the admin sees all in full.
    a_view = {j["id"]: j for j in await _queue_settled(tcp, a_tok, 2)}
    assert a_view[a_queued]["name"] == SECRET_NAME and a_view[a_queued]["memory"] == 2**30
    assert a_view[a_queued]["python_path"]  # the interpreter bob's view left out
    assert a_view[b_queued]["name"] == OTHERS_JOB and a_view[b_queued]["owner"] == bob
    c_view = await _queue_settled(tcp, c_tok, 2)
    assert {j["name"] for j in c_view} == {SECRET_NAME, "bob.eval"}
    assert not any(j["private"] for j in c_view)
    for jid in (held, a_queued, b_queued):
        await tcp.post(f"/v1/jobs/{jid}/cancel", headers=bearer(c_tok))
