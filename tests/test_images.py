"""Images from code (#11) without Podman: definitions, their hash, validation, the
rendered Containerfile, the package index a build uses, the ledger, and the refusal of a
daemon whose executor runs no images. The builds themselves: test_podman_images.py."""

from __future__ import annotations

import shlex
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import gpud_client as gpud
from gpud.images import BuildRefused, needed_files, pip_index_args, render, validate
from gpud.ledger import Ledger
from gpud.ledger import images as store
from gpud_client.models import FileRef, ImageSpec, ImageStep

from .conftest import DaemonProc, _run_daemon, make_base_dir

BASE = "localhost/gpud-python:3.11"


def test_same_definition_same_hash_and_any_change_changes_it(tmp_path: Path) -> None:
    a = gpud.Image.base(BASE).pip_install("numpy==2.*").run("echo hi")
    b = gpud.Image.base(BASE).pip_install("numpy==2.*").run("echo hi")
    assert a.hash == b.hash and a == b and a.name == f"localhost/gpud-img-{a.hash[:12]}:latest"
    assert gpud.Image.base(BASE).pip_install("numpy==1.*").run("echo hi").hash != a.hash
    assert gpud.Image.base(BASE).run("echo hi").pip_install("numpy==2.*").hash != a.hash
    # Files enter by content: the same wheel directory with another file is another image.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"one")
    w1 = gpud.Image.base(BASE).pip_install("x", find_links=wheels, index=False)
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"two")
    w2 = gpud.Image.base(BASE).pip_install("x", find_links=wheels, index=False)
    assert w1.hash != w2.hash
    assert needed_files(w2.spec) == set(w2.files)
    # A definition is immutable: steps make new images.
    assert len(gpud.Image.base(BASE).spec.steps) == 0


def test_requirements_and_containerfile_are_read_at_definition(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("humanize\n")
    img = gpud.Image.from_requirements(req, base=BASE)
    req.write_text("rich\n")  # later edits do not change the definition made before
    assert img.files[img.spec.steps[0].file or ""] == b"humanize\n"
    (tmp_path / "Containerfile").write_text(f"FROM {BASE}\nCOPY hello.txt /hello.txt\n")
    (tmp_path / "hello.txt").write_text("hi")
    cf = gpud.Image.from_containerfile(tmp_path / "Containerfile").pip_install("x")
    paths = {r.path for r in cf.spec.context}
    assert {"Containerfile", "hello.txt"} <= paths
    with pytest.raises(ValueError, match="cannot read"):
        gpud.Image.from_requirements(tmp_path / "missing.txt")


@pytest.mark.parametrize("bad", ["echo a\nFROM evil", "echo a \\", "echo\x00"])
def test_a_run_step_cannot_smuggle_containerfile_syntax(bad: str) -> None:
    with pytest.raises(ValueError, match="one line"):
        gpud.Image.base(BASE).run(bad)
    # The daemon checks again (a hand-made request skips the client's checks).
    spec = ImageSpec(base=BASE, steps=[ImageStep(op="run", command=bad)])
    with pytest.raises(BuildRefused, match="one line"):
        validate(spec, BASE)


@pytest.mark.parametrize(
    "step, match",
    [
        (ImageStep(op="pip", packages=["--index-url=http://evil"]), "requirement specifier"),
        (ImageStep(op="pip"), "at least one package"),
        (ImageStep(op="env", name="A B", value="x"), "variable name"),
        (ImageStep(op="copy", dest="/opt/../etc", files=[]), "absolute path"),
        (ImageStep(op="copy", dest="/opt/$HOME", files=[]), "absolute path"),
        (
            ImageStep(op="copy", dest="/opt", files=[FileRef(path="../x", sha256="0" * 64)]),
            "relative",
        ),
        (ImageStep(op="ADD"), "unknown step"),
    ],
)
def test_the_daemon_refuses_steps_that_do_not_validate(step: ImageStep, match: str) -> None:
    with pytest.raises(BuildRefused, match=match):
        validate(ImageSpec(base=BASE, steps=[step]), BASE)


def test_client_refuses_pip_options_as_packages() -> None:
    with pytest.raises(ValueError, match="pip option"):
        gpud.Image.base(BASE).pip_install("--pre")
    with pytest.raises(TypeError, match="gpud.Image"):
        gpud.function(image=42)(len)  # type: ignore[arg-type]


def test_default_base_and_unknown_version() -> None:
    spec = validate(ImageSpec(steps=[ImageStep(op="run", command="true")]), BASE)
    assert spec.base == BASE
    with pytest.raises(BuildRefused, match="version 7"):
        validate(ImageSpec(v=7, base=BASE), BASE)
    with pytest.raises(BuildRefused, match="not both"):
        validate(ImageSpec(base=BASE, containerfile="0" * 64), BASE)


def test_rendered_containerfile_quotes_everything(tmp_path: Path) -> None:
    wheels = tmp_path / "w"
    wheels.mkdir()
    (wheels / "a-1-py3-none-any.whl").write_bytes(b"wheel")
    img = (
        gpud.Image.base(BASE)
        .pip_install("numpy==2.*", "x; python_version>'3'", find_links=wheels, index=False)
        .env({"GREETING": 'say "$HOME"'})
        .run("echo built > /built")
    )
    spec = validate(img.spec, BASE)
    text, ctx = render(spec, img.files, ["PIP_INDEX_URL"])
    lines = text.splitlines()
    assert lines[0] == f"FROM {BASE}" and lines[1] == "ARG PIP_INDEX_URL"
    assert lines[2] == 'COPY [".gpud/1/", "/tmp/gpud-build/1/"]'
    pip = lines[3]
    assert pip.startswith("RUN ") and pip.endswith("&& rm -rf /tmp/gpud-build/1")
    args = shlex.split(pip.removeprefix("RUN ").split(" && ")[0])
    assert args[-2:] == ["numpy==2.*", "x; python_version>'3'"]
    assert "--no-index" in args and "/tmp/gpud-build/1/wheels" in args
    assert lines[4] == r'ENV GREETING="say \"\$HOME\""'
    assert lines[5] == "RUN echo built > /built"
    assert ctx == {".gpud/1/wheels/a-1-py3-none-any.whl": (b"wheel", False)}


def test_package_index_comes_from_config_env_or_pip_conf(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config/pip").mkdir(parents=True)
    (home / ".config/pip/pip.conf").write_text(
        "[global]\nindex-url = http://mirror.lan/simple\ntrusted-host = mirror.lan\n"
    )
    assert pip_index_args(None, None, {}, home=str(home)) == {
        "PIP_INDEX_URL": "http://mirror.lan/simple",
        "PIP_TRUSTED_HOST": "mirror.lan",
    }
    env = {"PIP_INDEX_URL": "http://env/simple", "PIP_EXTRA_INDEX_URL": "http://extra/simple"}
    got = pip_index_args(None, None, env, home=str(home))
    assert got["PIP_INDEX_URL"] == "http://env/simple"
    assert got["PIP_EXTRA_INDEX_URL"] == "http://extra/simple"
    assert (
        pip_index_args("http://cfg/simple", None, env, home=str(home))["PIP_INDEX_URL"]
        == "http://cfg/simple"
    )


def test_ledger_records_builds_and_uses(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        store.record_build(
            ledger,
            key="k" * 64,
            name="localhost/gpud-img-kkk:latest",
            creator="alice",
            spec="{}",
            size=10,
            seconds=1.5,
            now=100.0,
        )
        assert store.touch_image(ledger, "localhost/gpud-img-kkk:latest", 200.0)
        assert not store.touch_image(ledger, "localhost/other:1", 200.0)
        store.record_build(
            ledger,
            key="k" * 64,
            name="localhost/gpud-img-kkk:latest",
            creator="bob",
            spec="{}",
            size=12,
            seconds=1.0,
            now=300.0,
        )
        [row] = store.list_images(ledger)
        assert (row.creator, row.builds, row.size, row.last_used) == ("alice", 2, 12, 300.0)
    finally:
        ledger.close()
    tables = (
        sqlite3.connect(tmp_path / "ledger.db")
        .execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        .fetchall()
    )
    assert ("images",) in tables


@pytest.fixture(scope="module")
def process_daemon() -> Iterator[DaemonProc]:
    base = make_base_dir()
    try:
        yield from _run_daemon(base, {})
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_process_executor_says_images_need_podman(process_daemon: DaemonProc) -> None:
    f = gpud.function(image=gpud.Image.base(BASE).pip_install("humanize"), url=process_daemon.url)(
        len
    )
    with pytest.raises(gpud.ApiError, match="Podman executor") as e:
        f.remote([1])
    assert e.value.code == "needs_podman"
    with gpud.Client(process_daemon.url) as c:
        assert c.list_jobs().jobs == []  # nothing was submitted
    # The wire format is strict: an unknown field is a 422, not a silent default.
    import httpx

    transport = httpx.HTTPTransport(uds=process_daemon.url.removeprefix("unix://"))
    with httpx.Client(transport=transport, base_url="http://gpud") as h:
        r = h.post(
            "/v1/images/build",
            content=msgspec.json.encode(
                {"spec": {"base": BASE, "steps": [{"op": "run", "command": "x", "evil": 1}]}}
            ),
        )
    assert r.status_code == 422  # needs_podman comes first on this daemon


def _gpud(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpud", *args],
        env=d.client_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_image_build_command_checks_its_target(process_daemon: DaemonProc, tmp_path: Path) -> None:
    src = tmp_path / "defs.py"
    src.write_text(
        "import gpud_client as gpud\n"
        f"image = gpud.Image.base({BASE!r}).pip_install('humanize')\n"
        "@gpud.function(image='localhost/some:1')\n"
        "def named(): pass\n"
        "@gpud.function(image=image)\n"
        "def built(): pass\n"
    )
    out = _gpud(process_daemon, "image", "build", f"{src}::named")
    assert out.returncode == 2 and "nothing to build" in out.stderr
    out = _gpud(process_daemon, "image", "build", f"{src}::image")
    assert out.returncode == 1 and "Podman executor" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    out = _gpud(process_daemon, "image", "build", f"{src}::built")
    assert out.returncode == 1 and "Podman executor" in out.stderr
