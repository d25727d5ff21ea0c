"""Pickling a job's function and arguments, and turning its result back into a value.

The function is pickled *by value* together with the caller's own modules: every module
whose file lies in the caller's project is registered with
``cloudpickle.register_pickle_by_value`` while pickling. The job therefore carries its
code with it: editing the script after submitting changes nothing, and the worker never
needs the caller's working directory or ``sys.path``. Installed packages (anything under
the interpreter's prefixes or a site-packages directory) are still pickled by reference
and must be installed in the worker's Python.

Result format: see :mod:`gpud_client.worker`.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import os
import pickle
import re
import site
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from types import ModuleType
from typing import Any

import cloudpickle  # type: ignore[import-untyped]  # ships no hints
from cloudpickle import cloudpickle as _cloudpickle_impl

from gpud_client.errors import GpudError, RemoteError, VersionMismatch
from gpud_client.models import JobInfo
from gpud_client.worker import VERSION_MISMATCH_TYPE

__all__ = [
    "by_value_modules",
    "dumps_args",
    "dumps_function",
    "load_result",
    "pickle_by_value",
]

# cloudpickle's by-value registry is process-global: serialise our temporary changes to
# it, so two threads submitting at once do not unregister each other's modules mid-pickle.
_REGISTRY_LOCK = threading.RLock()
_OWN_PACKAGES = ("gpud", "gpud_client")


def _is_own(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _OWN_PACKAGES)


@functools.lru_cache(maxsize=8192)
def _real(path: str) -> str:
    # Cached: every submit walks sys.modules, and realpath costs a few lstat calls per
    # module (~15 ms per submit with a few hundred modules loaded).
    return os.path.realpath(path)


@functools.cache
def _excluded_roots() -> tuple[str, ...]:
    """Where installed code lives: the interpreter's prefixes and every site directory
    (fixed for the life of the process, hence cached)."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    paths = sysconfig.get_paths()
    roots.update(paths.get(key, "") for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    return tuple(_real(r) for r in roots if r)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_installed(path: str, excluded: tuple[str, ...]) -> bool:
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(_under(path, root) for root in excluded)


def _project_root(module: ModuleType | None) -> str | None:
    """The directory the module was imported from: for a top-level module or a script,
    its file's directory; for ``pkg.sub.mod``, the directory that holds ``pkg``. So a
    function in a package still brings along its sibling packages."""
    file = getattr(module, "__file__", None)
    if module is None or not file:
        return None  # an interactive session or a notebook: nothing on disk to capture
    spec = getattr(module, "__spec__", None)
    # Under `python -m pkg.mod`, __main__'s spec has the real dotted name.
    name = spec.name if spec is not None and spec.name else module.__name__
    depth = 0 if name == "__main__" else name.count(".")
    path = _real(file)
    if os.path.splitext(os.path.basename(path))[0] == "__init__":
        depth += 1
    root = os.path.dirname(path)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def by_value_modules(fn: Callable[..., Any]) -> list[ModuleType]:
    """The modules to pickle by value along with ``fn``: its own module (cloudpickle
    already does ``__main__``) and every imported module from the same project that is
    plain Python source and not installed code or gpud itself."""
    modules: list[ModuleType] = []
    name = getattr(fn, "__module__", None) or "__main__"
    module = sys.modules.get(name)
    if (
        module is not None
        and name != "__main__"
        and (not _is_own(name) or getattr(module, "GPUD_PICKLE_BY_VALUE", False))
    ):
        modules.append(module)
    root = _project_root(module)
    excluded = _excluded_roots()
    if root is None or _is_installed(root, excluded):
        return modules
    seen = _seen.setdefault(root, {})
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod is module or mod_name == "__main__":
            continue
        known = seen.get(mod_name)
        if known is None or known[0] is not mod:
            # Each module is looked at once per project root, not at every call: the walk
            # cost ~1.5 ms per .remote() with a thousand modules loaded (#12).
            known = seen[mod_name] = (mod, _from_project(mod_name, mod, root, excluded))
        if known[1]:
            modules.append(mod)
    return modules


#: project root -> module name -> (that module, pickled by value?)
_seen: dict[str, dict[str, tuple[ModuleType, bool]]] = {}


def _from_project(mod_name: str, mod: ModuleType, root: str, excluded: tuple[str, ...]) -> bool:
    if _is_own(mod_name):
        return False
    file = getattr(mod, "__file__", None)
    # Only Python source: an extension module (.so) cannot be pickled by value.
    if not isinstance(file, str) or not file.endswith(".py"):
        return False
    if mod.__name__ != mod_name:
        return False  # an alias entry; cloudpickle registers modules by their own name
    path = _real(file)
    return _under(path, root) and not _is_installed(path, excluded)


@contextmanager
def pickle_by_value(fn: Callable[..., Any]) -> Iterator[None]:
    """Within this block, ``fn``'s project modules pickle by value (see
    :func:`by_value_modules`). Modules someone else registered stay registered."""
    with _REGISTRY_LOCK:
        registered = set(_cloudpickle_impl.list_registry_pickle_by_value())
        added: list[ModuleType] = []
        try:
            for module in by_value_modules(fn):
                if module.__name__ not in registered:
                    cloudpickle.register_pickle_by_value(module)
                    registered.add(module.__name__)
                    added.append(module)
            yield
        finally:
            for module in added:
                # ValueError: unregistered by someone else meanwhile; the goal is reached.
                with suppress(ValueError):
                    cloudpickle.unregister_pickle_by_value(module)


def _dumps(obj: Any, what: str) -> bytes:
    try:
        data: bytes = cloudpickle.dumps(obj)
    except Exception as e:
        raise pickle.PicklingError(f"cannot send {what} to gpud: {type(e).__name__}: {e}") from e
    return data


def dumps_function(fn: Callable[..., Any]) -> tuple[bytes, str]:
    """Pickle ``fn`` by value with its project's modules; return ``(bytes, code_hash)``
    where the code hash is the SHA-256 hex digest of the bytes."""
    what = f"function {getattr(fn, '__qualname__', fn)!s}"
    with pickle_by_value(fn):
        data = _dumps(fn, what)
    return data, hashlib.sha256(data).hexdigest()


def dumps_args(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, fn: Callable[..., Any] | None = None
) -> bytes:
    """Pickle ``(args, kwargs)``. Pass ``fn`` so that instances of classes from the
    caller's project (a config dataclass, say) travel by value too; inside a
    :func:`pickle_by_value` block that is already the case."""
    with pickle_by_value(fn) if fn is not None else nullcontext():
        return _dumps((tuple(args), dict(kwargs)), "the arguments")


_FRAME_RE = re.compile(r'^(\s*)File "([^"]+)", line (\d+), in ')


def with_local_source(tb: str) -> str:
    """Fill in source lines a remote traceback lacks (a container does not have the
    caller's files) from the caller's copies, as Python would have printed them."""
    lines = tb.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        m = _FRAME_RE.match(line)
        if m is None:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith(m.group(1) + "  ") and not _FRAME_RE.match(following):
            continue  # the worker had the source: keep its line
        source = linecache.getline(m.group(2), int(m.group(3))).strip()
        if source:
            out.append(f"{m.group(1)}  {source}")
    return "\n".join(out)


def _remote_note(job: JobInfo, tb: str) -> str:
    return f"Remote traceback (gpud job {job.id}):\n{with_local_source(tb.rstrip())}"


def load_result(data: bytes, job: JobInfo) -> Any:
    """Return the job's value, or raise its exception as the original type with the
    remote traceback attached as a note; :class:`RemoteError` if it cannot be rebuilt
    here, :class:`VersionMismatch` if the worker's Python did not match."""
    try:
        outcome = cloudpickle.loads(data)
    except Exception as e:
        # Only a successful value can fail here (an error's exception is nested bytes):
        # it needs a module or class this Python lacks.
        e.add_note(f"while loading the return value of gpud job {job.id} ({job.name})")
        raise
    if not isinstance(outcome, dict) or not isinstance(outcome.get("ok"), bool):
        raise GpudError(f"the result of gpud job {job.id} is not in gpud's result format")
    if outcome["ok"]:
        return outcome.get("value")

    type_name = str(outcome.get("type") or "builtins.Exception")
    message = str(outcome.get("message") or "")
    tb = outcome.get("traceback")
    if type_name == VERSION_MISMATCH_TYPE:
        raise VersionMismatch(f"gpud job {job.id} ({job.name}): {message}")
    exc = _load_exception(outcome.get("exception"))
    if exc is None:
        remote = RemoteError(type_name, message, tb if isinstance(tb, str) else None)
        if isinstance(tb, str) and tb:
            remote.add_note(_remote_note(job, tb))
        raise remote
    if isinstance(tb, str) and tb:
        exc.add_note(_remote_note(job, tb))
    raise exc


def _load_exception(data: object) -> Exception | None:
    if not isinstance(data, bytes):
        return None
    try:
        exc = cloudpickle.loads(data)
    except Exception:
        return None  # e.g. its class's module is not importable here
    # Only Exceptions: a remote SystemExit must not end the caller's program.
    return exc if isinstance(exc, Exception) else None
