"""The Podman executor: isolation, limits, images, refusals, and the container spec.

The end-to-end behaviour shared with the process executor (remote, map, cancel, timeout,
retries, restart) runs over both executors in test_e2e.py and test_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import httpx
import pytest

import gpud_client as gpud
from gpud.executors.base import LaunchSpec
from gpud.executors.podman import cdi_has_nvidia, container_spec, gpu_devices
from gpud.executors.process import JobIdentity

from .conftest import GPUD, DaemonProc, _run_daemon, containers_of, executor_env, make_base_dir


@pytest.fixture(scope="module")
def pdaemon() -> Iterator[DaemonProc]:
    env = executor_env("podman")
    base = make_base_dir()
    try:
        yield from _run_daemon(base, env)
    finally:
        subprocess.run(["rm", "-rf", str(base)])


@gpud.function
def inside() -> dict:
    import os
    import socket

    return {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "uid": os.getuid(),
        "root": sorted(os.listdir("/")),
        "sees_host_secret": os.path.exists(os.environ.get("SECRET_PATH", "/nonexistent")),
        "cwd": os.getcwd(),
        "can_write_root": os.access("/usr", os.W_OK),
        "can_write_tmp": os.access("/tmp", os.W_OK),
        "no_new_privs": [
            line.split()[1] for line in open("/proc/self/status") if line.startswith("NoNewPrivs")
        ][0],
    }


@gpud.function
def hold(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "done"


def test_job_sees_itself_in_a_container(pdaemon: DaemonProc, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("do not read")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    info = inside.with_options(url=pdaemon.url, env={"SECRET_PATH": str(secret)}).remote()
    assert info["pid"] == 1  # its own pid namespace
    assert info["hostname"] != os.uname().nodename  # its own hostname
    assert info["uid"] != 0
    assert not info["sees_host_secret"]  # the host's files are not there
    assert "work" not in info["root"] and "gpud" in info["root"]
    assert info["cwd"] == "/gpud/job" and not info["can_write_root"]
    assert info["can_write_tmp"] and info["no_new_privs"] == "1"


def test_memory_and_cpu_become_container_limits(pdaemon: DaemonProc) -> None:
    handle = hold.with_options(url=pdaemon.url, memory="256M", cpu=0.5).spawn(30)
    try:
        deadline = time.monotonic() + 30
        while not containers_of(pdaemon, handle.id) and time.monotonic() < deadline:
            time.sleep(0.1)
        [cid] = containers_of(pdaemon, handle.id)
        out = subprocess.run(["podman", "inspect", cid], capture_output=True, text=True, check=True)
        host = json.loads(out.stdout)[0]["HostConfig"]
        assert host["Memory"] == 256 * 1024 * 1024
        assert host["NanoCpus"] == 500_000_000
        info = handle.status()
        assert info.memory == 256 * 1024 * 1024 and info.cpu == 0.5
    finally:
        assert handle.cancel().state == "cancelled"
    assert containers_of(pdaemon, handle.id) == []


def _submit(url: str, **fields: object) -> httpx.Response:
    import base64

    body: dict[str, object] = {"name": "t.f", "python": "{}.{}.{}".format(*sys.version_info[:3])}
    body["function"] = base64.b64encode(cloudpickle.dumps(len)).decode()
    body["args"] = base64.b64encode(cloudpickle.dumps((([1, 2],), {}))).decode()
    body.update(fields)
    transport = httpx.HTTPTransport(uds=url.removeprefix("unix://"))
    with httpx.Client(transport=transport, base_url="http://gpud") as c:
        return c.post("/v1/jobs", json=body)


def test_missing_image_is_refused_at_submit(pdaemon: DaemonProc) -> None:
    r = _submit(pdaemon.url, image="localhost/no-such-image:1")
    assert r.status_code == 422
    assert "not in this machine's Podman store" in r.json()["detail"]


def test_wrong_python_is_refused_naming_both_versions(pdaemon: DaemonProc) -> None:
    r = _submit(pdaemon.url, python="3.99.1")
    assert r.status_code == 422
    detail = r.json()["detail"]
    image_python = "{}.{}".format(*sys.version_info[:2])
    assert "3.99.1" in detail and f"Python {image_python}." in detail
    assert "localhost/gpud-python" in detail


def test_image_without_python_is_refused(pdaemon: DaemonProc) -> None:
    base = "localhost/gpud-python:{}.{}".format(*sys.version_info)
    name = "localhost/gpud-test-nopython:1"
    build = subprocess.run(
        ["podman", "build", "--network=none", "-q", "-t", name, "-f", "-", "."],
        input=f"FROM {base}\nRUN rm -f /usr/bin/python3*\n",
        text=True,
        capture_output=True,
        cwd="/tmp",
    )
    assert build.returncode == 0, build.stderr
    try:
        r = _submit(pdaemon.url, image=name)
        assert r.status_code == 422 and "python3" in r.json()["detail"]
    finally:
        subprocess.run(["podman", "rmi", "-f", name], capture_output=True)


def test_images_lists_the_default_with_its_python(pdaemon: DaemonProc) -> None:
    with gpud.Client(pdaemon.url) as c:
        lst = c.images()
    default = [i for i in lst.images if i.name == lst.default]
    assert lst.executor == "podman" and default
    assert default[0].python is not None and default[0].python.startswith(
        "{}.{}.".format(*sys.version_info)
    )
    out = subprocess.run(
        [sys.executable, "-m", "gpud", "images"],
        capture_output=True,
        text=True,
        env={**os.environ, "GPUD_URL": pdaemon.url},
    )
    assert out.returncode == 0 and "gpud-python" in out.stdout


# -- the container spec (pure) -------------------------------------------------------------

IDENT = JobIdentity("nobody", 65534, 65534, "/nonexistent", switch=True)


def _spec(**kw: object) -> LaunchSpec:
    base: dict[str, object] = dict(
        job_id=7,
        attempt=2,
        job_dir=Path("/data/jobs/7"),
        log_path=Path("/data/jobs/7/output.log"),
        gpus=(),
    )
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def test_container_spec_is_locked_down_and_labelled() -> None:
    args = container_spec(
        _spec(memory=1 << 30, cpus=2.0),
        image="img",
        identity=IDENT,
        env={"A": "1"},
        runtime_dir=Path("/data/runtime/r1"),
        instance="abc",
        devices=[],
        network="none",
        read_only=True,
        volumes=["/srv/data:/data:ro"],
    )
    assert args["user"] == "65534:65534"
    assert args["no_new_privileges"] is True and args["cap_drop"] == ["ALL"]
    assert args["read_only"] is True and args["network_mode"] == "none"
    assert args["labels"] == {"gpud.job": "7", "gpud.daemon": "abc", "gpud.attempt": "2"}
    assert args["mem_limit"] == 1 << 30
    assert args["cpu_quota"] / args["cpu_period"] == 2.0
    mounts = {m["target"]: m for m in args["mounts"]}
    assert mounts["/gpud/runtime"]["read_only"] is True
    assert mounts["/gpud/job"]["source"] == "/data/jobs/7"
    assert mounts["/data"] == {
        "type": "bind",
        "source": "/srv/data",
        "target": "/data",
        "read_only": True,
    }
    assert mounts["/tmp"]["type"] == "tmpfs"
    binds = {t for t, m in mounts.items() if m["type"] == "bind"}
    assert binds == {"/gpud/runtime", "/gpud/job", "/data"}  # nothing else of the host
    assert args["environment"]["GPUD_LOG_FILE"] == "/gpud/job/output.log"


def test_container_runs_as_the_submitter_with_their_groups() -> None:
    """On a root daemon a job's LaunchSpec carries its submitter (#5): the container runs
    as that uid:gid with exactly their groups, and the environment names them."""
    from gpud.executors.process import job_environment

    alice = JobIdentity("alice", 1001, 1001, "/home/alice", switch=True, groups=(1001, 27))
    spec = _spec(identity=alice)
    args = container_spec(
        spec,
        image="img",
        identity=alice,
        env=job_environment(spec, alice, "abc"),
        runtime_dir=Path("/data/runtime/r1"),
        instance="abc",
        devices=[],
        network="none",
        read_only=True,
        volumes=[],
    )
    assert args["user"] == "1001:1001" and args["group_add"] == ["1001", "27"]
    env = args["environment"]
    assert (env["USER"], env["LOGNAME"], env["HOME"]) == ("alice", "alice", "/tmp")
    # The executor's default identity (no groups of its own) adds none.
    assert "group_add" not in container_spec(
        _spec(),
        image="img",
        identity=IDENT,
        env={},
        runtime_dir=Path("/r"),
        instance="abc",
        devices=[],
        network="none",
        read_only=True,
        volumes=[],
    )


def test_gpu_devices_by_cdi_uuid_exactly_the_jobs() -> None:
    uuids = ("GPU-aaaa", "GPU-bbbb")
    assert gpu_devices(uuids, (0, 3), fake=False, cdi=True) == [
        "nvidia.com/gpu=GPU-aaaa",
        "nvidia.com/gpu=GPU-bbbb",
    ]
    assert gpu_devices(uuids, (0, 3), fake=True, cdi=True) == []
    assert gpu_devices((), (), fake=False, cdi=True) == []


def test_gpu_devices_without_cdi_are_device_nodes(tmp_path: Path) -> None:
    nodes = gpu_devices(("GPU-aaaa",), (3,), fake=False, cdi=False)
    # Only nodes that exist on this machine are passed (none here without a driver).
    assert all(n.split(":")[0].startswith("/dev/nvidia") for n in nodes)
    assert all(os.path.exists(n.split(":")[0]) for n in nodes)


def test_cdi_detection(tmp_path: Path) -> None:
    assert not cdi_has_nvidia([str(tmp_path)])
    (tmp_path / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    assert cdi_has_nvidia([str(tmp_path)])


# -- warm containers -----------------------------------------------------------------------


@gpud.function
def whereami(tag: str) -> dict:
    import os
    import socket

    print(f"tag {tag}")
    return {"host": socket.gethostname(), "uid": os.getuid(), "tag": tag}


def test_warm_container_serves_the_next_call(pdaemon: DaemonProc) -> None:
    f = whereami.with_options(url=pdaemon.url, keep_warm=2)
    h1 = f.spawn("a")
    a = h1.get(timeout=60)
    h2 = f.spawn("b")
    b = h2.get(timeout=60)
    assert b["host"] == a["host"] and b["tag"] == "b"  # the same container
    assert (h1.status().start_kind, h2.status().start_kind) == ("cold", "warm")
    assert b["uid"] != 0
    assert "".join(h2.logs()).strip() == "tag b"  # each job's output in its own log
    # keep_warm runs out: the container goes, and the next call starts a new one.
    deadline = time.monotonic() + 30
    while containers_of(pdaemon) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert containers_of(pdaemon) == []
    assert f.remote("c")["host"] != a["host"]


def test_cancel_ends_the_warm_container(pdaemon: DaemonProc) -> None:
    @gpud.function
    def nap(seconds: float) -> str:
        import socket
        import time

        time.sleep(seconds)
        return socket.gethostname()

    f = nap.with_options(url=pdaemon.url, keep_warm=60)
    host = f.remote(0)
    h = f.spawn(600)
    with gpud.Client(pdaemon.url) as c:
        deadline = time.monotonic() + 30
        while c.get_job(h.id).state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert h.status().start_kind == "warm"
    assert h.cancel().state == "cancelled"
    deadline = time.monotonic() + 15
    while containers_of(pdaemon) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert containers_of(pdaemon) == []  # the warm container went with its job
    assert f.remote(0) != host


@gpud.function
def hog(mb: int) -> int:
    block = b"x" * (mb * 1024 * 1024)  # written, so every page is really used
    return len(block)


def test_a_container_killed_for_memory_says_so(pdaemon: DaemonProc) -> None:
    """#16: an OOM kill is exit 137 like any SIGKILL; the container's OOMKilled tells."""
    handle = hog.with_options(url=pdaemon.url, memory="64m").spawn(256)
    info = handle.wait(timeout=120)
    assert info.state == "failed"
    assert info.error is not None and info.error.startswith("out of memory (limit 64m)"), info.error
    out = subprocess.run(
        [*GPUD, "ps", "--all"], env=pdaemon.client_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    [row] = [line for line in out.stdout.splitlines() if line.split()[:1] == [str(handle.id)]]
    assert "out of memory (limit 64m)" in row, out.stdout


@gpud.function
def exit_137() -> None:
    import os

    # What a SIGKILL looks like from outside (the job is pid 1 in its container, which
    # signals from inside cannot kill).
    os._exit(137)


def test_exit_137_under_a_memory_limit_is_not_called_out_of_memory(pdaemon: DaemonProc) -> None:
    info = exit_137.with_options(url=pdaemon.url, memory="64m").spawn().wait(timeout=120)
    assert info.state == "failed" and info.error is not None
    assert "out of memory" not in info.error and "137" in info.error, info.error


def test_the_outcome_names_the_limit_only_for_an_oom_kill(tmp_path: Path) -> None:
    from gpud.daemon.jobfiles import judge
    from gpud.executors.base import Outcome

    oom = judge(tmp_path, None, False, Outcome(137, oom_killed=True, memory_limit=64 << 20))
    assert oom.error is not None and oom.error.startswith("out of memory (limit 64m)")
    big = judge(tmp_path, None, False, Outcome(137, oom_killed=True, memory_limit=4 << 30))
    assert big.error is not None and big.error.startswith("out of memory (limit 4g)")
    plain = judge(tmp_path, None, False, Outcome(137))
    assert plain.error == "the job's process exited with code 137 without writing a result"


def test_the_oom_counter_of_cgroup_v1_and_v2(tmp_path: Path) -> None:
    from gpud.executors import oom

    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    v2 = tmp_path / "memory.events"
    v2.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert (oom.kills(v1), oom.kills(v2), oom.kills(tmp_path / "gone")) == (2, 1, None)
    me = oom.counter_file(os.getpid())  # this process's own memory cgroup, where one is
    assert me is None or oom.kills(me) is not None
