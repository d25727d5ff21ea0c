"""A job runs in its caller's own Python environment (issue #11), end to end.

Real venvs and a conda-style prefix are made here, each with a module the daemon's
interpreter lacks; the client runs *from* them (`venv/bin/python -m gpud run ...`), as a
user in an activated environment would. Their base interpreter is one the job's user can
run (as root, jobs of root run as ``nobody``, who cannot enter a 0700 /root).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.domain import PythonEnv
from gpud.executors.base import ExecutorRefusal
from gpud.executors.process import job_identity
from gpud.interpreters import Interpreters, Probe, activation_env
from gpud_client import ApiError, Client
from gpud_client.models import SubmitRequest
from gpud_client.payload import dumps_args, dumps_function

from .conftest import (
    REPO,
    DaemonProc,
    UnixUser,
    _run_daemon,
    executor_env,
    free_port,
    needs_root,
)

MINOR = "{}.{}".format(*sys.version_info[:2])


def _others_can_run(path: str) -> bool:
    """Can a user other than root and the owner execute ``path`` (every directory on
    the way searchable, the file executable, by "others")?"""
    real = Path(os.path.realpath(path))
    for d in [*real.parents, real]:
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _base_python() -> str:
    """A Python of this major.minor that the job's user can run."""
    candidates = [sys.executable, f"/usr/bin/python{MINOR}", f"/usr/local/bin/python{MINOR}"]
    for c in candidates:
        if os.path.exists(c) and (os.geteuid() != 0 or _others_can_run(c)):
            out = subprocess.run(
                [c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
            )
            if out.stdout.strip() == MINOR:
                return os.path.realpath(c)
    pytest.skip(f"no Python {MINOR} that the job user can run")


def _site_dir(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    )
    d = Path(out.stdout.strip())
    d.mkdir(parents=True, exist_ok=True)
    return d


def _client_can_import_gpud(site: Path) -> None:
    """The client side runs in the environment too: give it gpud (this checkout) and
    its dependencies (this test run's site-packages) by a .pth file, as an editable
    install would. The job needs none of it."""
    deps = sysconfig.get_paths()["purelib"]
    (site / "zz_gpud_client.pth").write_text(f"{REPO}\n{deps}\n")


def make_venv(where: Path) -> tuple[Path, Path]:
    """`python -m venv` (no pip: no network); returns (its bin/python, site-packages)."""
    subprocess.run(
        [_base_python(), "-m", "venv", "--without-pip", str(where)], check=True, capture_output=True
    )
    python = where / "bin" / "python"
    site = _site_dir(python)
    _client_can_import_gpud(site)
    return python, site


def make_conda_prefix(where: Path) -> tuple[Path, Path]:
    """A conda-style prefix: a real interpreter binary in bin/, the standard library
    under lib/pythonX.Y (linked, but for its own site-packages), and conda-meta/."""
    base = _base_python()
    out = subprocess.run(
        [base, "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    stdlib = Path(out.stdout.strip())
    (where / "bin").mkdir(parents=True)
    shutil.copy2(base, where / "bin" / "python")
    lib = where / "lib" / f"python{MINOR}"
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name not in ("site-packages", "dist-packages"):
            (lib / entry.name).symlink_to(entry)
    (where / "conda-meta").mkdir()
    (where / "conda-meta" / "history").write_text("# made by gpud's tests\n")
    python = where / "bin" / "python"
    found = subprocess.run(
        [str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True
    )
    if found.stdout.strip() != str(where):
        pytest.skip(
            f"a copied {base} does not take its prefix from where it lies: "
            f"{found.stdout.strip() or found.stderr.strip()}"
        )
    site = _site_dir(python)
    _client_can_import_gpud(site)
    return python, site


HZ = """
import gpud_client as gpud

app = gpud.App("hz")


@app.function(keep_warm=KEEP)
def hz(n: int = 3) -> dict:
    import os
    import sys

    import hzmod

    try:
        import newmod
        new = newmod.VALUE
    except ImportError:
        new = None
    return {"hz": hzmod.hz(n), "exe": sys.executable, "prefix": sys.prefix,
            "venv": os.environ.get("VIRTUAL_ENV"), "conda": os.environ.get("CONDA_PREFIX"),
            "path0": os.environ["PATH"].split(":")[0], "pid": os.getpid(), "new": new}
"""


def write_target(d: Path, keep_warm: float = 0) -> Path:
    p = d / "hz.py"
    p.write_text(HZ.replace("KEEP", repr(keep_warm)))
    os.chmod(d, 0o755)
    return p


def client_env(daemon: DaemonProc) -> dict[str, str]:
    env = daemon.client_env()
    env.pop("GPUD_JOB_PYTHON", None)  # the default: the caller's own interpreter
    env.pop("PYTHONPATH", None)
    return env


def gpud_run(
    python: Path, target: Path, daemon: DaemonProc, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "gpud", "run", f"{target}::hz", "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=client_env(daemon),
        cwd=str(target.parent),
    )


@pytest.fixture
def envs(base_dir: Path) -> Iterator[Path]:
    d = base_dir / "envs"
    d.mkdir()
    os.chmod(d, 0o755)
    yield d


def test_a_job_imports_a_module_from_the_callers_venv(
    process_daemon: DaemonProc, envs: Path
) -> None:
    python, site = make_venv(envs / "venv")
    (site / "hzmod.py").write_text("def hz(n):\n    return f'{n} Hz from the venv'\n")
    # The daemon's own interpreter lacks it: without the caller's env this job would fail.
    assert (
        subprocess.run([sys.executable, "-c", "import hzmod"], capture_output=True).returncode != 0
    )
    out = gpud_run(python, write_target(envs), process_daemon)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["hz"] == "3 Hz from the venv"
    assert got["exe"] == str(python)  # the venv's, not the interpreter it links to
    assert got["prefix"] == got["venv"] == str(envs / "venv")
    assert got["path0"] == str(envs / "venv" / "bin")
    # The job's JSON and `gpud ps` say which interpreter ran it.
    ps = subprocess.run(
        [sys.executable, "-m", "gpud", "ps", "--all", "--json"],
        capture_output=True,
        text=True,
        env=process_daemon.client_env(),
    )
    job = json.loads(ps.stdout)[0]
    assert job["python_path"] == str(python) and job["python_prefix"] == str(envs / "venv")
    table = subprocess.run(
        [sys.executable, "-m", "gpud", "ps", "--all"],
        capture_output=True,
        text=True,
        env=process_daemon.client_env(),
    )
    assert "PYTHON" in table.stdout and str(python) in table.stdout


def test_a_job_runs_in_a_conda_style_prefix(process_daemon: DaemonProc, envs: Path) -> None:
    python, site = make_conda_prefix(envs / "conda")
    (site / "hzmod.py").write_text("def hz(n):\n    return f'{n} Hz from conda'\n")
    out = gpud_run(python, write_target(envs), process_daemon)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["hz"] == "3 Hz from conda"
    assert got["conda"] == got["prefix"] == str(envs / "conda")
    assert got["venv"] is None and got["path0"] == str(envs / "conda" / "bin")


def test_python_daemon_and_python_path_override_the_callers(
    process_daemon: DaemonProc, envs: Path
) -> None:
    python, site = make_venv(envs / "venv")
    (site / "hzmod.py").write_text("def hz(n):\n    return 'from the venv'\n")
    other, other_site = make_venv(envs / "other")
    (other_site / "hzmod.py").write_text("def hz(n):\n    return 'from the other venv'\n")
    target = write_target(envs)
    out = gpud_run(python, target, process_daemon, "--python", str(other))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["hz"] == "from the other venv"
    # The admin's interpreter has no hzmod: the job fails there, as it should.
    out = gpud_run(python, target, process_daemon, "--python", "daemon")
    assert out.returncode != 0 and "No module named 'hzmod'" in out.stderr


def test_pip_install_into_the_venv_gives_the_next_warm_call_a_fresh_worker(
    process_daemon: DaemonProc, envs: Path
) -> None:
    python, site = make_venv(envs / "venv")
    (site / "hzmod.py").write_text("def hz(n):\n    return n\n")
    write_target(envs, keep_warm=60)
    script = envs / "calls.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, pathlib, sys
        sys.path.insert(0, {str(envs)!r})
        import hz
        first = hz.hz.remote()
        again = hz.hz.remote()
        # "pip install newmod": a new module (and dist-info) lands in site-packages.
        site = pathlib.Path({str(site)!r})
        (site / "newmod.py").write_text("VALUE = 'installed'\\n")
        (site / "newmod-1.0.dist-info").mkdir()
        after = hz.hz.remote()
        print(json.dumps([first, again, after]))
    """)
    )
    out = subprocess.run(
        [str(python), str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=client_env(process_daemon),
        cwd=str(envs),
    )
    assert out.returncode == 0, out.stderr
    first, again, after = json.loads(out.stdout)
    assert first["new"] is None and again["pid"] == first["pid"]  # warm, as before
    assert after["new"] == "installed" and after["pid"] != first["pid"]


@needs_root
def test_a_users_venv_on_a_root_daemon_runs_as_them(base_dir: Path, unix_users: object) -> None:
    """The issue's scenario: a root daemon, a user whose venv has a package the daemon's
    interpreter lacks; her job runs as her, with her venv."""
    from .test_shared_box import add_user, tcp_url

    carol: UnixUser = unix_users("carol")  # type: ignore[operator]
    home = carol.home
    os.chmod(home, 0o755)
    python, site = make_venv(home / "venv")
    (site / "hzmod.py").write_text("def hz(n):\n    return f'{n} Hz, carol'\n")
    target = write_target(home)
    subprocess.run(["chown", "-R", f"{carol.uid}:{carol.gid}", str(home)], check=True)
    for d in _run_daemon(base_dir, {"GPUD_TCP": f"127.0.0.1:{free_port()}"}):
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "GPUD_URL": tcp_url(d),
            "GPUD_TOKEN": add_user(d, carol.name),
        }
        out = subprocess.run(
            [str(python), "-m", "gpud", "run", f"{target}::hz", "--json"],
            user=carol.uid,
            group=carol.gid,
            extra_groups=[],
            env=env,
            cwd=str(home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert got["hz"] == "3 Hz, carol" and got["exe"] == str(python)
        assert got["venv"] == str(home / "venv")


# -- refusals: each at submit, each saying what to do --------------------------------


def _submit(daemon: DaemonProc, **fields: object) -> ApiError:
    fn, _ = dumps_function(len)
    req = SubmitRequest(
        name="refused",
        function=fn,
        args=dumps_args(([],), {}),
        **{"python": "{}.{}.{}".format(*sys.version_info[:3]), **fields},
    )
    with Client(daemon.url) as c, pytest.raises(ApiError) as e:
        c.submit(req)
    assert e.value.status == 422
    return e.value


def test_a_missing_interpreter_is_refused(process_daemon: DaemonProc, envs: Path) -> None:
    e = _submit(process_daemon, python_path=str(envs / "gone" / "bin" / "python"))
    assert "does not exist on the daemon's machine" in str(e)
    assert 'python="daemon"' in str(e)


def test_an_interpreter_the_job_user_cannot_execute_is_refused(
    process_daemon: DaemonProc, envs: Path
) -> None:
    if os.geteuid() == 0:
        # Root's venv in a 0700 directory, while root's jobs run as job_user (nobody).
        private = envs / "private"
        private.mkdir(mode=0o700)
        python, _ = make_venv(private / "venv")
        os.chmod(private, 0o700)
    else:
        python = envs / "python"
        python.write_text("#!/bin/sh\n")
        os.chmod(python, 0o644)
    e = _submit(process_daemon, python_path=str(python))
    assert "cannot execute" in str(e) and 'python="daemon"' in str(e)
    if os.geteuid() == 0:
        assert f"{envs / 'private'} is mode 0700" in str(e)
        assert "job_user" in str(e) and "'nobody'" in str(e)
        # Whether something is there, behind a directory the job user cannot enter, is
        # not for that user to learn: the same answer.
        e = _submit(process_daemon, python_path=str(envs / "private" / "nope" / "python"))
        assert "cannot execute" in str(e) and "does not exist" not in str(e)


def test_a_version_mismatch_is_refused(process_daemon: DaemonProc, envs: Path) -> None:
    python, _ = make_venv(envs / "venv")
    # Pickled by another major.minor than the interpreter's: could never load.
    e = _submit(process_daemon, python="3.9.1", python_path=str(python))
    assert "pickled by Python 3.9.1" in str(e) and "is Python 3." in str(e)
    # The caller's own interpreter (prefix given), but not the version it runs: the
    # interpreter changed under the caller's session.
    actual = subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    wrong = f"{MINOR}.{int(actual.rsplit('.', 1)[1]) + 1}"
    e = _submit(
        process_daemon, python=wrong, python_path=str(python), python_prefix=str(envs / "venv")
    )
    assert f"is Python {actual} now, but you run it as {wrong}" in str(e)
    assert "restart" in str(e)
    # Another environment at that path than the caller's (e.g. submitted from another
    # machine): said as such.
    e = _submit(
        process_daemon, python=actual, python_path=str(python), python_prefix="/elsewhere/venv"
    )
    assert "not the interpreter you submit from" in str(e)


def test_allowed_pythons_restricts_interpreters(base_dir: Path, envs: Path) -> None:
    python, site = make_venv(envs / "venv")
    (site / "hzmod.py").write_text("def hz(n):\n    return 'ok'\n")
    allowed = f"{envs}/allowed-*/bin/python"
    for d in _run_daemon(base_dir, {"GPUD_ALLOWED_PYTHONS": allowed}):
        e = _submit(d, python_path=str(python))
        assert "allowed_pythons" in str(e) and allowed in str(e)
        assert 'python="daemon"' in str(e)
        ok, ok_site = make_venv(envs / "allowed-1")
        (ok_site / "hzmod.py").write_text("def hz(n):\n    return 'allowed'\n")
        out = gpud_run(ok, write_target(envs), d)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["hz"] == "allowed"
        # The admin's own interpreter is always allowed.
        out = gpud_run(python, write_target(envs), d, "--python", "daemon")
        assert "allowed_pythons" not in out.stderr


def test_the_podman_executor_runs_the_images_python_whatever_the_caller_runs(
    base_dir: Path,
) -> None:
    """With Podman the caller's interpreter path means nothing (the image's python3
    runs): a job from an interpreter no job user could run still runs, as before #11."""
    import gpud_client as gpud

    env = executor_env("podman")  # skips without Podman
    for d in _run_daemon(base_dir, env):
        fn = gpud.function(url=d.url, python="/nowhere/bin/python")(_where)
        assert fn.remote().startswith("/usr/")  # the image's, not /nowhere/bin/python
        with Client(d.url) as c:
            assert c.list_jobs(state="succeeded").jobs[0].python_path is None


def _where() -> str:
    import sys

    return sys.executable


# -- the parts, without a daemon ------------------------------------------------------


def test_probes_are_cached_until_the_interpreter_changes(base_dir: Path) -> None:
    from gpud_client.jobdir import install_runtime

    tmp_path = base_dir

    runtime = install_runtime(tmp_path / "runtime")
    ident = job_identity("nobody")
    python, _ = make_venv(tmp_path / "venv")
    os.chmod(tmp_path, 0o755)
    interp = Interpreters(runtime)
    version = subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    first = interp.check(
        str(python), version=version, prefix=str(tmp_path / "venv"), ident=ident, owner=ident.user
    )
    again = interp.check(str(python), version=version, prefix=None, ident=ident, owner=ident.user)
    assert interp.probes_run == 1 and first == again and first.kind == "venv"
    # A new interpreter at that path (a recreated venv) is probed again.
    link = python
    target = os.readlink(link)
    link.unlink()
    link.symlink_to(target)
    interp.check(str(python), version=version, prefix=None, ident=ident, owner=ident.user)
    assert interp.probes_run == 2
    with pytest.raises(ExecutorRefusal, match="absolute path"):
        interp.check("python3", version=version, prefix=None, ident=ident, owner=ident.user)


def test_activation_env_is_what_activate_would_set() -> None:
    venv = PythonEnv(path="/v/bin/python", prefix="/v", kind="venv", version="3.11.7")
    assert activation_env(venv, "/usr/bin:/bin") == {
        "VIRTUAL_ENV": "/v",
        "PATH": "/v/bin:/usr/bin:/bin",
    }
    conda = PythonEnv(
        path="/c/envs/t/bin/python", prefix="/c/envs/t", kind="conda", version="3.11.7"
    )
    assert activation_env(conda, "/c/envs/t/bin:/bin") == {
        "CONDA_PREFIX": "/c/envs/t",
        "CONDA_DEFAULT_ENV": "t",
        "PATH": "/c/envs/t/bin:/bin",
    }
    pyenv = PythonEnv(path="/p/3.11/bin/python3", prefix="/p/3.11", kind="system", version="3.11.7")
    assert activation_env(pyenv, "/bin")["PATH"] == "/p/3.11/bin:/bin"
    admin = PythonEnv(path="/usr/bin/python3", prefix="/usr", kind="daemon", version="3.11.2")
    assert activation_env(admin, "/bin") == {}
    assert Probe("3.11.7", "/usr", "/usr", ()).kind == "system"
