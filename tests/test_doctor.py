"""`gpud doctor` (#16): each check passes here where it can, and each is shown to fail
by breaking one real thing (a permission, a socket nothing answers on, an interpreter
that is not there, a damaged ledger file)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud import doctor
from gpud.config import Config, load_config
from gpud.doctor import check_cgroups, check_data_dir, check_ledger, check_socket
from tests.conftest import TEST_SETTINGS, DaemonProc, gpud_cli, require_podman

HAS_DRIVER = doctor.NVIDIA_PROC_VERSION.exists()
GPU_CHECKS = ("nvidia driver", "nvml", "cdi specs", "cuda checkpoint")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def cfg_for(base: Path, **overrides: object) -> Config:
    return load_config(
        env={}, data_dir=str(base / "data"), socket=str(base / "gpud.sock"), **overrides
    )


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def doctor_cli(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUD_")}
    return gpud_cli(
        "doctor",
        "--data-dir",
        str(base / "data"),
        "--socket",
        str(base / "gpud.sock"),
        *args,
        env=env,
    )


# -- this machine ------------------------------------------------------------------------


def test_this_machine_passes_every_check_it_can(base_dir: Path) -> None:
    (base_dir / "data").mkdir()
    out = doctor_cli(base_dir, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == [n for n, _ in doctor.CHECKS]
    assert not [c for c in checks.values() if c["status"] == "fail"]
    for name in GPU_CHECKS:
        if HAS_DRIVER:
            assert checks[name]["status"] != "fail"
        else:  # not applicable, and says why
            assert checks[name]["status"] == "n/a", checks[name]
            assert (
                "no NVIDIA driver" in checks[name]["message"]
                or "executor" in checks[name]["message"]
            )
    assert checks["data dir"]["status"] == "ok"
    assert checks["job interpreter"]["status"] == "ok"
    assert checks["socket"]["status"] == "n/a"  # no daemon: not an error
    assert checks["ledger"]["status"] == "n/a"


def test_human_output_is_one_line_per_check_with_what_to_do(base_dir: Path) -> None:
    (base_dir / "data").mkdir()
    os.chmod(base_dir / "data", 0o777)
    out = doctor_cli(base_dir)
    assert out.returncode == 1  # a failed check
    lines = [ln for ln in out.stdout.splitlines() if not ln.startswith(" ")]
    assert len(lines) == len(doctor.CHECKS)
    bad = next(ln for ln in lines if "data dir" in ln)
    assert bad.startswith("fail")
    assert "-> chmod" in out.stdout
    assert "1 fail" in out.stderr


def test_with_a_running_daemon_and_its_live_ledger(process_daemon: DaemonProc) -> None:
    """The daemon answers on its socket; the read-only ledger check leaves its WAL (and
    so its commits) alone: a later job is still seen by another process."""
    env = process_daemon.client_env()
    first = gpud_cli("run", "examples/hello.py::square", "--x", "3", env=env)
    assert first.returncode == 0 and first.stdout.strip() == "9", first.stderr
    out = doctor_cli(process_daemon.base, "--json")
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["socket"]["status"] == "ok", checks["socket"]
    assert checks["ledger"]["status"] == "ok", checks["ledger"]
    assert "quick_check ok" in checks["ledger"]["message"]
    # After the check, the daemon's commits still reach other processes.
    before = _count_jobs(process_daemon.data_dir / "ledger.db")
    submit = gpud_cli("run", "--detach", "examples/hello.py::square", "--x", "4", env=env)
    assert submit.returncode == 0, submit.stderr
    assert _count_jobs(process_daemon.data_dir / "ledger.db") == before + 1
    assert (process_daemon.data_dir / "ledger.db-wal").exists()


def _count_jobs(path: Path) -> int:
    code = (
        "import sqlite3,sys; c=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro', uri=True);"
        "print(c.execute('select count(*) from jobs').fetchone()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(out.stdout)


# -- the data dir ---------------------------------------------------------------------------


def test_a_world_writable_data_dir_fails(base_dir: Path) -> None:
    (base_dir / "data").mkdir()
    os.chmod(base_dir / "data", 0o777)
    c = check_data_dir(cfg_for(base_dir))
    assert c.status == "fail" and "0777" in c.message
    assert c.fix.startswith("chmod 7")


@needs_root
def test_a_data_dir_of_another_user_fails(base_dir: Path) -> None:
    (base_dir / "data").mkdir()
    os.chown(base_dir / "data", 65534, 65534)
    c = check_data_dir(cfg_for(base_dir))
    assert c.status == "fail" and "uid 65534" in c.message and c.fix.startswith("chown")


def test_low_free_space_warns(base_dir: Path) -> None:
    (base_dir / "data").mkdir()
    c = check_data_dir(cfg_for(base_dir), low_free=2**62)
    assert c.status == "warn" and "GiB free" in c.message and "gpud gc" in c.fix


def test_a_missing_data_dir_is_created_by_serve(base_dir: Path) -> None:
    assert check_data_dir(cfg_for(base_dir)).status == "ok"


# -- the socket ---------------------------------------------------------------------------


def test_socket_states(base_dir: Path) -> None:
    cfg = cfg_for(base_dir)
    assert check_socket(cfg).status == "n/a"
    cfg.socket.write_text("not a socket")
    assert check_socket(cfg).status == "fail"
    cfg.socket.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(cfg.socket))
    os.chmod(cfg.socket, 0o660 if os.geteuid() == 0 else 0o600)
    stale = check_socket(cfg)  # bound, nobody listening: a daemon killed uncleanly
    assert stale.status == "warn" and "nothing answers" in stale.message
    s.listen(1)
    assert check_socket(cfg).status == "ok"
    os.chmod(cfg.socket, 0o666)
    wrong = check_socket(cfg)
    assert wrong.status == "warn" and "0666" in wrong.message
    s.close()


# -- the job interpreter ------------------------------------------------------------------


def test_a_missing_interpreter_fails(base_dir: Path) -> None:
    c = doctor.check_interpreter(cfg_for(base_dir, python="/nonexistent/bin/python3"))
    assert c.status == "fail" and "/nonexistent/bin/python3" in c.message
    assert "set python" in c.fix


@needs_root
def test_an_interpreter_the_job_user_cannot_execute_fails(base_dir: Path) -> None:
    private = base_dir / "private"
    private.mkdir(mode=0o700)
    python = private / "python3"
    python.symlink_to(sys.executable)
    assert subprocess.run([str(python), "-c", "pass"], timeout=30).returncode == 0  # root can
    c = doctor.check_interpreter(cfg_for(base_dir, python=str(python)))
    assert c.status == "fail" and "nobody" in c.message


def test_the_default_interpreter_runs_as_the_job_user(base_dir: Path) -> None:
    c = doctor.check_interpreter(cfg_for(base_dir))
    assert c.status == "ok" and "Python 3." in c.message


# -- Podman and its service ---------------------------------------------------------------


def test_a_stopped_podman_service_fails_and_says_how_to_start_it(base_dir: Path) -> None:
    url = f"unix://{base_dir}/podman.sock"  # nothing listens there
    c = doctor.check_podman_service(cfg_for(base_dir, executor="podman", podman_url=url))
    assert c.status == "fail" and url in c.message
    assert "systemctl enable --now podman.socket" in c.fix
    # podman_start_service: the daemon would start it, so only a warning ...
    c = doctor.check_podman_service(
        cfg_for(base_dir, executor="podman", podman_url=url, podman_start_service="true")
    )
    assert c.status == "warn"
    # ... and the process executor does not need it at all.
    c = doctor.check_podman_service(cfg_for(base_dir, podman_url=url))
    assert c.status == "n/a" and "executor = process" in c.message


@pytest.fixture
def broken_service(base_dir: Path) -> Iterator[str]:
    """A socket whose server answers every request with 500, as a wedged service does."""
    path = base_dir / "broken.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"unix://{path}"
    srv.shutdown(socket.SHUT_RDWR)
    srv.close()
    t.join(5)


def test_a_broken_podman_service_fails(base_dir: Path, broken_service: str) -> None:
    c = doctor.check_podman_service(cfg_for(base_dir, executor="podman", podman_url=broken_service))
    assert c.status == "fail" and "500" in c.message and "restart" in c.fix


@pytest.mark.podman
def test_a_running_podman_service_is_ok(base_dir: Path) -> None:
    require_podman()
    url = f"unix://{base_dir}/own-podman.sock"  # our own service; the shared one is left be
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cfg = cfg_for(base_dir, executor="podman", podman_url=url)
        for _ in range(100):
            c = doctor.check_podman_service(cfg)
            if c.status == "ok":
                break
            proc.wait(0.1) if proc.poll() is not None else threading.Event().wait(0.1)
        assert c.status == "ok", c
        assert doctor.check_podman(cfg).status == "ok"
        assert doctor.check_criu(cfg).status == "ok"
        assert doctor.check_runtime(cfg).status == "ok"
        assert doctor.check_cgroups(cfg).status == "ok"
    finally:
        proc.terminate()
        proc.wait(15)


def test_criu_missing_from_path_warns(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("`criu check` needs root")
    monkeypatch.setenv("PATH", str(base_dir))  # an empty directory: no criu on the PATH
    c = doctor.check_criu(cfg_for(base_dir, executor="podman"))
    assert c.status == "warn" and "not installed" in c.message


def test_crun_as_the_runtime_warns_that_snapshots_fail(base_dir: Path) -> None:
    conf = base_dir / "containers.conf"
    conf.write_text('[engine]\nruntime = "crun"\n')
    c = doctor.check_runtime(cfg_for(base_dir, executor="podman"), conf=conf)
    if c.status == "fail":  # neither runc nor crun on this machine
        assert "neither" in c.message
    else:
        assert c.status == "warn" and 'runtime = "runc"' in c.fix


def test_cgroups_without_the_controllers_gpud_needs_fail(base_dir: Path) -> None:
    root = base_dir / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io\n")
    c = check_cgroups(cfg_for(base_dir, executor="podman"), root=root)
    assert c.status == "fail" and "memory, pids" in c.message
    assert check_cgroups(cfg_for(base_dir), root=root).status == "n/a"
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids hugetlb\n")
    assert check_cgroups(cfg_for(base_dir, executor="podman"), root=root).status == "ok"


def test_hybrid_cgroups_with_hugetlb_on_v2_fail(base_dir: Path) -> None:
    root = base_dir / "cgroup"
    for d in ("cpu", "memory", "pids", "unified"):
        (root / d).mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    c = check_cgroups(cfg_for(base_dir, executor="podman"), root=root)
    assert c.status == "fail" and "hugetlb" in c.message


def test_a_listen_backlog_over_the_limits_warns(base_dir: Path) -> None:
    c = doctor.check_limits(cfg_for(base_dir, listen_backlog=10**9))
    assert c.status == "warn" and "somaxconn" in c.message


# -- GPUs ---------------------------------------------------------------------------------


def test_gpu_checks_are_not_applicable_with_fake_gpus(base_dir: Path) -> None:
    cfg = cfg_for(base_dir, gpus="fake")
    for fn in (
        doctor.check_driver,
        doctor.check_nvml,
        doctor.check_cdi,
        doctor.check_cuda_checkpoint,
    ):
        c = fn(cfg)
        assert c.status == "n/a" and 'gpus = "fake"' in c.message


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_a_driver_without_its_libraries(base_dir: Path) -> None:
    """A kernel module whose user-space libraries are missing (half an install)."""
    proc = base_dir / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19\n")
    cfg = cfg_for(base_dir, executor="podman")
    assert doctor.check_driver(cfg, proc).message == "kernel module 535.104.05"
    nvml = doctor.check_nvml(cfg, proc)
    assert nvml.status == "fail" and "libnvidia-ml" in nvml.fix
    ckpt = doctor.check_cuda_checkpoint(cfg, proc, libcuda=str(base_dir / "libcuda.so.1"))
    assert ckpt.status == "warn" and "not found" in ckpt.message and ">= 570" in ckpt.fix
    cdi = doctor.check_cdi(cfg, dirs=(str(base_dir / "cdi"),), proc_version=proc)
    assert cdi.status == "warn" and "nvidia-ctk cdi generate" in cdi.fix
    (base_dir / "cdi").mkdir()
    (base_dir / "cdi" / "nvidia.yaml").write_text("kind: nvidia.com/gpu\n")
    cdi = doctor.check_cdi(cfg, dirs=(str(base_dir / "cdi"),), proc_version=proc)
    assert cdi.status == "ok"


# -- time and the ledger ------------------------------------------------------------------


def test_time_sync(base_dir: Path) -> None:
    c = doctor.check_time_sync(base_dir)
    assert c.status in ("ok", "warn", "n/a") and c.message
    if c.status == "n/a":  # nothing to ask here: the timesyncd flag file is the last resort
        (base_dir / "synchronized").touch()
        assert doctor.check_time_sync(base_dir).status == "ok"


def test_ledger_states(base_dir: Path) -> None:
    from gpud.ledger import Ledger
    from gpud.ledger.schema import SCHEMA_VERSION

    cfg = cfg_for(base_dir)
    assert check_ledger(cfg).status == "n/a"
    cfg.data_dir.mkdir()
    Ledger(cfg.ledger_path).close()
    good = check_ledger(cfg)
    assert good.status == "ok" and f"schema {SCHEMA_VERSION}" in good.message
    conn = sqlite3.connect(cfg.ledger_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    newer = check_ledger(cfg)
    assert newer.status == "fail" and "newer" in newer.message


def test_a_damaged_ledger_fails(base_dir: Path) -> None:
    from gpud.ledger import Ledger

    cfg = cfg_for(base_dir)
    cfg.data_dir.mkdir()
    Ledger(cfg.ledger_path).close()
    data = bytearray(cfg.ledger_path.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)  # every page past the first
    cfg.ledger_path.write_bytes(bytes(data))
    c = check_ledger(cfg)
    assert c.status == "fail" and "backup" in c.fix


def test_doctor_reads_settings_as_serve_does(base_dir: Path) -> None:
    cfg_file = base_dir / "gpud.toml"
    cfg_file.write_text(f'data_dir = "{base_dir / "elsewhere"}"\n')
    (base_dir / "elsewhere").mkdir()
    os.chmod(base_dir / "elsewhere", 0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUD_")}
    env.update({k: v for k, v in TEST_SETTINGS.items() if k == "GPUD_GPUS"})
    out = gpud_cli("doctor", "--config", str(cfg_file), "--json", env=env)
    assert out.returncode == 1
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert "elsewhere" in checks["data dir"]["message"]
    assert checks["nvml"]["status"] == "n/a"  # GPUD_GPUS=fake from the environment
    bad = gpud_cli("doctor", "--config", str(base_dir / "missing.toml"), env=env)
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_podman_and_runtimes_missing_from_path_fail(
    base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(base_dir))  # an empty directory: nothing is installed
    cfg = cfg_for(base_dir, executor="podman")
    c = doctor.check_podman(cfg)
    assert c.status == "fail" and "not installed" in c.message and "apt-get" in c.fix
    c = doctor.check_runtime(cfg, conf=base_dir / "none.conf")
    assert c.status == "fail" and "neither runc nor crun" in c.message
    # The process executor needs neither.
    assert doctor.check_podman(cfg_for(base_dir)).status == "n/a"


def test_cuda_checkpoint_support_as_the_daemon_finds_it(base_dir: Path) -> None:
    """Over the compiled stand-in libcuda of tests/test_cudackpt.py: a driver with the API
    is ok; one without it (CUDA 12.2) warns and says which driver is needed."""
    from tests.test_cudackpt import _build_stub

    proc = base_dir / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu\n")
    cfg = cfg_for(base_dir)
    good = doctor.check_cuda_checkpoint(cfg, proc, libcuda=str(_build_stub(base_dir)))
    assert good.status == "ok" and "CUDA 13.0" in good.message
    (base_dir / "old").mkdir()
    old = _build_stub(base_dir / "old", "-DOLD_DRIVER", "-DCUDA_VERSION_STUB=12020")
    bad = doctor.check_cuda_checkpoint(cfg, proc, libcuda=str(old))
    assert bad.status == "warn" and "no CUDA checkpoint API" in bad.message


# -- how a root daemon switches to the job user ---------------------------------------------


def test_the_user_switch_warns_without_a_trusted_setpriv(base_dir: Path) -> None:
    cfg = cfg_for(base_dir)
    missing = doctor.check_user_switch(cfg, setpriv_paths=(str(base_dir / "setpriv"),), euid=0)
    assert missing.status == "warn" and "util-linux" in missing.fix
    # One that others may write to is no better than none: a root daemon would exec it.
    loose = base_dir / "setpriv"
    shutil.copy(shutil.which("true") or "/bin/true", loose)
    os.chmod(loose, 0o777)
    assert doctor.check_user_switch(cfg, setpriv_paths=(str(loose),), euid=0).status == "warn"
    assert doctor.check_user_switch(cfg, setpriv_paths=(str(loose),), euid=1000).status == "n/a"


@needs_root
def test_the_user_switch_is_ok_with_a_root_owned_setpriv(base_dir: Path) -> None:
    good = base_dir / "setpriv"
    shutil.copy(shutil.which("true") or "/bin/true", good)
    os.chmod(good, 0o755)
    c = doctor.check_user_switch(cfg_for(base_dir), setpriv_paths=(str(good),), euid=0)
    assert c.status == "ok" and str(good) in c.message
