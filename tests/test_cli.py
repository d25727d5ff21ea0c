"""The `gpud` command line as a user runs it: output, --json, errors and exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpud.cli import EXIT

from .conftest import DaemonProc, gpud_cli


def test_run_hello_square_prints_49(daemon: DaemonProc) -> None:
    out = gpud_cli("run", "examples/hello.py::square", "--x", "7", env=daemon.client_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout == "49\n"
    assert "squaring 7" in out.stderr  # the job's output streams to stderr


def test_run_json_and_detach_then_result(daemon: DaemonProc) -> None:
    env = daemon.client_env()
    out = gpud_cli("run", "examples/hello.py::square", "--x", "5", "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout) == 25
    out = gpud_cli("run", "--detach", "examples/hello.py::square", "--x", "6", env=env)
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout)
    out = gpud_cli("logs", str(job_id), "-f", env=env)
    assert out.returncode == 0 and "squaring 6" in out.stdout
    out = gpud_cli("result", str(job_id), "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout) == 36


def test_ps_all_json_is_the_ledger(daemon: DaemonProc) -> None:
    env = daemon.client_env()
    job_id = int(gpud_cli("run", "-d", "examples/hello.py::square", "--x", "2", env=env).stdout)
    gpud_cli("logs", str(job_id), "-f", env=env)
    out = gpud_cli("ps", "--all", "--json", env=env)
    assert out.returncode == 0, out.stderr
    jobs = json.loads(out.stdout)
    mine = [j for j in jobs if j["id"] == job_id]
    assert mine and mine[0]["state"] == "succeeded" and mine[0]["name"] == "hello.square"
    table = gpud_cli("ps", "--all", env=env)
    assert table.returncode == 0 and "hello.square" in table.stdout


def test_run_failure_exits_4_with_remote_traceback(daemon: DaemonProc) -> None:
    out = gpud_cli("run", "examples/hello.py::fail", "--message", "nope", env=daemon.client_env())
    assert out.returncode == EXIT["job_failed"]
    assert "ValueError: nope" in out.stderr and "Remote traceback" in out.stderr
    assert out.stdout == ""


def test_run_options_become_typed_parameters(daemon: DaemonProc, tmp_path: Path) -> None:
    script = tmp_path / "params.py"
    script.write_text(
        "def f(n_items: int, scale: float = 1.5, loud: bool = False, tags: list = [],"
        " name: str = 'x') -> dict:\n"
        "    return {'n': n_items, 'scale': scale, 'loud': loud, 'tags': tags, 'name': name}\n"
    )
    out = gpud_cli(
        "run",
        f"{script}::f",
        "--n-items",
        "3",
        "--loud",
        "--tags",
        '["a"]',
        "--json",
        env=daemon.client_env(),
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "n": 3,
        "scale": 1.5,
        "loud": True,
        "tags": ["a"],
        "name": "x",
    }
    out = gpud_cli("run", f"{script}::f", env=daemon.client_env())
    assert out.returncode == EXIT["usage"] and "--n-items" in out.stderr
    out = gpud_cli("run", f"{script}::f", "--help", env=daemon.client_env())
    assert out.returncode == 0 and "--n-items" in out.stdout and "--no-loud" in out.stdout


def test_usage_errors_say_the_fix(daemon: DaemonProc) -> None:
    env = daemon.client_env()
    out = gpud_cli("run", "examples/hello.py:square", env=env)
    assert out.returncode == EXIT["usage"] and "did you mean '::'" in out.stderr
    out = gpud_cli("run", "examples/nope.py::square", env=env)
    assert out.returncode == EXIT["usage"] and "no such file" in out.stderr
    out = gpud_cli("run", "examples/hello.py::cube", env=env)
    assert out.returncode == EXIT["usage"] and "square" in out.stderr  # lists what exists
    out = gpud_cli("run", "examples/hello.py::square", "--x", "7", "--gpu", "h100:9", env=env)
    assert out.returncode == EXIT["error"] and "cannot run 9 x h100" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_job_is_an_error(daemon: DaemonProc) -> None:
    env = daemon.client_env()
    for cmd in (["logs", "999999"], ["result", "999999"], ["cancel", "999999"]):
        out = gpud_cli(*cmd, env=env)
        assert out.returncode == EXIT["error"], (cmd, out.stderr)
        assert "no job 999999" in out.stderr and "Traceback" not in out.stderr


def test_gpus_shows_declared_fakes(daemon: DaemonProc) -> None:
    out = gpud_cli("gpus", "--json", env=daemon.client_env())
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert data["source"] == "fake" and all(g["fake"] for g in data["gpus"])
    assert [g["type"] for g in data["gpus"]] == ["h100", "h100", "l4"]
    table = gpud_cli("gpus", env=daemon.client_env())
    assert "FAKE" in table.stdout


def test_version(daemon: DaemonProc) -> None:
    out = gpud_cli("version", "--json", env=daemon.client_env())
    info = json.loads(out.stdout)
    assert info["client"] == info["daemon"]["version"]


def test_no_daemon_exits_3_and_says_how_to_start_one(tmp_path: Path) -> None:
    env = {"GPUD_URL": f"unix://{tmp_path}/nothing.sock", "PATH": "/usr/bin:/bin"}
    out = gpud_cli("ps", env=env)
    assert out.returncode == EXIT["unavailable"]
    assert "gpud serve" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_bad_config_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('executor = "process"\nmax_timeout = "forever"\n')
    out = gpud_cli("serve", "--config", str(bad))
    assert out.returncode == EXIT["error"] and "max_timeout" in out.stderr
    bad.write_text("cpu_slotz = 4\n")
    out = gpud_cli("serve", "--config", str(bad))
    assert out.returncode == EXIT["error"] and "cpu_slotz" in out.stderr
    out = gpud_cli("serve", "--tcp", "0.0.0.0")  # (any host is allowed: TCP needs tokens)
    assert out.returncode == EXIT["error"] and "HOST:PORT" in out.stderr


def test_second_daemon_on_same_data_dir_is_refused(daemon: DaemonProc, tmp_path: Path) -> None:
    out = gpud_cli(
        "serve",
        "--data-dir",
        str(daemon.data_dir),
        "--socket",
        str(tmp_path / "other.sock"),
        timeout=30,
    )
    assert out.returncode == EXIT["error"] and "already running" in out.stderr


def test_serve_startup_error_is_one_clear_line(tmp_path: Path) -> None:
    """An error raised inside the daemon's nursery (trio wraps it in a group) is still one
    `Error:` line, not a traceback."""
    out = gpud_cli(
        "serve",
        "--data-dir",
        str(tmp_path / "d"),
        "--socket",
        str(tmp_path / "s.sock"),
        env={**os.environ, "GPUD_PYTHON": "/nonexistent/python3"},
        timeout=60,
    )
    assert out.returncode == EXIT["error"], out.stderr
    assert "Error:" in out.stderr and "python" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_a_newer_ledger_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    data = tmp_path / "d"
    data.mkdir()
    conn = sqlite3.connect(data / "ledger.db")
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    out = gpud_cli(
        "serve", "--data-dir", str(data), "--socket", str(tmp_path / "s.sock"), timeout=60
    )
    assert out.returncode == EXIT["error"], out.stderr
    assert "newer than this gpud knows" in out.stderr and "Traceback" not in out.stderr
