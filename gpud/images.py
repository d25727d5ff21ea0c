"""Images from code (#11): the daemon's side of ``gpud.Image``.

A definition arrives as a canonical :class:`~gpud_client.models.ImageSpec` plus the
contents of the files it names. Its sha256 (the *key*) names the image,
``localhost/gpud-img-<key12>:latest``, labelled with the key, its creator and when it was
built: one build per definition per box, whoever asks. The daemon renders the
Containerfile itself from validated steps, so a definition cannot smuggle Containerfile
syntax in (only ``from_containerfile`` hands over Containerfile text, and says so).

Builds run ``podman --remote build`` against the executor's Podman service, in a
subprocess, because that streams the build's output line by line (podman-py returns
its log only at the end). ``--layers=false --force-rm``: a failed build leaves neither
an image nor intermediate containers; the tag is only set by a build that succeeded.
Concurrent asks for one key share one build and all follow its log.

pip in a build uses the host's package index: ``image_pip_index_url`` and
``image_pip_extra_index_url`` in the config, else ``PIP_INDEX_URL``,
``PIP_EXTRA_INDEX_URL`` and ``PIP_TRUSTED_HOST`` of the daemon's environment, else pip's
own config files; they are passed as build arguments, which pip reads from the
environment of each RUN step and which do not stay in the image's environment.

Built images take at most ``image_max_bytes`` together: after each build the least
recently used go first (a job's submit or a build's ask counts as a use), never one that
a queued or running job names.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from gpud.ledger import LedgerThread
from gpud.ledger import images as store
from gpud_client.image import image_name, spec_hash
from gpud_client.models import FileRef, ImageBuildEvent, ImageSpec

__all__ = ["BuildRefused", "ImageBuilder", "MissingFiles", "pip_index_args", "render"]

log = logging.getLogger("gpud.images")

LABEL_KEY = "gpud.image.key"
LABEL_CREATOR = "gpud.image.creator"
LABEL_CREATED = "gpud.image.created"
#: Where a step's files sit in the build context, and inside the build.
CTX_FILES = ".gpud"
BUILD_TMP = "/tmp/gpud-build"
TAIL_LINES = 40
MAX_LOG_LINES = 20_000  # kept for followers who join late; older lines are dropped

_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_DEST_RE = re.compile(r"^/[A-Za-z0-9._/+@-]{0,1023}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# pip, quiet about what is no problem in a throwaway build container.
_PIP = (
    "PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1 "
    "PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install --progress-bar off"
)


class BuildRefused(ValueError):
    """A definition that cannot be built as it is; the message says what to change."""


class MissingFiles(Exception):
    """The build needs file contents the request did not carry (the client resends)."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"{len(missing)} files missing")
        self.missing = missing


# -- validation and rendering (pure) ---------------------------------------------------------


def _line(what: str, value: str, limit: int = 4096) -> str:
    if len(value) > limit:
        raise BuildRefused(f"{what} is longer than {limit} characters")
    if any(ord(ch) < 32 and ch != "\t" for ch in value) or value.rstrip().endswith("\\"):
        raise BuildRefused(
            f"{what} must be one line, without control characters or a "
            f"trailing backslash: {value!r}"
        )
    return value


def _refs(what: str, refs: list[FileRef] | None) -> list[FileRef]:
    for r in refs or []:
        parts = r.path.split("/")
        if (
            not r.path
            or r.path.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or not _SHA_RE.match(r.sha256)
        ):
            raise BuildRefused(
                f"{what}: file path {r.path!r} must be relative, without "
                "'..' (or its sha256 is malformed)"
            )
        _line(f"{what}: a file path", r.path, 1024)
    return list(refs or [])


def needed_files(spec: ImageSpec) -> set[str]:
    out = {r.sha256 for r in spec.context}
    if spec.containerfile:
        out.add(spec.containerfile)
    for s in spec.steps:
        out |= {r.sha256 for r in s.files or []}
        if s.file:
            out.add(s.file)
    return out


def validate(spec: ImageSpec, default_base: str) -> ImageSpec:
    """Check every field; fill in the default base image. Returns the spec to hash."""
    if spec.v != 1:
        raise BuildRefused(
            f"image definition version {spec.v} is not known to this daemon "
            "(version 1): upgrade the daemon, or the client to match it"
        )
    if spec.containerfile is not None:
        if spec.base:
            raise BuildRefused("a definition has a base image or a Containerfile, not both")
        if not _SHA_RE.match(spec.containerfile):
            raise BuildRefused("containerfile must be the sha256 of the Containerfile's text")
    else:
        base = spec.base or default_base
        if not _IMAGE_RE.match(base):
            raise BuildRefused(f"base image {base!r} is not a valid image name")
        spec = msgspec.structs.replace(spec, base=base)
    _refs("context", spec.context)
    if len(spec.steps) > 200:
        raise BuildRefused("an image definition has at most 200 steps")
    for i, s in enumerate(spec.steps, 1):
        what = f"step {i} ({s.op})"
        if s.op == "pip":
            if not s.packages:
                raise BuildRefused(f"{what}: name at least one package")
            for p in s.packages:
                if not p.strip() or p.lstrip().startswith("-"):
                    raise BuildRefused(f"{what}: {p!r} is not a requirement specifier")
                _line(f"{what}: a package", p, 1024)
            _refs(what, s.files)
        elif s.op == "requirements":
            if not s.file or not _SHA_RE.match(s.file):
                raise BuildRefused(f"{what}: file must be the sha256 of the requirements file")
            _refs(what, s.files)
        elif s.op == "run":
            if not s.command or not s.command.strip():
                raise BuildRefused(f"{what}: command is empty")
            _line(f"{what}: the command", s.command)
        elif s.op == "env":
            if not s.name or not _ENV_RE.match(s.name):
                raise BuildRefused(f"{what}: {s.name!r} is not a valid variable name")
            _line(f"{what}: the value", s.value or "")
        elif s.op == "copy":
            if not s.dest or not _DEST_RE.match(s.dest) or "/../" in s.dest + "/":
                raise BuildRefused(
                    f"{what}: dest {s.dest!r} must be an absolute path of "
                    "letters, digits and ._/+@-"
                )
            _refs(what, s.files)
        else:
            raise BuildRefused(f"{what}: unknown step; known: pip, requirements, run, env, copy")
    return spec


def _quote_env(value: str) -> str:
    # ENV values go through the Containerfile's own variable expansion: escape it.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def render(
    spec: ImageSpec, files: Mapping[str, bytes], build_args: Collection[str]
) -> tuple[str, dict[str, tuple[bytes, bool]]]:
    """The Containerfile and the build context (relative path -> (content, executable))
    of a validated spec."""
    ctx: dict[str, tuple[bytes, bool]] = {}
    if spec.containerfile is not None:
        lines = [files[spec.containerfile].decode().rstrip("\n")]
        for r in spec.context:
            ctx[r.path] = (files[r.sha256], r.executable)
    else:
        lines = [f"FROM {spec.base}"]
    lines += [f"ARG {a}" for a in sorted(build_args)]

    def put(n: int, refs: list[FileRef], sub: str = "") -> str:
        for r in refs:
            ctx[f"{CTX_FILES}/{n}/{sub}{r.path}"] = (files[r.sha256], r.executable)
        lines.append(f"COPY {json.dumps([f'{CTX_FILES}/{n}/', f'{BUILD_TMP}/{n}/'])}")
        return f"{BUILD_TMP}/{n}"

    for n, s in enumerate(spec.steps, 1):
        if s.op in ("pip", "requirements"):
            where = ""
            refs = list(s.files or [])
            if s.op == "requirements":
                assert s.file is not None
                ctx[f"{CTX_FILES}/{n}/requirements.txt"] = (files[s.file], False)
            if refs or s.op == "requirements":
                where = put(n, refs, "wheels/")
            args = [] if s.index else ["--no-index"]
            if refs:
                args += ["--find-links", f"{where}/wheels"]
            what = ["-r", f"{where}/requirements.txt"] if s.op == "requirements" else s.packages
            cmd = f"{_PIP} {shlex.join([*args, *what])}"
            if where:
                cmd += f" && rm -rf {where}"
            lines.append(f"RUN {cmd}")
        elif s.op == "run":
            lines.append(f"RUN {s.command}")
        elif s.op == "env":
            lines.append(f"ENV {s.name}={_quote_env(s.value or '')}")
        elif s.op == "copy":
            for r in s.files or []:
                ctx[f"{CTX_FILES}/{n}/{r.path}"] = (files[r.sha256], r.executable)
            lines.append(f"COPY {json.dumps([f'{CTX_FILES}/{n}/', s.dest])}")
    return "\n".join(lines) + "\n", ctx


def pip_index_args(
    config_index: str | None,
    config_extra: str | None,
    env: Mapping[str, str],
    home: str | None = None,
) -> dict[str, str]:
    """The package index settings a build passes to pip: the config's, else the daemon's
    environment's, else pip's config files' (global section)."""
    out: dict[str, str] = {}
    from_files: dict[str, str] = {}
    cp = configparser.ConfigParser()
    home = home if home is not None else os.path.expanduser("~")
    paths = [
        "/etc/pip.conf",
        "/etc/xdg/pip/pip.conf",
        f"{home}/.pip/pip.conf",
        f"{home}/.config/pip/pip.conf",
    ]
    if env.get("PIP_CONFIG_FILE"):
        paths.append(env["PIP_CONFIG_FILE"])
    try:
        cp.read(paths)
    except configparser.Error as e:
        log.warning("cannot read pip's config files: %s", e)
    else:
        for key, var in (
            ("index-url", "PIP_INDEX_URL"),
            ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
            ("trusted-host", "PIP_TRUSTED_HOST"),
        ):
            if cp.has_option("global", key):
                from_files[var] = " ".join(cp.get("global", key).split())
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        value = env.get(var) or from_files.get(var)
        if value:
            out[var] = value
    if config_index:
        out["PIP_INDEX_URL"] = config_index
    if config_extra:
        out["PIP_EXTRA_INDEX_URL"] = config_extra
    return out


# -- building --------------------------------------------------------------------------------


@dataclass
class Build:
    """One build in progress (or just over), followed by everyone who asked for it."""

    key: str
    name: str
    creator: str
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_LOG_LINES))
    first: int = 0  # the number of lines dropped from the front
    changed: trio.Event = field(default_factory=trio.Event)
    done: bool = False
    error: str | None = None

    def add(self, line: str) -> None:
        if len(self.lines) == self.lines.maxlen:
            self.first += 1
        self.lines.append(line)
        self.changed.set()
        self.changed = trio.Event()

    def finish(self, error: str | None) -> None:
        self.done, self.error = True, error
        self.changed.set()


class ImageBuilder:
    def __init__(
        self,
        *,
        ledger: LedgerThread,
        executor: Any,
        work_dir: Path,
        max_bytes: int,
        network: str | None,
        build_args: dict[str, str],
        timeout: float,
        in_use: Callable[[], set[str]],
    ) -> None:
        self.ledger = ledger
        self.executor = executor  # a PodmanExecutor
        self.work_dir = work_dir  # <data_dir>/image-builds
        self.max_bytes = max_bytes
        self.network = network
        self.build_args = build_args
        self.timeout = timeout
        self._in_use = in_use  # images that queued or running jobs name
        self._builds: dict[str, Build] = {}
        self._locks: dict[str, trio.Lock] = {}

    @property
    def default_base(self) -> str:
        return str(self.executor.default_image)

    def reconcile(self) -> None:
        """At start-up: contexts of builds a stopped daemon left behind go."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def ensure(
        self, spec: ImageSpec, files: Mapping[str, bytes], creator: str, nursery: trio.Nursery
    ) -> tuple[Build, bool]:
        """The build of this definition: a finished one if the image exists (True: it
        was cached), else the one in progress, else a new one started in ``nursery``.
        Raises BuildRefused, or MissingFiles when a build is needed."""
        spec = validate(spec, self.default_base)
        key = spec_hash(spec)
        # One ask at a time per key decides, so concurrent asks find the one build.
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                return await self._ensure(key, spec, files, creator, nursery)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(key, None)

    async def _ensure(
        self,
        key: str,
        spec: ImageSpec,
        files: Mapping[str, bytes],
        creator: str,
        nursery: trio.Nursery,
    ) -> tuple[Build, bool]:
        name = image_name(key)
        running = self._builds.get(key)
        if running is not None:
            return running, False
        if await self._exists(name, key):
            if not await self.ledger.call(store.touch_image, name, time.time()):
                # Built, but not recorded here: by a build whose daemon stopped before
                # it could record it. Recorded now (its creator from its label).
                await self._adopt(name, key, spec)
            b = Build(key=key, name=name, creator=creator)
            b.finish(None)
            return b, True
        missing = sorted(needed_files(spec) - set(files))
        if missing:
            raise MissingFiles(missing)
        for sha in needed_files(spec):
            if hashlib.sha256(files[sha]).hexdigest() != sha:
                raise BuildRefused(
                    f"the file sent as {sha[:12]}... does not have that "
                    "sha256: resend the definition"
                )
        if spec.containerfile is not None:
            try:
                files[spec.containerfile].decode()
            except UnicodeDecodeError:
                raise BuildRefused("the Containerfile is not UTF-8 text") from None
        elif not await self._exists(spec.base, None):
            raise BuildRefused(
                f"base image {spec.base!r} is not in this machine's Podman "
                "store: build or load it there first (gpud never pulls), or "
                "pick one of `gpud images`"
            )
        b = self._builds[key] = Build(key=key, name=name, creator=creator)
        nursery.start_soon(self._run, b, spec, dict(files))
        return b, False

    async def _adopt(self, name: str, key: str, spec: ImageSpec) -> None:
        def look() -> tuple[str, int]:
            img = self.executor.client.images.get(name)
            return ((img.labels or {}).get(LABEL_CREATOR, "?"), int(img.attrs.get("Size") or 0))

        creator, size = await trio.to_thread.run_sync(look)
        await self.ledger.call(
            store.record_build,
            key=key,
            name=name,
            creator=creator,
            size=size,
            seconds=0.0,
            now=time.time(),
            spec=msgspec.json.encode(spec).decode(),
        )

    async def follow(self, b: Build) -> AsyncIterator[str]:
        """The build's log lines from its start (as far as kept), until it is over."""
        pos = b.first
        while True:
            pos = max(pos, b.first)
            while pos < b.first + len(b.lines):
                yield b.lines[pos - b.first]
                pos += 1
            if b.done:
                return
            await b.changed.wait()

    async def _exists(self, name: str, key: str | None) -> bool:
        def look() -> bool:
            import podman.errors

            try:
                img = self.executor.client.images.get(name)
            except podman.errors.ImageNotFound:
                return False
            return key is None or (img.labels or {}).get(LABEL_KEY) == key

        return await trio.to_thread.run_sync(look)

    async def _run(self, b: Build, spec: ImageSpec, files: dict[str, bytes]) -> None:
        t0 = time.monotonic()
        error: str | None = None
        ctx = self.work_dir / f"{b.key[:16]}.{time.time_ns()}"
        try:
            text, context = render(spec, files, self.build_args)
            await trio.to_thread.run_sync(_write_context, ctx, text, context)
            code = await self._podman_build(b, ctx)
            if code != 0:
                error = f"podman build exited with {code}"
        except Exception as e:  # noqa: BLE001 - every failure ends the build, said to all
            log.exception("image build %s failed", b.name)
            error = f"{type(e).__name__}: {e}"
        except BaseException:
            error = "the daemon stopped during the build: ask again"
            b.finish(error)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, ctx, True)
                if error is not None:
                    # Never a half-built image under the definition's name.
                    await trio.to_thread.run_sync(self._remove, b.name)
                self._builds.pop(b.key, None)
        if error is None:
            size = await trio.to_thread.run_sync(self._size, b.name)
            seconds = time.monotonic() - t0
            await self.ledger.call(
                store.record_build,
                key=b.key,
                name=b.name,
                creator=b.creator,
                size=size,
                seconds=seconds,
                now=time.time(),
                spec=msgspec.json.encode(spec).decode(),
            )
            log.info(
                "built image %s for %s in %.1f s (%d MB)", b.name, b.creator, seconds, size // 2**20
            )
            try:
                await self.collect(keep={b.name})
            except Exception:  # noqa: BLE001 - a failed collection must not fail the build
                log.exception("collecting images failed")
        else:
            log.warning("image build %s for %s failed: %s", b.name, b.creator, error)
        b.finish(error)

    async def _podman_build(self, b: Build, ctx: Path) -> int:
        labels = {LABEL_KEY: b.key, LABEL_CREATOR: b.creator, LABEL_CREATED: f"{time.time():.0f}"}
        cmd = [
            "podman",
            "--remote",
            "--url",
            self.executor.url,
            "build",
            "--layers=false",
            "--rm",
            "--force-rm",
            "--pull=never",
            "-f",
            str(ctx / "Containerfile"),
            "-t",
            b.name,
        ]
        for k, v in labels.items():
            cmd += ["--label", f"{k}={v}"]
        for k, v in self.build_args.items():
            cmd += ["--build-arg", f"{k}={v}"]
        if self.network:
            cmd += ["--network", self.network]
        cmd.append(str(ctx / "context"))
        b.add(f"gpud: building {b.name} for {b.creator}")
        proc = await trio.lowlevel.open_process(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        buf = b""
        with trio.move_on_after(self.timeout) as scope:
            try:
                async for chunk in proc.stdout:
                    buf += chunk
                    *done, buf = buf.replace(b"\r", b"\n").split(b"\n")
                    for line in done:
                        b.add(line.decode(errors="replace"))
                if buf:
                    b.add(buf.decode(errors="replace"))
                return await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    with trio.CancelScope(shield=True):
                        await proc.wait()
        assert scope.cancelled_caught
        b.add(f"gpud: the build took longer than image_build_timeout ({self.timeout:g} s)")
        return -1

    def _remove(self, name: str) -> None:
        import podman.errors

        try:
            self.executor.client.images.remove(name, force=True)
        except podman.errors.ImageNotFound:
            pass
        except podman.errors.APIError as e:
            log.warning("could not remove image %s: %s", name, e)

    def _size(self, name: str) -> int:
        return int(self.executor.client.images.get(name).attrs.get("Size") or 0)

    # -- garbage collection ---------------------------------------------------------------

    async def collect(self, keep: Collection[str] = ()) -> list[str]:
        """Remove least recently used built images (of this daemon's ledger) until they
        fit in image_max_bytes; never one a queued or running job names, one being built,
        or one in ``keep``. Returns the names removed."""
        rows = {r.name: r for r in await self.ledger.call(store.list_images)}

        def present() -> list[tuple[str, int, float]]:
            out = []
            for img in self.executor.client.images.list(filters={"label": LABEL_KEY}):
                for tag in img.tags or []:
                    # Only this daemon's: another's (a second gpud on the box) may be
                    # about to run in its images, which this one cannot see.
                    row = rows.get(tag)
                    if row is not None:
                        out.append((tag, int(img.attrs.get("Size") or 0), row.last_used))
            return out

        found = await trio.to_thread.run_sync(present)
        total = sum(size for _, size, _ in found)
        busy = self._in_use() | set(keep) | {b.name for b in self._builds.values()}
        removed = []
        for name, size, _ in sorted(found, key=lambda f: f[2]):
            if total <= self.max_bytes:
                break
            if name in busy:
                continue
            log.info(
                "removing image %s (%d MB): built images are over image_max_bytes",
                name,
                size // 2**20,
            )
            ok = await trio.to_thread.run_sync(self._remove_unused, name)
            if ok:
                total -= size
                removed.append(name)
        return removed

    def _remove_unused(self, name: str) -> bool:
        import podman.errors

        try:
            self.executor.client.images.remove(name)  # not forced: a container may use it
            return True
        except podman.errors.APIError as e:
            log.info("image %s stays: %s", name, e)
            return False

    async def touch(self, name: str) -> None:
        await self.ledger.call(store.touch_image, name, time.time())

    async def records(self) -> dict[str, store.BuiltImage]:
        return {r.name: r for r in await self.ledger.call(store.list_images)}


def tail(b: Build) -> list[str]:
    return list(b.lines)[-TAIL_LINES:]


def event(kind: str, **kw: Any) -> bytes:
    return msgspec.json.encode(ImageBuildEvent(kind=kind, **kw)) + b"\n"


def _write_context(root: Path, containerfile: str, files: dict[str, tuple[bytes, bool]]) -> None:
    root.mkdir(mode=0o700)
    (root / "Containerfile").write_text(containerfile)
    ctx = root / "context"
    ctx.mkdir()
    if not files:
        # (podman --remote fails to read an empty context directory, noisily)
        (ctx / ".gpud-context").write_bytes(b"")
    for rel, (data, executable) in files.items():
        p = ctx / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o755 if executable else 0o644)
