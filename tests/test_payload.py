"""payload: functions travel by value with their project's modules; results come back as
the original value or exception."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from cloudpickle import cloudpickle as cloudpickle_impl

from gpud_client import RemoteError, VersionMismatch
from gpud_client.models import JobInfo
from gpud_client.payload import by_value_modules, dumps_args, dumps_function, load_result
from gpud_client.worker import VERSION_MISMATCH_TYPE


def job_info(job_id: int = 7, name: str = "t.f", state: str = "failed") -> JobInfo:
    return JobInfo(
        id=job_id,
        name=name,
        state=state,
        owner="me",
        priority=0,
        gpu=None,
        gpus=[],
        gpu_indices=[],
        submitted_at=0.0,
        started_at=None,
        ended_at=None,
        timeout=60.0,
        retries=0,
        attempt=1,
        batch_id=None,
        exit_code=1,
        error=None,
        has_result=True,
    )


class Project:
    """A throwaway project directory on sys.path, with uniquely named modules."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.suffix = uuid.uuid4().hex[:8]

    def name(self, base: str) -> str:
        return f"{base}_{self.suffix}"

    def write(self, module: str, source: str) -> Path:
        path = self.root / f"{module}.py"
        path.write_text(textwrap.dedent(source))
        return path

    def load(self, module: str) -> object:
        import importlib

        importlib.invalidate_caches()
        return importlib.import_module(module)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    root = tmp_path / "proj"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield Project(root)
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(root)):
            del sys.modules[name]


def run_fresh(
    tmp_path: Path, payload: bytes, expr: str, absent: list[str], unused: tuple[str, ...] = ()
) -> str:
    """Unpickle ``payload`` as ``fn`` in a new interpreter whose cwd is elsewhere and whose
    sys.path lacks the project; return ``repr(expr)``. None of ``absent`` may be
    importable there, and neither they nor ``unused`` may get imported by the job."""
    forbidden = [*absent, *unused]
    pkl = tmp_path / f"payload-{uuid.uuid4().hex[:6]}.pkl"
    pkl.write_bytes(payload)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    code = textwrap.dedent(f"""
        import importlib.util, pickle, sys
        for name in {absent!r}:
            assert importlib.util.find_spec(name) is None, name + " is importable"
        with open(sys.argv[1], "rb") as f:
            fn = pickle.load(f)
        value = {expr}
        leaked = [m for m in sys.modules if m.split(".")[0] in {forbidden!r}]
        assert not leaked, leaked
        print(repr(value))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(pkl)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_function_travels_by_value_with_local_helpers(project: Project, tmp_path: Path) -> None:
    helper, main = project.name("helper"), project.name("mymod")
    helper_path = project.write(
        helper,
        """
        def triple(x):
            return 3 * x

        def offset():
            return 1
    """,
    )
    main_path = project.write(
        main,
        f"""
        import {helper}
        from {helper} import triple

        def compute(x):
            return triple(x) + {helper}.offset()
    """,
    )
    module = project.load(main)
    registry_before = cloudpickle_impl.list_registry_pickle_by_value()

    data, code_hash = dumps_function(module.compute)  # type: ignore[attr-defined]

    assert len(code_hash) == 64 and int(code_hash, 16) >= 0
    assert cloudpickle_impl.list_registry_pickle_by_value() == registry_before
    # Edit the sources after submitting: the job must not notice.
    main_path.write_text(main_path.read_text().replace("+", "-"))
    helper_path.write_text("def triple(x):\n    return 0\n\ndef offset():\n    return 100\n")
    assert run_fresh(tmp_path, data, "fn(5)", [main, helper]) == "16"


def test_package_siblings_are_captured(project: Project, tmp_path: Path) -> None:
    pkg = project.name("pkg")
    (project.root / pkg).mkdir()
    (project.root / pkg / "__init__.py").write_text("")
    (project.root / pkg / "jobs.py").write_text(
        f"from {pkg}.util import double\n\ndef run(x):\n    return double(x)\n"
    )
    (project.root / pkg / "util.py").write_text("def double(x):\n    return 2 * x\n")
    module = project.load(f"{pkg}.jobs")

    names = {m.__name__ for m in by_value_modules(module.run)}  # type: ignore[attr-defined]
    assert {f"{pkg}.jobs", f"{pkg}.util"} <= names
    assert not any(n.split(".")[0] in ("gpud", "gpud_client", "pytest", "os") for n in names)

    data, _ = dumps_function(module.run)  # type: ignore[attr-defined]
    assert run_fresh(tmp_path, data, "fn(21)", [pkg]) == "42"


def test_decorated_functions_pickle_as_raw_functions(project: Project, tmp_path: Path) -> None:
    mod = project.name("decorated")
    project.write(
        mod,
        """
        import gpud_client as gpud

        app = gpud.App("t")

        @app.function(gpu="any")
        def inner(x):
            return x + 1

        @app.function
        def outer(x):
            return inner(x) * 10

        def app_name():
            return app.name
    """,
    )
    module = project.load(mod)
    # One decorated function calling another, pickled directly or via its Function.
    for target in (module.outer.fn, module.outer):  # type: ignore[attr-defined]
        data, _ = dumps_function(target)
        assert run_fresh(tmp_path, data, "fn(1)", [mod], ("gpud_client", "gpud")) == "20"
    # The app arrives as a plain namespace, without its connection or gpud_client.
    data, _ = dumps_function(module.app_name)  # type: ignore[attr-defined]
    assert run_fresh(tmp_path, data, "fn()", [mod], ("gpud_client", "gpud")) == "'t'"


def test_args_of_project_classes_travel_by_value(project: Project, tmp_path: Path) -> None:
    mod = project.name("config")
    project.write(
        mod,
        """
        import dataclasses

        @dataclasses.dataclass
        class Config:
            lr: float

        def use(config):
            return config.lr * 2
    """,
    )
    module = project.load(mod)
    args = dumps_args((module.Config(lr=0.25),), {}, fn=module.use)  # type: ignore[attr-defined]
    assert run_fresh(tmp_path, args, "fn[0][0].lr", [mod]) == "0.25"


# -- load_result ------------------------------------------------------------------------


def outcome(exc: BaseException | None, type_name: str, message: str, tb: str | None) -> bytes:
    return cloudpickle.dumps(
        {
            "ok": False,
            "exception": cloudpickle.dumps(exc) if exc is not None else None,
            "type": type_name,
            "message": message,
            "traceback": tb,
        }
    )


REMOTE_TB = 'Traceback (most recent call last):\n  File "job.py", line 3, in f\nValueError: bad\n'


def test_load_result_returns_the_value() -> None:
    data = cloudpickle.dumps({"ok": True, "value": {"loss": 0.5}})
    assert load_result(data, job_info(state="succeeded")) == {"loss": 0.5}


def test_load_result_reraises_the_original_type_with_the_remote_traceback() -> None:
    data = outcome(ValueError("bad"), "builtins.ValueError", "bad", REMOTE_TB)
    with pytest.raises(ValueError) as info:
        load_result(data, job_info(job_id=12))
    assert type(info.value) is ValueError and str(info.value) == "bad"
    assert info.value.__notes__ == [f"Remote traceback (gpud job 12):\n{REMOTE_TB.rstrip()}"]


class CustomError(Exception):
    pass


def test_load_result_keeps_user_exception_classes() -> None:
    data = outcome(CustomError("x"), f"{__name__}.CustomError", "x", REMOTE_TB)
    with pytest.raises(CustomError):
        load_result(data, job_info())


class Picky(Exception):
    """Pickles, but cannot be unpickled: __init__ wants two arguments, args has one."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


@pytest.mark.parametrize(
    "exc", [Picky(1, 2), None, SystemExit(2)], ids=["unloadable", "missing", "base-exception"]
)
def test_exceptions_that_cannot_be_rebuilt_become_remote_errors(
    exc: BaseException | None,
) -> None:
    data = outcome(exc, "mod.Picky", "1/2", REMOTE_TB)
    with pytest.raises(RemoteError) as info:
        load_result(data, job_info(job_id=3))
    err = info.value
    assert (err.type_name, err.message, err.remote_traceback) == ("mod.Picky", "1/2", REMOTE_TB)
    assert str(err) == "mod.Picky: 1/2"
    assert err.__notes__ == [f"Remote traceback (gpud job 3):\n{REMOTE_TB.rstrip()}"]


def test_version_mismatch_result() -> None:
    data = outcome(None, VERSION_MISMATCH_TYPE, "pickled by Python 3.12 but ...", None)
    with pytest.raises(VersionMismatch, match="gpud job 7 .*Python 3.12"):
        load_result(data, job_info())


def test_value_that_cannot_be_unpickled_here(project: Project) -> None:
    mod = project.name("gone")
    project.write(mod, "class Thing:\n    pass\n")
    module = project.load(mod)
    data = cloudpickle.dumps({"ok": True, "value": module.Thing()})  # type: ignore[attr-defined]
    del sys.modules[mod]
    (project.root / f"{mod}.py").unlink()
    with pytest.raises(ModuleNotFoundError) as info:
        load_result(data, job_info(job_id=9, name="t.g"))
    assert any("gpud job 9 (t.g)" in note for note in info.value.__notes__)
