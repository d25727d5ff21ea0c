"""`gpud shell --jupyter` (#14) against a real daemon: refused when Jupyter is missing,
refused on Podman, and a server's URL printed once it answers (with a stand-in Jupyter)."""

from __future__ import annotations

import os
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.testing.daemon_proc import DaemonProc
from gpud_client import Client
from tests.conftest import TEST_SETTINGS, executor_env, gpud_cli, make_base_dir

pytestmark = pytest.mark.slow

#: Test stand-in for jupyterlab (Jupyter is not installed here): ``python -m jupyterlab``
#: that takes Jupyter's arguments, serves HTTP on --ip/--port and answers 200 only with
#: $JUPYTER_TOKEN, as the real server does.
FAKE_MAIN = '''"""TEST STAND-IN for jupyterlab, written by tests/test_shell_jupyter.py."""
import argparse, http.server, os, sys
p = argparse.ArgumentParser()
p.add_argument("--no-browser", action="store_true")
p.add_argument("--ip")
p.add_argument("--port", type=int)
p.add_argument("--port-retries")
a = p.parse_args()
token = os.environ["JUPYTER_TOKEN"]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path.endswith("token=" + token)
        self.send_response(200 if ok else 403)
        self.end_headers()
        self.wfile.write(b"stand-in jupyter cwd=" + os.getcwd().encode() if ok else b"no")
    def log_message(self, *args):
        pass
s = http.server.HTTPServer((a.ip, a.port), H)
print(f"    http://{a.ip}:{a.port}/lab?token={token}", flush=True)
s.serve_forever()
'''


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    base = make_base_dir()
    d = DaemonProc(base, settings=TEST_SETTINGS, env=executor_env("process"))
    d.start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fake_jupyter() -> Iterator[Path]:
    root = make_base_dir()  # 0755: the job user (nobody, under a root daemon) reads it
    pkg = root / "jupyterlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""TEST STAND-IN for jupyterlab."""\n')
    (pkg / "__main__.py").write_text(FAKE_MAIN)
    for p in (pkg, *pkg.iterdir()):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _job_of(stderr: str) -> int:
    return int(stderr.split("[gpud] job ", 1)[1].split()[0])


def test_jupyter_missing_fails_the_job_with_how_to_install(daemon: DaemonProc) -> None:
    out = gpud_cli("shell", "--jupyter", env=daemon.client_env())
    assert out.returncode != 0
    assert "jupyter is not installed in " in out.stderr, out.stderr
    assert "pip install jupyterlab" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""
    with Client(daemon.url) as c:
        assert c.get_job(_job_of(out.stderr)).state == "failed"


def test_jupyter_url_printed_once_the_server_answers(
    daemon: DaemonProc, fake_jupyter: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = daemon.client_env()
    out = gpud_cli(
        "shell", "--jupyter", "--port", str(port), "--env", f"PYTHONPATH={fake_jupyter}", env=env
    )
    job_id = _job_of(out.stderr)
    try:
        assert out.returncode == 0, out.stderr
        url = out.stdout.strip()
        assert url.startswith(f"http://127.0.0.1:{port}/?token="), url
        assert len(url.split("token=")[1]) >= 24
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.read().startswith(b"stand-in jupyter"), url
        with pytest.raises(urllib.error.HTTPError):  # the token is what lets one in
            urllib.request.urlopen(f"http://127.0.0.1:{port}/?token=wrong", timeout=10)
        with Client(daemon.url) as c:
            assert c.get_job(job_id).state == "running"
    finally:
        with Client(daemon.url) as c:
            c.cancel(job_id)
            assert c.wait(job_id, timeout=30).state == "cancelled"
    # Cancelling the job stopped the server with it.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_port_needs_jupyter(daemon: DaemonProc) -> None:
    out = gpud_cli("shell", "--port", "8888", env=daemon.client_env())
    assert out.returncode == 2 and "--port goes with --jupyter" in out.stderr


def test_podman_refuses_jupyter_with_the_reason() -> None:
    env = executor_env("podman")  # skips where Podman is not set up
    base = make_base_dir()
    d = DaemonProc(base, settings=TEST_SETTINGS, env=env)
    d.start()
    try:
        out = gpud_cli("shell", "--jupyter", env=d.client_env())
        assert out.returncode == 2, out.stderr
        assert "--jupyter needs the process executor" in out.stderr
        with Client(d.url) as c:
            assert c.list_jobs().jobs == []  # refused before anything was queued
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
