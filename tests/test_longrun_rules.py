"""Long runs (#14, items 1 and 2) without a job running: the options' checks (client,
daemon and API), the words for how a stop ended, the state directory's paths and links,
its privacy over the API, and retention."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

import gpud_client as gpud
from gpud import longrun, statedir
from gpud.config import Config
from gpud.domain import Job, JobState
from gpud.retention import remove_tree, tree_bytes

# Fixtures shared with the authentication tests: alice, bob and carol (admin) with tokens.
from .test_auth import bearer, body, people, refused, tcp, unix_users_or_names  # noqa: F401

# -- the options --------------------------------------------------------------------------


def test_signal_names() -> None:
    assert longrun.parse_signal("SIGUSR2").name == "SIGUSR2"
    assert longrun.parse_signal("usr1").name == "SIGUSR1"
    for bad in ("SIGKILL", "TERM", "SIGSTOP", "FOO", "9", ""):
        with pytest.raises(ValueError, match="pick one of SIGUSR1, SIGUSR2"):
            longrun.parse_signal(bad)


def test_the_daemon_checks_options_against_each_other_and_its_limits() -> None:
    cfg = Config(max_grace=60.0)
    assert longrun.check_options(cfg, 100.0, 10.0, "usr2", 5.0) == ("SIGUSR2", 5.0)
    assert longrun.check_options(cfg, 100.0, None, None, None) == (None, None)
    cases = [
        ((100.0, 100.0, None, None), "invalid_signal_before", "must be shorter than the job's"),
        ((100.0, 500.0, None, None), "invalid_signal_before", "raise timeout"),
        ((100.0, None, "SIGUSR2", None), "invalid_signal", "needs signal_before"),
        ((100.0, 10.0, "SIGTERM", None), "invalid_signal", "pick one of"),
        ((100.0, None, None, 61.0), "invalid_grace", r"above this daemon.s max_grace \(60 s\)"),
    ]
    for args, code, words in cases:
        with pytest.raises(longrun.LongRunError, match=words) as e:
            longrun.check_options(cfg, *args)
        assert e.value.code == code


def test_grace_defaults_to_kill_grace_and_never_passes_max_grace() -> None:
    job = Job(id=1, function="f", state=JobState.RUNNING, submitted_at=0.0)
    assert longrun.grace_of(job, Config(kill_grace=10.0)) == 10.0
    job.grace = 3.0
    assert longrun.grace_of(job, Config(kill_grace=10.0)) == 3.0
    job.grace = 200.0  # the admin lowered max_grace since the submit
    assert longrun.grace_of(job, Config(max_grace=30.0)) == 30.0


def test_the_words_for_how_a_stop_ended() -> None:
    c, t = JobState.CANCELLED, JobState.TIMED_OUT
    assert (
        longrun.stop_text("cancelled", c, False, 10) == "cancelled: ended by SIGTERM after cancel"
    )
    assert (
        longrun.stop_text("cancelled", c, True, 10)
        == "cancelled: killed (SIGKILL) after 10 s grace"
    )
    assert (
        longrun.stop_text("timed out after 1 h", t, True, 2.5)
        == "timed out after 1 h: killed (SIGKILL) after 2.5 s grace"
    )
    assert longrun.stop_text("timed out after 1 h", t, None, 10) == "timed out after 1 h"


def test_the_client_checks_options_where_they_are_written() -> None:
    f = gpud.function(timeout="1h", signal_before="5m", signal="SIGUSR2", grace="30s")(len)
    assert (f.options.signal_before, f.options.signal, f.options.grace) == (300.0, "SIGUSR2", 30.0)
    bad = [
        ({"signal_before": "soon"}, "invalid duration"),
        ({"signal_before": -1}, "invalid duration"),
        ({"signal_before": 0}, "positive duration"),
        ({"timeout": 60, "signal_before": "1m"}, "shorter than the timeout"),
        ({"signal": "SIGUSR2"}, "needs signal_before"),
        ({"grace": "-3s"}, "invalid duration"),
        ({"grace": float("inf")}, "invalid duration"),
    ]
    for kw, words in bad:
        with pytest.raises(ValueError, match=words):
            gpud.function(**kw)(len)


def test_state_dir_in_the_client_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUD_STATE_DIR", raising=False)
    with pytest.raises(RuntimeError, match="as a gpud job"):
        gpud.state_dir()
    monkeypatch.setenv("GPUD_STATE_DIR", "/x/state")
    assert gpud.state_dir() == Path("/x/state")


# -- the state directory's files ---------------------------------------------------------


def _job_dir(tmp_path: Path) -> Path:
    d = tmp_path / "jobs" / "7"
    d.mkdir(parents=True)
    s = statedir.ensure(d, (os.getuid(), os.getgid()))
    (s / "sub").mkdir()
    (s / "sub" / "a.bin").write_bytes(b"a" * 100)
    (s / "top.txt").write_text("top")
    return d


def _read(job_dir: Path, path: str) -> bytes | None:
    fd = statedir.open_file(job_dir, path)
    if fd is None:
        return None
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def test_paths_leaving_the_state_directory_are_refused(tmp_path: Path) -> None:
    d = _job_dir(tmp_path)
    assert _read(d, "sub/a.bin") == b"a" * 100
    for bad in (
        "../output.log",
        "sub/../../x",
        "/etc/passwd",
        "",
        "./top.txt",
        "sub//a.bin",
        "a\nb",
    ):
        with pytest.raises(statedir.BadPath, match="gpud state JOB"):
            statedir.open_file(d, bad)
    assert _read(d, "missing") is None and _read(d, "sub") is None  # a directory


def test_links_a_job_planted_are_never_followed(tmp_path: Path) -> None:
    d = _job_dir(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    s = d / statedir.NAME
    (s / "link").symlink_to(secret)
    (s / "dirlink").symlink_to(tmp_path)
    assert _read(d, "link") is None and _read(d, "dirlink/secret") is None
    files, truncated = statedir.listing(d)
    assert [f.path for f in files] == ["sub/a.bin", "top.txt"] and not truncated
    assert [f.size for f in files] == [100, 3]
    # A state directory replaced by a link is replaced again at the next attempt.
    other = tmp_path / "jobs" / "8"
    other.mkdir()
    (other / statedir.NAME).symlink_to(tmp_path)
    assert statedir.listing(other) == ([], False)
    statedir.ensure(other, (os.getuid(), os.getgid()))
    assert (other / statedir.NAME).is_dir() and not (other / statedir.NAME).is_symlink()
    assert secret.read_text() == "not yours"


def test_a_listing_stops_at_its_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _job_dir(tmp_path)
    monkeypatch.setattr(statedir, "MAX_LISTED", 1)
    files, truncated = statedir.listing(d)
    assert len(files) == 1 and truncated


def test_retention_counts_and_removes_the_state_directory(tmp_path: Path) -> None:
    d = _job_dir(tmp_path)
    jobs = d.parent
    assert tree_bytes(jobs, 7) >= 103  # the state files count toward retention_max_bytes
    assert remove_tree(jobs, 7) >= 103
    assert not d.exists()


# -- over the API -----------------------------------------------------------------------


async def _finished(tcp: httpx.AsyncClient, token: str, **kw: object) -> int:  # noqa: F811
    r = await tcp.post("/v1/jobs", headers=bearer(token), content=body(seconds=0.0, **kw))
    assert r.status_code == 201, r.text
    job_id = int(r.json()["id"])
    r = await tcp.get(f"/v1/jobs/{job_id}/wait?timeout=30", headers=bearer(token))
    assert r.json()["state"] == "succeeded", r.text
    return job_id


async def test_only_the_owner_reads_a_state_directory(
    people, tcp: httpx.AsyncClient, served_tcp
) -> None:  # type: ignore[no-untyped-def]
    (_, a_tok), (_, b_tok), (_, c_tok) = people["alice"], people["bob"], people["carol"]
    job_id = await _finished(tcp, a_tok)
    s = served_tcp.daemon.config.jobs_dir / str(job_id) / statedir.NAME
    assert s.is_dir() and (os.stat(s).st_mode & 0o777) == 0o700
    (s / "ckpt").write_bytes(b"weights")
    (s / "passwd").symlink_to("/etc/passwd")

    r = await tcp.get(f"/v1/jobs/{job_id}/state", headers=bearer(a_tok))
    assert r.status_code == 200, r.text
    assert [f["path"] for f in r.json()["files"]] == ["ckpt"]
    r = await tcp.get(f"/v1/jobs/{job_id}/state/ckpt", headers=bearer(a_tok))
    assert (r.status_code, r.content) == (200, b"weights")
    refused(
        await tcp.get(f"/v1/jobs/{job_id}/state/passwd", headers=bearer(a_tok)),
        404,
        "no_such_file",
        "lists what it has",
    )
    assert (
        await tcp.get(f"/v1/jobs/{job_id}/state/ckpt", headers=bearer(c_tok))
    ).status_code == 200  # an admin

    # bob gets what he gets for any of alice's jobs: the 403 of her logs.
    logs = await tcp.get(f"/v1/jobs/{job_id}/logs", headers=bearer(b_tok))
    for path in (
        f"/v1/jobs/{job_id}/state",
        f"/v1/jobs/{job_id}/state/ckpt",
        f"/v1/jobs/{job_id}/state/nothing",
    ):
        r = await tcp.get(path, headers=bearer(b_tok))
        assert (
            (r.status_code, r.json()["error"])
            == (logs.status_code, "forbidden")
            == (403, "forbidden")
        )
        assert b"weights" not in r.content
    # An unknown job: 404, as everywhere.
    refused(await tcp.get("/v1/jobs/999999/state", headers=bearer(a_tok)), 404, "not_found")


async def test_traversal_is_a_clear_400(people, tcp: httpx.AsyncClient) -> None:  # type: ignore[no-untyped-def]
    a_tok = people["alice"][1]
    job_id = await _finished(tcp, a_tok)
    for raw in ("%2E%2E/output.log", "sub/%2E%2E/%2E%2E/output.log", "%2Fetc%2Fpasswd"):
        r = await tcp.get(f"/v1/jobs/{job_id}/state/{raw}", headers=bearer(a_tok))
        refused(r, 400, "invalid_path", "gpud state JOB")
        assert b"gpud worker" not in r.content


async def test_bad_long_run_options_are_refused_saying_what_to_do(
    people, tcp: httpx.AsyncClient
) -> None:  # type: ignore[no-untyped-def]
    a_tok = people["alice"][1]
    cases = [
        ({"timeout": 60, "signal_before": 60}, "invalid_signal_before", "shorter than"),
        ({"timeout": 60, "signal_before": -5}, "invalid_signal_before", "above 0 to"),
        ({"timeout": 60, "signal_before": 1e30}, "invalid_signal_before", "above 0 to"),
        ({"timeout": 60, "signal_before": 5, "signal": "SIGKILL"}, "invalid_signal", "pick one of"),
        ({"timeout": 60, "signal": "SIGUSR2"}, "invalid_signal", "needs signal_before"),
        ({"signal_before": 5, "signal": "x" * 40}, "invalid_signal", "1 to 16 characters"),
        ({"grace": 10_000}, "invalid_grace", "max_grace"),
        ({"grace": -1}, "invalid_grace", "from 0 to"),
    ]
    for kw, code, words in cases:
        r = await tcp.post("/v1/jobs", headers=bearer(a_tok), content=body(**kw))
        refused(r, 422, code, words)
    ok = await tcp.post(
        "/v1/jobs",
        headers=bearer(a_tok),
        content=body(seconds=0.0, timeout=60, signal_before=5, signal="usr2", grace=2),
    )
    assert ok.status_code == 201, ok.text
    info = ok.json()
    assert (info["signal_before"], info["signal"], info["grace"]) == (5.0, "SIGUSR2", 2.0)
