"""What the common `gpud` commands import (#12): a guard on their start-up, not a timing.

`gpud ps` on a million-job ledger took ~0.4 s, nearly all of it imports: httpx (which
imports its own CLI, rich) and httpcore (which imports trio because it is installed), the
decorator API, every command's module. The sync client now speaks http.client
(gpud_client/wire.py), gpud_client's names and the CLI's commands load when used, and
tables are plain text. This test runs each command in a fresh interpreter and fails if it
imports one of the heavy modules again; `bench/hotpath.py --only ledger` has the timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, DaemonProc, gpud_cli

#: Modules no read command needs; each cost `gpud ps` from a few to ~150 ms.
HEAVY = (
    "rich",
    "trio",
    "anyio",
    "httpx",
    "httpcore",
    "h11",
    "textual",
    "cloudpickle",
    "sqlite3",
    "hypercorn",
    "starlette",
    "gpud.daemon",
    "gpud.cli_admin",
    "gpud.cli_run",
    "gpud_client.app",
    "gpud_client.worker",
    "gpud_client.payload",
)
#: ... and those a submit (`gpud run -d`) needs none of.
HEAVY_FOR_SUBMIT = (
    "rich",
    "trio",
    "anyio",
    "httpx",
    "httpcore",
    "textual",
    "hypercorn",
    "starlette",
    "gpud.daemon",
    "gpud.cli_admin",
)

#: Runs the command as `gpud` does, then writes the names of the modules it imported.
_PROBE = """
import json, os, sys
sys.argv = ["gpud", *json.loads(os.environ["PROBE_ARGS"])]
try:
    from gpud.cli import main
    main()
except SystemExit:
    pass
finally:
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(sorted(sys.modules), f)
"""


def imported_by(args: list[str], env: dict[str, str], out: Path) -> set[str]:
    env = {**env, "PROBE_ARGS": json.dumps(args), "PROBE_OUT": str(out)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return set(json.loads(out.read_text()))


def heavy_in(modules: set[str], heavy: tuple[str, ...]) -> list[str]:
    return sorted(
        m
        for m in modules
        if m in heavy or m.split(".")[0] in heavy or any(m.startswith(h + ".") for h in heavy)
    )


def test_the_read_commands_import_nothing_heavy(process_daemon: DaemonProc, tmp_path: Path) -> None:
    env = process_daemon.client_env()
    job = gpud_cli("run", "-d", "examples/hello.py::square", "--x", "3", env=env)
    assert job.returncode == 0, job.stderr
    jid = job.stdout.strip()
    gpud_cli("logs", jid, "-f", env=env)  # finished: its row has every column filled
    commands = [
        ["ps"],
        ["ps", "--all"],
        ["ps", "--all", "--json"],
        ["gpus"],
        ["logs", jid],
        ["cancel", jid],
        ["version"],
        ["--version"],
    ]
    for args in commands:
        modules = imported_by(args, env, tmp_path / "modules.json")
        assert "gpud_client.client" in modules or args[0] in ("--version",), args
        assert heavy_in(modules, HEAVY) == [], f"`gpud {' '.join(args)}` imports these"


def test_a_submit_imports_no_http_library_and_no_table(
    process_daemon: DaemonProc, tmp_path: Path
) -> None:
    args = ["run", "-d", "examples/hello.py::square", "--x", "4"]
    modules = imported_by(args, process_daemon.client_env(), tmp_path / "modules.json")
    assert "cloudpickle" in modules  # it did submit: the probe is not vacuous
    assert heavy_in(modules, HEAVY_FOR_SUBMIT) == []


def test_no_daemon_still_says_how_to_start_one_without_heavy_imports(tmp_path: Path) -> None:
    env = {**os.environ, "GPUD_URL": f"unix://{tmp_path}/nothing.sock"}
    modules = imported_by(["ps"], env, tmp_path / "modules.json")
    assert heavy_in(modules, HEAVY) == []


@pytest.mark.parametrize("heavy", ["rich", "httpx"])
def test_the_guard_sees_a_heavy_import(tmp_path: Path, heavy: str) -> None:
    """The probe reports what a command imported: one that imports rich is caught."""
    env = {**os.environ, "GPUD_URL": f"unix://{tmp_path}/nothing.sock", "PYTHONSTARTUP": ""}
    probe = _PROBE.replace(
        "from gpud.cli import main", f"import {heavy}\n    from gpud.cli import main"
    )
    out = tmp_path / "modules.json"
    env.update({"PROBE_ARGS": json.dumps(["ps"]), "PROBE_OUT": str(out)})
    subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert heavy in heavy_in(set(json.loads(out.read_text())), HEAVY)
