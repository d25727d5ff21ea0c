"""Classes as remote services: ``@app.cls``, ``@gpud.enter`` and ``@gpud.method``.

    @app.cls(gpu="h100", keep_warm=120)
    class Embedder:
        @gpud.enter()
        def load(self): self.model = load_model()     # once per worker
        @gpud.method()
        def embed(self, text: str) -> list[float]: ...

    Embedder().embed.remote("hello")

Each method call is a job whose function builds the instance (running the ``enter``
methods in definition order, ``snap=True`` ones first) the first time a worker runs it;
with ``keep_warm`` the worker keeps the instance, so later calls skip the setup, and with
``snapshot=True`` containers restored from a snapshot start with it already built.
Constructor arguments are part of the call: ``Embedder("large")`` and ``Embedder("small")``
never share a worker.
"""

from __future__ import annotations

from typing import Any

from gpud_client.clsrun import make_method_call

__all__ = ["ClsProxy", "enter", "exit", "method"]

_ENTER = "__gpud_enter__"
_EXIT = "__gpud_exit__"
_METHOD = "__gpud_method__"


def enter(*, snap: bool = False) -> Any:
    """Mark a method to run once when a worker makes the instance (setup: imports, a
    model load). With ``@app.cls(snapshot=True)``, ``snap=True`` setup runs before the
    snapshot is taken, so its state is in the snapshot and restored containers skip it;
    plain ``enter`` methods run in every container (after a restore too), after the
    ``snap=True`` ones: use them for what cannot be snapshotted (opening a connection,
    moving a model onto a GPU)."""

    def mark(fn: Any) -> Any:
        setattr(fn, _ENTER, {"snap": snap})
        return fn

    return mark


def exit() -> Any:  # noqa: A001 - gpud.exit, as modal.exit
    """Mark a method to run when the worker that made the instance ends (#14): a cold
    job's process after its call, a warm worker when it is let go, and any worker on
    SIGTERM (a cancel, or the timeout), within the job's grace before SIGKILL. For
    flushing logs, saving a last checkpoint to ``gpud.state_dir()``, closing
    connections. Exit methods run in definition order; one that raises does not stop
    the others."""

    def mark(fn: Any) -> Any:
        setattr(fn, _EXIT, True)
        return fn

    return mark


def method() -> Any:
    """Mark a method callable remotely: ``Cls().name.remote(...)``, ``.spawn``, ``.map``."""

    def mark(fn: Any) -> Any:
        setattr(fn, _METHOD, True)
        return fn

    return mark


class ClsProxy:
    """What ``@app.cls`` returns: call it like the class to get a remote instance."""

    def __init__(self, cls: type, *, make_function: Any) -> None:
        self._cls = cls
        self._make_function = make_function  # (fn, name, anchor) -> Function
        #: ((name, snap), ...) in definition order
        self._enter = tuple(
            (name, bool(getattr(attr, _ENTER).get("snap")))
            for name, attr in vars(cls).items()
            if callable(attr) and hasattr(attr, _ENTER)
        )
        self._exit = tuple(
            name
            for name, attr in vars(cls).items()
            if callable(attr) and getattr(attr, _EXIT, False)
        )
        self._methods = {
            name
            for name, attr in vars(cls).items()
            if callable(attr) and getattr(attr, _METHOD, False)
        }
        if not self._methods:
            raise TypeError(
                f"@app.cls {cls.__qualname__} has no @gpud.method(): mark the "
                "methods to call remotely"
            )
        self.__doc__ = cls.__doc__
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__

    def __call__(self, *args: Any, **kwargs: Any) -> _RemoteInstance:
        return _RemoteInstance(self, args, kwargs)

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """A local instance, with its enter methods run, for tests and debugging."""
        instance = self._cls(*args, **kwargs)
        for snap in (True, False):  # as in a worker: snapshot setup first
            for name, snapped in self._enter:
                if snapped is snap:
                    getattr(instance, name)()
        return instance


class _RemoteInstance:
    def __init__(self, proxy: ClsProxy, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._proxy = proxy
        self._args = args
        self._kwargs = kwargs

    def __getattr__(self, name: str) -> Any:
        proxy = self._proxy
        if name not in proxy._methods:
            known = ", ".join(sorted(proxy._methods))
            raise AttributeError(
                f"{proxy._cls.__qualname__}.{name} is not a @gpud.method() "
                f"(remote methods: {known})"
            )
        call = make_method_call(
            proxy._cls, name, proxy._enter, self._args, self._kwargs, proxy._exit
        )
        return proxy._make_function(call, f"{proxy._cls.__qualname__}.{name}", proxy._cls)
