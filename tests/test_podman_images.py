"""Images from code (#11) built by real rootful Podman: once per definition, reused, rebuilt
when the definition changes, listed; a failed build leaves nothing; concurrent asks share
one build; collection under image_max_bytes spares images that jobs use.

No network anywhere: the wheels are made here (a wheel is a zip file), sent with the
definition, and the builds run with image_build_network = "none".
"""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpud_client as gpud
from gpud_client.imagebuild import ensure_image
from gpud_client.models import ImageBuildEvent

from .conftest import DaemonProc, _run_daemon, executor_env, make_base_dir

pytestmark = pytest.mark.podman

BASE = "localhost/gpud-python:{}.{}".format(*sys.version_info)
RUN = uuid.uuid4().hex[:8]  # this session's definitions are its own (no earlier cache)
MADE: list[str] = []  # the images the tests here built, removed at the end


def make_wheel(directory: Path, name: str, version: str, value: str) -> Path:
    """A pure-Python wheel of one module ``name`` whose ``VALUE`` is ``value``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VALUE = {value!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: gpud-test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}-{version}-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    out.write_bytes(buf.getvalue())
    return out


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def build_containers() -> set[str]:
    """Containers of builds (buildah's), not of jobs (other tests' daemons run those)."""
    out = subprocess.run(
        ["podman", "ps", "-a", "--external", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
    )
    return {n for n in out.stdout.split() if n.endswith("working-container")}


@pytest.fixture(scope="module")
def idaemon() -> Iterator[DaemonProc]:
    env = executor_env("podman") | {"GPUD_IMAGE_BUILD_NETWORK": "none"}
    base = make_base_dir()
    try:
        yield from _run_daemon(base, env)
    finally:
        if MADE:
            subprocess.run(["podman", "rmi", "-f", *MADE], capture_output=True)
        subprocess.run(["rm", "-rf", str(base)])


def tiny(wheels: Path, version: str = "1.0") -> gpud.Image:
    make_wheel(wheels, "gpudtiny", version, f"tiny {version}")
    image = (
        gpud.Image.base(BASE)
        .pip_install("gpudtiny", find_links=wheels, index=False)
        .run(f"echo {RUN} > /gpud-test-run")
    )
    MADE.append(image.name)
    return image


def builds_of(d: DaemonProc, name: str) -> tuple[int, str]:
    ledger = d.ledger()
    try:
        row = ledger.conn.execute(
            "SELECT builds, creator FROM images WHERE name = ?", (name,)
        ).fetchone()
        return int(row[0]), str(row[1])
    finally:
        ledger.close()


def read_tiny() -> str:
    import gpudtiny  # type: ignore[import-not-found]

    return str(gpudtiny.VALUE)


def test_built_once_reused_rebuilt_on_change_and_listed(
    idaemon: DaemonProc, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    image = tiny(tmp_path / "w1")
    f = gpud.function(image=image, url=idaemon.url)(read_tiny)
    assert f.remote() == "tiny 1.0"
    err = capfd.readouterr().err
    assert "STEP" in err and f"built image {image.name}" in err  # the log, on stderr
    with gpud.Client(idaemon.url) as c:
        [listed] = [i for i in c.images().images if i.name == image.name]
        assert listed.definition == image.hash and listed.last_used is not None
        first_id, first_use = listed.id, listed.last_used
        # A second call reuses it: no build log, the same image, one build in the ledger.
        assert f.remote() == "tiny 1.0"
        assert "STEP" not in capfd.readouterr().err
        [again] = [i for i in c.images().images if i.name == image.name]
        assert again.id == first_id and (again.last_used or 0) > first_use
        assert ensure_image(c, image).cached
    assert builds_of(idaemon, image.name) == (1, "root")
    # A changed definition (a new wheel) is another image, built.
    changed = tiny(tmp_path / "w2", "2.0")
    assert changed.name != image.name
    assert f.with_options(image=changed).remote() == "tiny 2.0"
    assert "STEP" in capfd.readouterr().err
    out = subprocess.run(
        [sys.executable, "-m", "gpud", "images"],
        env=idaemon.client_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert image.name in out.stdout and changed.hash[:12] in out.stdout
    # The image is labelled with its definition, creator and build time.
    labels = subprocess.run(
        ["podman", "inspect", "--format", "{{json .Labels}}", changed.name],
        capture_output=True,
        text=True,
    ).stdout
    assert changed.hash in labels and "gpud.image.creator" in labels


def test_failed_build_gives_the_log_tail_and_leaves_nothing(
    idaemon: DaemonProc, tmp_path: Path
) -> None:
    before = build_containers()
    bad = (
        gpud.Image.base(BASE)
        .run(f"echo {RUN}-bad")
        .pip_install("gpud-no-such-package-xyz", index=False)
    )
    f = gpud.function(image=bad, url=idaemon.url)(read_tiny)
    with pytest.raises(gpud.ImageBuildFailed) as e:
        f.remote()
    text = str(e.value)
    assert "building image" in text and "gpud-no-such-package-xyz" in text
    assert any("No matching distribution" in line or "ERROR" in line for line in e.value.tail)
    assert not image_exists(bad.name)
    assert build_containers() <= before  # no intermediate container left
    with gpud.Client(idaemon.url) as c:
        assert all(j.image != bad.name for j in c.list_jobs().jobs)  # never submitted


def test_concurrent_asks_share_one_build(idaemon: DaemonProc, tmp_path: Path) -> None:
    image = tiny(tmp_path / "w", "3.0").env({"GPUD_TEST": "concurrent"})
    MADE.append(image.name)
    results: list[object] = []

    def ask() -> None:
        with gpud.Client(idaemon.url) as c:
            try:
                results.append(ensure_image(c, image, out=io.StringIO()))
            except Exception as e:  # noqa: BLE001 - asserted below
                results.append(e)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(r, ImageBuildEvent) and r.name == image.name for r in results), results
    assert builds_of(idaemon, image.name)[0] == 1


@pytest.fixture
def small_daemon() -> Iterator[DaemonProc]:
    env = executor_env("podman") | {"GPUD_IMAGE_BUILD_NETWORK": "none", "GPUD_IMAGE_MAX_BYTES": "1"}
    base = make_base_dir()
    try:
        yield from _run_daemon(base, env)
    finally:
        subprocess.run(["rm", "-rf", str(base)])


@gpud.function
def hold(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "done"


def test_collection_spares_images_that_jobs_use(small_daemon: DaemonProc, tmp_path: Path) -> None:
    def img(tag: str) -> gpud.Image:
        return gpud.Image.base(BASE).run(f"echo {RUN}-{tag} > /gpud-test-run")

    a, b, c = img("a"), img("b"), img("c")
    try:
        handle = hold.with_options(url=small_daemon.url, image=a).spawn(60)
        deadline = time.monotonic() + 60
        while handle.status().state != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        with gpud.Client(small_daemon.url) as client:
            ensure_image(client, b, out=io.StringIO())
            # Over image_max_bytes (1 byte): a stays (a running job runs in it), b (just
            # built) stays.
            assert image_exists(a.name) and image_exists(b.name)
            assert handle.cancel().state == "cancelled"
            ensure_image(client, c, out=io.StringIO())
            assert not image_exists(a.name) and not image_exists(b.name)
            assert image_exists(c.name)
            # A collected image is rebuilt on the next ask.
            assert not ensure_image(client, a, out=io.StringIO()).cached
    finally:
        for i in (a, b, c):
            subprocess.run(["podman", "rmi", "-f", i.name], capture_output=True)


def test_image_build_command_builds_ahead_of_time(idaemon: DaemonProc, tmp_path: Path) -> None:
    make_wheel(tmp_path / "wheels", "gpudtiny", "4.0", "tiny 4.0")
    src = tmp_path / "defs.py"
    src.write_text(
        "import gpud_client as gpud\n"
        f"image = (gpud.Image.base({BASE!r})\n"
        f"         .pip_install('gpudtiny', find_links={str(tmp_path / 'wheels')!r},\n"
        "                      index=False)\n"
        f"         .run('echo {RUN}-cli'))\n"
        "@gpud.function(image=image)\n"
        "def f():\n"
        "    import gpudtiny\n"
        "    return gpudtiny.VALUE\n"
    )

    def gpud_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpud", *args],
            env=idaemon.client_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = gpud_cli("image", "build", f"{src}::image")
    assert first.returncode == 0, first.stderr
    name = first.stdout.strip()
    MADE.append(name)
    assert name.startswith("localhost/gpud-img-") and "STEP" in first.stderr
    again = gpud_cli("image", "build", f"{src}::f")  # the function's image: the same one
    assert again.returncode == 0 and again.stdout.strip() == name
    assert "was built before" in again.stderr and "STEP" not in again.stderr
    ran = gpud_cli("run", f"{src}::f", "--json")
    assert ran.returncode == 0 and ran.stdout.strip() == '"tiny 4.0"', ran.stderr


def test_an_image_built_but_not_recorded_is_adopted(idaemon: DaemonProc, tmp_path: Path) -> None:
    """A build whose daemon stopped before recording it left a complete image: the next
    ask uses it (no rebuild) and records it, creator from its label."""
    image = gpud.Image.base(BASE).run(f"echo {RUN}-adopt")
    MADE.append(image.name)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "x").write_text("")
    built = subprocess.run(
        [
            "podman",
            "build",
            "--network=none",
            "-q",
            "-t",
            image.name,
            "--label",
            f"gpud.image.key={image.hash}",
            "--label",
            "gpud.image.creator=alice",
            "-f",
            "-",
            str(tmp_path / "ctx"),
        ],
        input=f"FROM {BASE}\nRUN echo {RUN}-adopt\n",
        text=True,
        capture_output=True,
    )
    assert built.returncode == 0, built.stderr
    with gpud.Client(idaemon.url) as c:
        assert ensure_image(c, image, out=io.StringIO()).cached
        [listed] = [i for i in c.images().images if i.name == image.name]
    assert listed.definition == image.hash and listed.creator == "alice"
