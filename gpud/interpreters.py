"""The interpreter a process-executor job runs with (issue #11).

By default a job runs with its caller's own interpreter (their venv, conda env, uv or
pyenv Python), as its submitter, with the environment activation would give it; a
function may name another (``python=PATH``) or the admin's (``python="daemon"``).

Everything that could make such a job fail later is checked at submit, as the job's
user, and refused with the fix: the path exists on the daemon's machine, the job's user
can execute it, it is the Python the caller says it is, and the admin allows it
(``allowed_pythons``). Probing means running the interpreter, so its answer is cached
per (path, user) for as long as the file is unchanged (inode, mtime, size).

A warm worker keeps its imports for life, so it must not serve a job after packages
changed under it: :func:`fingerprint` (what its site-packages directories hold, which
``pip install`` and ``conda install`` change) goes into its key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpud.domain import PythonEnv
from gpud.executors.base import ExecutorRefusal
from gpud.identity import JobIdentity

__all__ = ["Interpreters", "Probe", "activation_env", "fingerprint"]

#: What the probe runs: the facts the checks and the job's environment need, as JSON.
#: cloudpickle is looked up as the worker does: the environment's own first, the
#: runtime directory's (appended to sys.path) as the fallback.
_PROBE = r"""
import json, site, sys
sys.path.append(sys.argv[1])
import cloudpickle
dirs = []
try:
    dirs += site.getsitepackages()
except Exception:
    pass
if site.ENABLE_USER_SITE and site.USER_SITE:
    dirs.append(site.USER_SITE)
print(json.dumps({"version": "%d.%d.%d" % sys.version_info[:3], "prefix": sys.prefix,
                  "base_prefix": sys.base_prefix, "site": dirs}))
"""

_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True, slots=True)
class Probe:
    """What an interpreter said about itself, run as a job's user."""

    version: str
    prefix: str
    base_prefix: str
    site: tuple[str, ...]

    @property
    def kind(self) -> str:
        # A conda env (or conda's base) has conda-meta/; a venv's prefix is not its base's.
        if os.path.isdir(os.path.join(self.prefix, "conda-meta")):
            return "conda"
        return "venv" if self.prefix != self.base_prefix else "system"


def activation_env(env: PythonEnv, base_path: str) -> dict[str, str]:
    """What activating the job's environment would set: VIRTUAL_ENV or CONDA_PREFIX, and
    its bin directory first on PATH (console scripts, and subprocesses that call
    `python`, find the environment's own)."""
    if env.kind == "venv":
        bindir, extra = os.path.join(env.prefix, "bin"), {"VIRTUAL_ENV": env.prefix}
    elif env.kind == "conda":
        bindir = os.path.join(env.prefix, "bin")
        extra = {
            "CONDA_PREFIX": env.prefix,
            "CONDA_DEFAULT_ENV": os.path.basename(env.prefix.rstrip("/")) or "base",
        }
    elif env.kind == "system":  # a uv- or pyenv-managed Python: its own bin first
        bindir, extra = os.path.dirname(env.path), {}
    else:  # the admin's interpreter: as before #11, nothing activated
        return {}
    parts = [p for p in base_path.split(":") if p and p != bindir]
    return {**extra, "PATH": ":".join([bindir, *parts])}


#: site directory -> ((its device, inode, mtime), what the fingerprint hashes of it): a
#: directory's mtime changes whenever an entry is added, removed or renamed, so a listing
#: is redone only then, not at every submit (#12); the fingerprint itself is unchanged
_listings: dict[str, tuple[tuple[int, int, int], bytes]] = {}


def _listing(d: str) -> bytes:
    try:
        st = os.stat(d)
        key: tuple[int, int, int] | None = (st.st_dev, st.st_ino, st.st_mtime_ns)
    except OSError:
        key = None
    hit = _listings.get(d)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    try:
        names = sorted(n for n in os.listdir(d) if n != "__pycache__")
    except OSError:
        names = ["-"]
    data = f"{d}\0{len(names)}\0".encode() + "\0".join(names).encode(errors="surrogateescape")
    # Not kept while the directory changed within the last 2 s: the kernel stamps mtimes
    # at its clock tick, so a second change in the same tick would leave the same mtime
    # (git's "racily clean" entries).
    if key is not None and time.time_ns() - key[2] > 2_000_000_000:
        _listings[d] = (key, data)
    return data


def fingerprint(path: str, site_dirs: tuple[str, ...]) -> str:
    """Changes when the interpreter, or what is installed in its environment, changes:
    the names in its site-packages directories (every install or upgrade adds or renames
    a ``*.dist-info``). Not their mtimes: the first import of a module writes its
    ``__pycache__`` there, which must not end a warm worker."""
    h = hashlib.sha256()
    try:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_mtime_ns}\0".encode())
    except OSError:
        h.update(f"{path}\0-\0".encode())
    for d in site_dirs:
        h.update(_listing(d))
    return h.hexdigest()[:16]


def _file_key(path: str) -> tuple[int, ...]:
    """Identifies the interpreter file (and a venv's link to it) until it changes."""
    lst, st = os.lstat(path), os.stat(path)
    return (lst.st_ino, lst.st_mtime_ns, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _can(st: os.stat_result, ident: JobIdentity, bit: int) -> bool:
    """Does ``ident`` have permission ``bit`` (1: x) on a file with this status?"""
    if st.st_uid == ident.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == ident.gid or st.st_gid in ident.groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _blocked_at(path: str, ident: JobIdentity) -> str | None:
    """The first place on the way to the interpreter (links followed) that ``ident``
    cannot pass, said for people: "/root is mode 0700 (owner root)"."""
    seen: list[str] = []
    for target in (path, os.path.realpath(path)):
        p = Path(target)
        for d in [*reversed(p.parents), p]:
            if str(d) in seen:
                continue
            seen.append(str(d))
            try:
                st = os.stat(d)
            except OSError:
                continue
            if not _can(st, ident, 1):
                import pwd

                try:
                    owner = pwd.getpwuid(st.st_uid).pw_name
                except KeyError:
                    owner = str(st.st_uid)
                what = "directory" if stat.S_ISDIR(st.st_mode) else "file"
                return f"the {what} {d} is mode {stat.S_IMODE(st.st_mode):04o} (owner {owner})"
    return None


class Interpreters:
    """Checks requested interpreters, as each job's user, and remembers the answers."""

    def __init__(self, runtime_dir: Path, allowed: list[str] | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.allowed = list(allowed or [])
        self._cache: dict[tuple[str, int], tuple[tuple[int, ...], Probe]] = {}
        self._lock = threading.Lock()
        self.probes_run = 0  # for tests: how often an interpreter was really started

    def cached(self, path: str, ident: JobIdentity) -> Probe | None:
        """The probe of ``path`` as ``ident`` if one is remembered and the file is
        unchanged (two stats, no process): None otherwise. OSError: no such file."""
        key = _file_key(path)
        with self._lock:
            hit = self._cache.get((path, ident.uid))
        return hit[1] if hit is not None and hit[0] == key else None

    def probe(self, path: str, ident: JobIdentity) -> Probe:
        """Run ``path`` as ``ident`` (cached while the file is unchanged). Raises OSError
        (cannot execute), subprocess.SubprocessError or ValueError (not a usable Python)."""
        key = _file_key(path)
        with self._lock:
            hit = self._cache.get((path, ident.uid))
        if hit is not None and hit[0] == key:
            return hit[1]
        env = {"PATH": _PATH, "HOME": ident.home, "LANG": "C.UTF-8"}
        out = subprocess.run(
            [path, "-c", _PROBE, str(self.runtime_dir)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            env=env,
            **ident.popen_kwargs(),
        )
        self.probes_run += 1
        if out.returncode != 0:
            lines = (out.stderr or out.stdout).strip().splitlines()
            raise ValueError(lines[-1] if lines else f"it exited with code {out.returncode}")
        try:
            data = json.loads(out.stdout.strip().splitlines()[-1])
            found = Probe(
                version=str(data["version"]),
                prefix=str(data["prefix"]),
                base_prefix=str(data["base_prefix"]),
                site=tuple(str(d) for d in data["site"]),
            )
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"it did not answer as a Python does: {out.stdout[-200:]!r}") from None
        with self._lock:
            self._cache[(path, ident.uid)] = (key, found)
        return found

    def env_for(self, path: str, probe: Probe, kind: str | None = None) -> PythonEnv:
        return PythonEnv(
            path=path,
            prefix=probe.prefix,
            kind=kind or probe.kind,
            version=probe.version,
            fingerprint=fingerprint(path, probe.site),
        )

    def check(
        self, requested: str, *, version: str, prefix: str | None, ident: JobIdentity, owner: str
    ) -> PythonEnv:
        """The environment a job asking for ``requested`` runs in; ExecutorRefusal, with
        the fix, for one that could not run it. ``prefix``: the caller's sys.prefix when
        ``requested`` is its own interpreter (then the full version must match too)."""
        other = (
            'submit with python="daemon" (gpud run --python daemon, or '
            "GPUD_JOB_PYTHON=daemon) for the admin's interpreter, or python=PATH naming "
            "another one"
        )
        if not os.path.isabs(requested):
            raise ExecutorRefusal(
                f"python={requested!r}: give the absolute path of an interpreter on the "
                "daemon's machine, or \"daemon\" for the admin's"
            )
        path = os.path.normpath(requested)
        if self.allowed and not any(fnmatch.fnmatchcase(path, g) for g in self.allowed):
            raise ExecutorRefusal(
                f"python {path} is not one this daemon allows (allowed_pythons: "
                f"{', '.join(self.allowed)}): use an interpreter matching one of those, or "
                'python="daemon" (gpud run --python daemon) for the admin\'s; the admin sets '
                "allowed_pythons in the daemon's config"
            )

        def cannot_execute() -> ExecutorRefusal:
            where = _blocked_at(path, ident)
            fix = (
                f"; or have the admin set job_user (now {ident.user!r}, who runs "
                f"{owner}'s jobs) to a user that can run it"
                if ident.user != owner
                else ""
            )
            return ExecutorRefusal(
                f"job user {ident.user!r} cannot execute {path}"
                f"{' (' + where + ')' if where else ''}: make it reachable for "
                f"{ident.user!r}, or {other}{fix}"
            )

        try:
            os.stat(path)
        except FileNotFoundError:
            # Behind a directory the job's user cannot enter, "missing" would tell them
            # what a root daemon can see there: the same answer as for a file that is.
            if _blocked_at(path, ident) is not None:
                raise cannot_execute() from None
            raise ExecutorRefusal(
                f"python {path} does not exist on the daemon's machine (submitting from "
                f"another machine, or was the environment removed?): {other}"
            ) from None
        except OSError:
            pass  # not even the daemon can look: the probe says why, as the job's user
        try:
            probe = self.probe(path, ident)
        except PermissionError:
            raise cannot_execute() from None
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            raise ExecutorRefusal(
                f"python {path} does not run as a Python for job user {ident.user!r} ({e}): {other}"
            ) from None
        mine, theirs = probe.version.rsplit(".", 1)[0], version.rsplit(".", 1)[0]
        if theirs != mine:
            raise ExecutorRefusal(
                f"this job was pickled by Python {version}, but {path} is Python "
                f"{probe.version}: submit from Python {mine}, or pick an interpreter of "
                f"Python {theirs}"
            )
        if prefix is not None:
            same = os.path.realpath(prefix) == os.path.realpath(probe.prefix)
            if not same:
                raise ExecutorRefusal(
                    f"{path} on the daemon's machine is not the interpreter you submit "
                    f"from (there its sys.prefix is {probe.prefix}, yours is {prefix}): "
                    f"submitting from another machine? {other}"
                )
            if probe.version != version:
                raise ExecutorRefusal(
                    f"{path} is Python {probe.version} now, but you run it as {version}: "
                    "the interpreter changed since your Python started; restart it, or "
                    f"{other}"
                )
        return self.env_for(path, probe)
