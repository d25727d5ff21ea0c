"""Container images defined in code (issue #11), built by the daemon with Podman.

::

    image = (gpud.Image.base("localhost/gpud-python:3.11")
             .pip_install("numpy==2.*")
             .run("python3 -c 'import numpy'"))

    @app.function(image=image)
    def f() -> ...: ...

An :class:`Image` is an immutable list of steps. It turns into a canonical
:class:`~gpud_client.models.ImageSpec` whose sha256 names the image
(``localhost/gpud-img-<hash12>:latest``): the same definition is built once per box,
whoever submits it. Local files a definition names (a requirements file, a wheel
directory, a Containerfile and its context) are read when the definition is written and
travel by content, so the hash covers them too. The daemon renders the Containerfile
itself from the steps and refuses what does not validate; only
:meth:`Image.from_containerfile` hands it Containerfile text, explicitly.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

from gpud_client.models import FileRef, ImageSpec, ImageStep

__all__ = ["Image", "MAX_CONTEXT_BYTES", "image_name", "spec_hash"]

#: The most bytes of local files one definition may carry (the daemon's max_body_bytes
#: bounds it too): images are for environments, data goes in volumes.
MAX_CONTEXT_BYTES = 128 * 1024 * 1024


def spec_hash(spec: ImageSpec) -> str:
    """The definition's sha256: msgspec encodes struct fields in a fixed order, and
    file contents enter it by their own sha256."""
    return hashlib.sha256(msgspec.json.encode(spec)).hexdigest()


def image_name(key: str) -> str:
    """The Podman name of the image built from a definition of this hash."""
    return f"localhost/gpud-img-{key[:12]}:latest"


class Image:
    """A container image definition. Every method returns a new Image."""

    __slots__ = ("_files", "_spec")

    def __init__(self, spec: ImageSpec, files: Mapping[str, bytes]) -> None:
        self._spec = spec
        self._files = dict(files)

    # -- starting points -------------------------------------------------------------

    @classmethod
    def base(cls, name: str) -> Image:
        """Start from an image already in the box's Podman store (gpud never pulls)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Image.base needs an image name, not {name!r}")
        _one_line("image name", name)
        return cls(ImageSpec(base=name.strip()), {})

    @classmethod
    def from_requirements(cls, path: str | os.PathLike[str], *, base: str = "") -> Image:
        """``base`` (default: the daemon's default image) plus ``pip install -r path``."""
        start = cls.base(base) if base else cls(ImageSpec(base=""), {})
        return start.pip_install_requirements(path)

    @classmethod
    def from_containerfile(
        cls, path: str | os.PathLike[str], *, context: str | os.PathLike[str] | None = None
    ) -> Image:
        """Build from your own Containerfile (its directory is the build context unless
        ``context`` says otherwise). Steps added after it run on top of its last stage."""
        p = Path(path)
        text = _read(p)
        try:
            text.decode()
        except UnicodeDecodeError:
            raise ValueError(f"{p} is not a text file (UTF-8)") from None
        ctx_dir = Path(context) if context is not None else p.parent
        files: dict[str, bytes] = {}
        refs = _collect(ctx_dir, files)
        sha = _sha(text)
        files[sha] = text
        return cls(ImageSpec(base="", containerfile=sha, context=refs), files)

    # -- steps -------------------------------------------------------------------------

    def pip_install(
        self, *packages: str, find_links: str | os.PathLike[str] | None = None, index: bool = True
    ) -> Image:
        """``pip install`` these requirement specifiers (``"numpy==2.*"``). ``find_links``:
        a local directory of wheels, sent with the definition; ``index=False``: only
        those (no package index at all)."""
        pkgs = _packages(packages)
        if not pkgs:
            raise ValueError("pip_install needs at least one package")
        files = dict(self._files)
        links = None if find_links is None else _collect(Path(find_links), files)
        return self._with(ImageStep(op="pip", packages=pkgs, files=links, index=index), files)

    def pip_install_requirements(
        self,
        path: str | os.PathLike[str],
        *,
        find_links: str | os.PathLike[str] | None = None,
        index: bool = True,
    ) -> Image:
        """``pip install -r path``; the file is read now, and sent by content (its own
        ``-r``/``-c`` includes and local paths are not followed)."""
        files = dict(self._files)
        data = _read(Path(path))
        files[_sha(data)] = data
        links = None if find_links is None else _collect(Path(find_links), files)
        return self._with(
            ImageStep(op="requirements", file=_sha(data), files=links, index=index), files
        )

    def run(self, *commands: str) -> Image:
        """Shell commands, each a ``RUN`` step (as root, in the build only)."""
        if not commands:
            raise ValueError("run needs at least one command")
        img = self
        for c in commands:
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"run takes non-empty command strings, not {c!r}")
            _one_line("a run command", c)
            img = img._with(ImageStep(op="run", command=c), img._files)
        return img

    def env(self, vars: Mapping[str, str]) -> Image:
        """Environment variables of the image (and of the steps after this one)."""
        img = self
        for k, v in vars.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"env must map strings to strings; got {k!r}: {v!r}")
            _one_line("an env value", v)
            img = img._with(ImageStep(op="env", name=k, value=v), img._files)
        return img

    def add_local_dir(self, local: str | os.PathLike[str], remote: str) -> Image:
        """Copy a local directory into the image at ``remote`` (an absolute path)."""
        files = dict(self._files)
        refs = _collect(Path(local), files)
        return self._with(ImageStep(op="copy", files=refs, dest=remote), files)

    # -- what travels ------------------------------------------------------------------

    @property
    def spec(self) -> ImageSpec:
        return self._spec

    @property
    def files(self) -> dict[str, bytes]:
        """The contents the spec names, by sha256."""
        return dict(self._files)

    @property
    def hash(self) -> str:
        return spec_hash(self._spec)

    @property
    def name(self) -> str:
        """The image's name once built: ``localhost/gpud-img-<hash12>:latest``."""
        return image_name(self.hash)

    def _with(self, step: ImageStep, files: Mapping[str, bytes]) -> Image:
        if sum(len(b) for b in files.values()) > MAX_CONTEXT_BYTES:
            raise ValueError(
                f"this image definition carries more than {MAX_CONTEXT_BYTES >> 20} MiB of "
                "local files: install from a package index or a mirror instead, or mount "
                "large data as a volume"
            )
        spec = msgspec.structs.replace(self._spec, steps=[*self._spec.steps, step])
        return Image(spec, files)

    def __repr__(self) -> str:
        start = self._spec.base or ("containerfile" if self._spec.containerfile else "default")
        return f"<gpud Image {self.hash[:12]} from {start}, {len(self._spec.steps)} steps>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    # Immutable: copies (dataclasses.asdict of a FunctionOptions) are the image itself.
    def __copy__(self) -> Image:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Image:
        return self


def _one_line(what: str, value: str) -> None:
    # Checked here for a clear error at definition time; the daemon checks again.
    if any(ord(ch) < 32 and ch != "\t" for ch in value) or value.rstrip().endswith("\\"):
        raise ValueError(
            f"{what} must be one line without control characters or a trailing backslash: {value!r}"
        )


def _packages(packages: Iterable[str]) -> list[str]:
    out = []
    for p in packages:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"pip_install takes requirement strings, not {p!r}")
        if p.strip().startswith("-"):
            raise ValueError(
                f"{p!r} looks like a pip option: use find_links= or index=, "
                "or .run(...) for anything else"
            )
        _one_line("a package", p)
        out.append(p.strip())
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path} for the image definition: {e.strerror}") from None


def _collect(root: Path, files: dict[str, bytes]) -> list[FileRef]:
    """Every regular file under ``root``, by relative path and content (symlinks are
    followed within it; special files skipped)."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    refs = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for n in sorted(names):
            p = Path(dirpath) / n
            try:
                st = p.stat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            data = _read(p)
            sha = _sha(data)
            files[sha] = data
            refs.append(
                FileRef(
                    path=p.relative_to(root).as_posix(),
                    sha256=sha,
                    executable=bool(st.st_mode & 0o111),
                )
            )
    return refs
