"""Authentication and authorisation (issue #5) against an in-process daemon.

Over TCP every request needs a token; on the Unix socket the kernel's peer credentials
say who is calling. Users see and act on their own jobs, admins on all; refusals are
401/403 JSON with a clear message, and are logged. As root (CI) the users are real Unix
users, since a root daemon runs each job as its submitter; otherwise plain gpud users
of the test's own daemon.
"""

from __future__ import annotations

import logging
import os
import pwd
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import httpx
import msgspec
import pytest
import trio

from gpud.domain import Quota
from gpud.ledger import Ledger
from gpud.ledger.users import remove_user, set_quota, set_token
from gpud.users import hash_token, new_token
from gpud_client import Client, GpudError
from gpud_client.models import SubmitRequest

from .conftest import UnixUser, add_gpud_user

PY = "{}.{}.{}".format(*sys.version_info[:3])


def _nap(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "rested"


def body(**kw: object) -> bytes:
    mod = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(mod)
    try:
        fn = cloudpickle.dumps(_nap)
    finally:
        cloudpickle.unregister_pickle_by_value(mod)
    seconds = kw.pop("seconds", 30.0)
    req = msgspec.to_builtins(
        SubmitRequest(
            name="t.nap", function=fn, python=PY, args=cloudpickle.dumps(((seconds,), {}))
        )
    )
    req.update(kw)
    return msgspec.json.encode(req)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
def people(served_tcp, unix_users_or_names):  # type: ignore[no-untyped-def]
    """alice and bob (users) and carol (admin), with their tokens."""
    data = served_tcp.daemon.config.data_dir
    names = {who: unix_users_or_names(who) for who in ("alice", "bob", "carol")}
    return {
        who: (name, add_gpud_user(data, name, admin=who == "carol")) for who, name in names.items()
    }


@pytest.fixture
def unix_users_or_names(request):  # type: ignore[no-untyped-def]
    """Real Unix users as root (a root daemon runs jobs as their submitter); plain names
    otherwise (a user's daemon runs every job as itself)."""
    if os.geteuid() != 0:
        return lambda who: f"{who}_{os.getpid()}"
    make: Callable[[str], UnixUser] = request.getfixturevalue("unix_users")
    return lambda who: make(who).name


@pytest.fixture
async def tcp(served_tcp):  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=served_tcp.tcp, timeout=30) as c:
        yield c


@pytest.fixture
async def unix(served_tcp):  # type: ignore[no-untyped-def]
    transport = httpx.AsyncHTTPTransport(uds=str(served_tcp.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://gpud", timeout=30) as c:
        yield c


def refused(resp: httpx.Response, status: int, code: str, *words: str) -> str:
    assert resp.status_code == status, resp.text
    b = resp.json()
    assert b["error"] == code
    for w in words:
        assert w in b["detail"], b["detail"]
    return str(b["detail"])


# ---------------------------------------------------------------------------------------
# Who is calling


async def test_tcp_needs_a_token_and_a_wrong_one_is_401(
    tcp: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gpud.api")
    assert (await tcp.get("/v1/health")).status_code == 200  # open: says nothing of jobs
    r = await tcp.get("/v1/jobs")
    refused(r, 401, "unauthenticated", "needs an API token", "gpud admin user add")
    assert r.headers["www-authenticate"].startswith("Bearer")
    refused(
        await tcp.get("/v1/jobs", headers=bearer("gpud_wrong")), 401, "unauthenticated", "not valid"
    )
    refused(
        await tcp.post("/v1/jobs", content=body(), headers={"authorization": "Basic eA=="}),
        401,
        "unauthenticated",
    )
    assert "refused GET /v1/jobs from 127.0.0.1" in caplog.text


async def until_refused(tcp: httpx.AsyncClient, token: str) -> None:
    for _ in range(50):
        if (await tcp.get("/v1/whoami", headers=bearer(token))).status_code == 401:
            return
        await trio.sleep(0.1)
    raise AssertionError("the token still works after 5 s")


async def test_a_token_identifies_its_user_until_rotated_or_removed(
    served_tcp, tcp: httpx.AsyncClient
) -> None:  # type: ignore[no-untyped-def]
    data = served_tcp.daemon.config.data_dir
    token = add_gpud_user(data, "tokenuser")
    me = (await tcp.get("/v1/whoami", headers=bearer(token))).json()
    assert (me["name"], me["admin"], me["via"], me["uid"]) == ("tokenuser", False, "token", None)

    fresh = new_token()
    led = Ledger(data / "ledger.db")
    set_token(led, "tokenuser", hash_token(fresh))
    led.close()
    # The daemon re-reads the users table every second: the old token stops working.
    await until_refused(tcp, token)
    assert (await tcp.get("/v1/whoami", headers=bearer(fresh))).json()["name"] == "tokenuser"

    led = Ledger(data / "ledger.db")
    remove_user(led, "tokenuser")
    led.close()
    await until_refused(tcp, fresh)


async def test_the_unix_socket_uses_peer_credentials(unix: httpx.AsyncClient) -> None:
    me_name = pwd.getpwuid(os.geteuid()).pw_name
    # Root, or the daemon's own user: an admin, known by the kernel; a token is ignored.
    for headers in ({}, bearer("gpud_not_a_token")):
        me = (await unix.get("/v1/whoami", headers=headers)).json()
        assert me["name"] == me_name and me["admin"] and me["via"] == "peer"
        assert me["uid"] == os.geteuid()


async def test_an_unregistered_local_user_is_refused_until_added(served_tcp, unix_users) -> None:  # type: ignore[no-untyped-def]
    dave: UnixUser = unix_users("dave")
    # In production the socket is 0660 with group gpud; here it is opened to everyone so
    # that dave can connect at all (and only the peer credentials decide).
    os.chmod(served_tcp.socket, 0o666)
    os.chmod(served_tcp.socket.parent, 0o755)
    probe = textwrap.dedent(f"""
        import socket, sys
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(served_tcp.socket)!r})
        s.sendall(b"GET /v1/whoami HTTP/1.1\\r\\nHost: gpud\\r\\nConnection: close\\r\\n\\r\\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        sys.stdout.write(out.decode())
    """)

    async def as_dave() -> str:
        r = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                ["/usr/bin/python3", "-c", probe],
                user=dave.uid,
                group=dave.gid,
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = await as_dave()
    assert out.startswith("HTTP/1.1 403") and "is not a user of this gpud" in out
    assert f"gpud admin user add {dave.name}" in out
    add_gpud_user(served_tcp.daemon.config.data_dir, dave.name)
    out = await as_dave()
    assert out.startswith("HTTP/1.1 200"), out
    assert f'"name":"{dave.name}"' in out and '"via":"peer"' in out
    assert f'"uid":{dave.uid}' in out and f'"runs_as":"{dave.name}"' in out


# ---------------------------------------------------------------------------------------
# What they may do


async def test_users_act_only_on_their_own_jobs_admins_on_all(
    people, tcp: httpx.AsyncClient, unix: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, "gpud.api")
    (alice, a_tok), (bob, b_tok), (_, c_tok) = people["alice"], people["bob"], people["carol"]
    r = await tcp.post("/v1/jobs", content=body(), headers=bearer(a_tok))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["owner"] == alice
    jid = job["id"]

    # bob can neither see, wait for, read, nor cancel alice's job ...
    as_bob = bearer(b_tok)
    for method, path in [
        ("GET", f"/v1/jobs/{jid}"),
        ("GET", f"/v1/jobs/{jid}/wait?timeout=0"),
        ("GET", f"/v1/jobs/{jid}/logs"),
        ("GET", f"/v1/jobs/{jid}/result"),
        ("POST", f"/v1/jobs/{jid}/cancel"),
    ]:
        detail = refused(
            await tcp.request(method, path, headers=as_bob),
            403,
            "forbidden",
            f"job {jid} belongs to {alice}",
            f"{bob} may only",
        )
        assert "admins may act on all" in detail
    assert f"refused POST /v1/jobs/{jid}/cancel from {bob} (token)" in caplog.text
    # ... nor list it; alice does.
    assert jid not in [j["id"] for j in (await tcp.get("/v1/jobs", headers=as_bob)).json()["jobs"]]
    mine = (await tcp.get("/v1/jobs", headers=bearer(a_tok))).json()["jobs"]
    assert [j["id"] for j in mine] == [jid]
    # An unknown job is still 404, not 403.
    assert (await tcp.get("/v1/jobs/99999", headers=as_bob)).status_code == 404
    # The live-view endpoints hold to the same rule: bob's event log has none of alice's
    # job, and he may not follow its events or read its outcome.
    bob_events = (await tcp.get("/v1/events", headers=as_bob)).json()["events"]
    assert jid not in [e["job_id"] for e in bob_events]
    alice_events = (await tcp.get("/v1/events", headers=bearer(a_tok))).json()["events"]
    assert jid in [e["job_id"] for e in alice_events]
    for path in (f"/v1/events?job_id={jid}", f"/v1/jobs/{jid}/outcome"):
        refused(await tcp.get(path, headers=as_bob), 403, "forbidden", f"belongs to {alice}")

    # An admin (carol, by token) and root (on the socket) see it; the admin cancels it.
    assert (await tcp.get(f"/v1/jobs/{jid}", headers=bearer(c_tok))).status_code == 200
    assert jid in [j["id"] for j in (await unix.get("/v1/jobs")).json()["jobs"]]
    r = await tcp.post(f"/v1/jobs/{jid}/cancel", headers=bearer(c_tok))
    assert r.status_code == 200 and r.json()["state"] == "cancelled"


async def test_submit_rules_priority_and_quotas(served_tcp, people, tcp: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    (alice, a_tok), (_, c_tok) = people["alice"], people["carol"]
    as_alice = bearer(a_tok)
    refused(
        await tcp.post("/v1/jobs", content=body(priority=5), headers=as_alice),
        403,
        "forbidden",
        "only admins may give a job a priority above 0",
    )
    for tok, prio in ((c_tok, 5), (a_tok, -5)):  # an admin may raise; anyone may lower
        r = await tcp.post("/v1/jobs", content=body(priority=prio, seconds=0), headers=bearer(tok))
        assert r.status_code == 201, r.text
        done = await tcp.get(f"/v1/jobs/{r.json()['id']}/wait?timeout=30", headers=bearer(tok))
        assert done.json()["state"] == "succeeded"

    led = Ledger(served_tcp.daemon.config.data_dir / "ledger.db")
    set_quota(led, alice, Quota(max_queued=1, max_timeout=60.0))
    led.close()
    await served_tcp.daemon.users.refresh()
    # max_timeout: refused above it; a job without a timeout gets it.
    refused(
        await tcp.post("/v1/jobs", content=body(timeout=120.0), headers=as_alice),
        422,
        "quota_exceeded",
        "max_timeout quota",
    )
    # Hold the only CPU slots so that alice's jobs stay queued.
    r = await tcp.post("/v1/jobs", content=body(gpu="h100:2", seconds=30), headers=as_alice)
    first = r.json()
    assert r.status_code == 201 and first["timeout"] == 60.0
    r = await tcp.post("/v1/jobs", content=body(gpu="h100:2"), headers=as_alice)
    if r.status_code == 201:  # the first one started at once, so nothing was queued
        second = r.json()
        r = await tcp.post("/v1/jobs", content=body(gpu="h100:2"), headers=as_alice)
        await tcp.post(f"/v1/jobs/{second['id']}/cancel", headers=as_alice)
    refused(r, 422, "quota_exceeded", f"{alice} may have at most 1 jobs queued")
    await tcp.post(f"/v1/jobs/{first['id']}/cancel", headers=as_alice)


async def test_a_token_user_without_a_unix_account_cannot_submit_to_a_root_daemon(
    served_tcp, tcp: httpx.AsyncClient
) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("only a daemon run by root runs jobs as their submitters")
    token = add_gpud_user(served_tcp.daemon.config.data_dir, "gpudt_nosuchunixuser")
    refused(
        await tcp.post("/v1/jobs", content=body(), headers=bearer(token)),
        403,
        "forbidden",
        "has no Unix account on this machine",
    )
    me = (await tcp.get("/v1/whoami", headers=bearer(token))).json()
    assert me["runs_as"] is None


# ---------------------------------------------------------------------------------------
# The client's token


def _token_file(tmp_path: Path, mode: int, text: str = "gpud_secret") -> Path:
    path = tmp_path / "gpud" / "token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def test_client_reads_a_private_token_file_and_gpud_token_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpud_client.tokens import load_token

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("GPUD_TOKEN", raising=False)
    assert load_token() is None
    _token_file(tmp_path, 0o600)
    assert load_token() == "gpud_secret"
    with Client("unix:///nonexistent.sock") as c:
        assert c._http.headers["authorization"] == "Bearer gpud_secret"
    monkeypatch.setenv("GPUD_TOKEN", "gpud_from_env")
    assert load_token() == "gpud_from_env"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_client_refuses_a_token_file_others_can_read_or_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("GPUD_TOKEN", raising=False)
    path = _token_file(tmp_path, mode)
    with pytest.raises(GpudError, match=r"refusing the gpud token file .*chmod 600") as e:
        Client("unix:///nonexistent.sock")
    assert str(path) in str(e.value) and "token rotate" in str(e.value)


def test_client_refuses_a_token_file_owned_by_someone_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file away needs root")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("GPUD_TOKEN", raising=False)
    path = _token_file(tmp_path, 0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(GpudError, match="belongs to uid 65534"):
        Client("unix:///nonexistent.sock")


# ---------------------------------------------------------------------------------------
# Without peer credentials (should the server stack stop exposing them)


def _request(client: tuple[str, int] | None, headers: dict[str, str] | None = None) -> Any:
    from starlette.requests import Request

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/v1/jobs",
            "headers": raw,
            "client": client,
            "query_string": b"",
        }
    )


class _NoUsers:
    def get(self, name: str) -> None:
        return None

    async def by_token(self, token: str) -> None:
        return None


async def test_without_peer_credentials_a_users_daemon_trusts_its_private_socket() -> None:
    from gpud.auth import Auth, Unauthenticated

    me = os.geteuid()
    who = await Auth(_NoUsers(), daemon_uid=me if me else 4242).authenticate(_request(None))  # type: ignore[arg-type]
    assert who.via == "owner" and who.admin
    # A root daemon's socket is shared with the gpud group: there, a token is needed.
    with pytest.raises(Unauthenticated, match="needs an API token"):
        await Auth(_NoUsers(), daemon_uid=0).authenticate(_request(None))  # type: ignore[arg-type]
    # And TCP always needs one, whoever runs the daemon.
    with pytest.raises(Unauthenticated):
        await Auth(_NoUsers(), daemon_uid=4242).authenticate(  # type: ignore[arg-type]
            _request(("127.0.0.1", 5555), {"authorization": "Bearer gpud_x"})
        )
