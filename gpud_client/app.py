"""The user API: ``App``, the ``@app.function`` decorator and the ``Function`` it makes.

::

    import gpud_client as gpud

    app = gpud.App("finetune")

    @app.function(gpu="h100", timeout="2h", retries=1)
    def train(lr: float = 1e-4) -> dict: ...

    train.remote(lr=3e-4)          # run on the daemon, stream its log, return the value
    handle = train.spawn(lr=1e-3)  # submit and return at once: a JobHandle
    list(train.map([1e-3, 1e-4]))  # one job per input, results in input order
    list(train.starmap([(1, 2)]))  # inputs that are argument tuples
    batch = train.spawn_map([1e-3, 1e-4])  # submit and return at once: a BatchHandle
    train(lr=1e-3)                 # run here, as a plain call
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import os
import platform
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar, overload

from gpud_client.batch import BatchHandle, run_call
from gpud_client.client import Client
from gpud_client.cls import ClsProxy
from gpud_client.deps import job_ids, result_refs
from gpud_client.duration import parse_duration, parse_size
from gpud_client.errors import VersionMismatch
from gpud_client.handle import JobHandle
from gpud_client.image import Image
from gpud_client.imagebuild import ensure_image
from gpud_client.models import BatchSubmitRequest, SubmitRequest
from gpud_client.notify import notify_options
from gpud_client.payload import dumps_args, dumps_function, pickle_by_value

__all__ = ["App", "Function", "FunctionOptions", "function"]

P = ParamSpec("P")
R = TypeVar("R")

GpuSpec = str | Sequence[str] | None


@dataclass(frozen=True, slots=True)
class FunctionOptions:
    """How a function's jobs run. ``timeout`` is in seconds (None: the daemon's default)."""

    gpu: str | list[str] | None = None
    timeout: float | None = None
    retries: int = 0
    env: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    image: str | Image | None = None  # a name, or a definition the daemon builds (#11)
    memory: int | None = None  # bytes
    cpu: float | None = None
    keep_warm: float | None = None  # seconds; None: the daemon's default
    snapshot: bool = False  # restore from a container snapshot (Podman executor)
    #: may the daemon suspend its jobs for higher-priority ones (preempt_after, #13)
    preemptible: bool = True
    #: the interpreter jobs run with (process executor): None, this one (the caller's
    #: venv or conda env; $GPUD_JOB_PYTHON overrides); a path; or "daemon", the admin's
    python: str | None = None
    #: #14: send ``signal`` (None: SIGUSR1) this many seconds before the timeout, and
    #: wait ``grace`` seconds (None: the daemon's kill_grace) between SIGTERM and SIGKILL
    signal_before: float | None = None
    signal: str | None = None
    grace: float | None = None
    #: dependencies (#14): job ids (or handles) whose success this job waits for (with
    #: after_any: their end, however they end)
    after: tuple[int, ...] = ()
    after_any: bool = False
    #: a webhook URL the daemon POSTs to when a job ends in one of notify_on (None: all
    #: final states)
    notify: str | None = None
    notify_on: tuple[str, ...] | None = None

    @classmethod
    def build(
        cls,
        *,
        gpu: GpuSpec = None,
        timeout: float | str | None = None,
        retries: int = 0,
        env: Mapping[str, str] | None = None,
        priority: int = 0,
        image: str | Image | None = None,
        memory: int | str | None = None,
        cpu: float | None = None,
        keep_warm: float | str | None = None,
        snapshot: bool = False,
        python: str | os.PathLike[str] | None = None,
        signal_before: float | str | None = None,
        signal: str | None = None,
        grace: float | str | None = None,
        after: Any = None,
        after_any: bool = False,
        notify: str | None = None,
        notify_on: str | Sequence[str] | None = None,
        preemptible: bool = True,
    ) -> FunctionOptions:
        """Check the options where they are written (at decoration), not at submit time.
        The GPU spec's syntax is the daemon's to judge: it answers 422 with the rules."""
        if gpu is not None and not isinstance(gpu, str):
            if not isinstance(gpu, Sequence) or not all(isinstance(g, str) for g in gpu):
                raise TypeError(
                    f"gpu must be a string such as 'h100' or 'h100:2', or a list of them "
                    f"(fallbacks in order), not {gpu!r}"
                )
            gpu = list(gpu)
        seconds = None if timeout is None else parse_duration(timeout)
        if seconds is not None and seconds <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an integer, not {priority!r}")
        env_dict = dict(env or {})
        for k, v in env_dict.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"env must map strings to strings; got {k!r}: {v!r}")
        if image is not None and not isinstance(image, str | Image):
            raise TypeError(f"image must be an image name, a gpud.Image or None, not {image!r}")
        mem = None if memory is None else parse_size(memory)
        if cpu is not None and (
            isinstance(cpu, bool) or not isinstance(cpu, int | float) or cpu <= 0
        ):
            raise ValueError(f"cpu must be a positive number of CPUs, not {cpu!r}")
        warm = None if keep_warm is None else parse_duration(keep_warm)
        if warm is not None and warm < 0:
            raise ValueError(f"keep_warm must be >= 0 seconds, not {keep_warm!r}")
        before = None if signal_before is None else parse_duration(signal_before)
        if before is not None and before <= 0:
            raise ValueError(
                f'signal_before must be a positive duration such as "5m", not {signal_before!r}'
            )
        if before is not None and seconds is not None and before >= seconds:
            raise ValueError(
                f"signal_before ({signal_before!r}) must be shorter than the "
                f"timeout ({timeout!r}): lower it, or raise timeout"
            )
        if signal is not None and not isinstance(signal, str):
            raise TypeError(f'signal must be a signal\'s name such as "SIGUSR1", not {signal!r}')
        if signal is not None and before is None:
            raise ValueError(
                f"signal={signal!r} needs signal_before= (how long before the "
                'timeout to send it), e.g. signal_before="5m"'
            )
        grace_s = None if grace is None else parse_duration(grace)
        if grace_s is not None and grace_s < 0:
            raise ValueError(f"grace must be >= 0 seconds, not {grace!r}")
        return cls(
            signal_before=before,
            signal=signal,
            grace=grace_s,
            gpu=gpu,
            timeout=seconds,
            retries=retries,
            env=env_dict,
            priority=priority,
            image=image,
            memory=mem,
            cpu=None if cpu is None else float(cpu),
            keep_warm=warm,
            snapshot=bool(snapshot),
            python=_python_option(python),
            after=job_ids(after),
            after_any=bool(after_any),
            **notify_options(notify, notify_on),
            preemptible=bool(preemptible),
        )


def _python_option(python: str | os.PathLike[str] | None) -> str | None:
    if python is None:
        return None
    if not isinstance(python, str | os.PathLike):
        raise TypeError(f'python must be a path or "daemon", not {python!r}')
    text = os.fspath(python)
    if text == "daemon":
        return text
    if not os.path.isabs(text):
        raise ValueError(
            f"python={text!r}: give the interpreter's absolute path (it is the "
            "daemon's machine that runs it), or \"daemon\" for the admin's"
        )
    return os.path.normpath(text)


def _interpreter(option: str | None) -> tuple[str, str | None]:
    """(python_path, python_prefix) for a request: the function's python=, else
    $GPUD_JOB_PYTHON, else this very interpreter, as the venv sees it (a venv's bin/python
    is a link to the base interpreter; resolving it would lose the venv), with its
    sys.prefix so the daemon can tell it is the same environment."""
    chosen = option or _python_option(os.environ.get("GPUD_JOB_PYTHON") or None)
    if chosen is not None:
        return chosen, None
    return os.path.abspath(sys.executable), sys.prefix


def _python() -> str:
    return platform.python_version()


def _default_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "__main__"
    if module == "__main__":
        # A script's module is "__main__" everywhere; its file name says more.
        file = getattr(sys.modules.get("__main__"), "__file__", None)
        module = os.path.splitext(os.path.basename(file))[0] if file else "main"
    return f"{module}.{getattr(fn, '__qualname__', getattr(fn, '__name__', 'function'))}"


def _check_worker_python(health_python: str) -> None:
    """Fail before queueing rather than after: the daemon's workers must run the same
    Python major.minor as this one, or the pickles will not load."""
    m = re.search(r"(\d+)\.(\d+)", health_python)
    if m is None:
        return  # not reported in a form we understand: let the worker decide
    theirs = (int(m.group(1)), int(m.group(2)))
    ours = sys.version_info[:2]
    if theirs != ours:
        w, h = f"{theirs[0]}.{theirs[1]}", f"{ours[0]}.{ours[1]}"
        raise VersionMismatch(
            f"the gpud daemon runs jobs with Python {w} but this is Python {h}: submit from "
            f"Python {w}, or configure the daemon's `python` to a {h} interpreter"
        )


class App:
    """A named group of functions sharing one daemon connection (made on first use)."""

    def __init__(self, name: str, url: str | None = None) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"an App needs a non-empty name, not {name!r}")
        self.name = name
        self.url = url
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._functions: dict[str, Function[..., Any]] = {}

    def __repr__(self) -> str:
        return f"App({self.name!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Job code may reference its app (or carry a whole module holding it). In the
        # worker, which need not have gpud_client, it becomes a plain namespace with the
        # name and url; the connection never travels.
        return (types.SimpleNamespace, (), {"name": self.name, "url": self.url})

    @property
    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                self._client = Client(self.url)
            return self._client

    @property
    def functions(self) -> dict[str, Function[..., Any]]:
        """The functions decorated with this app, by their Python name."""
        return dict(self._functions)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    @overload
    def function(self, fn: Callable[P, R], /) -> Function[P, R]: ...
    @overload
    def function(
        self,
        fn: None = None,
        /,
        *,
        gpu: GpuSpec = None,
        timeout: float | str | None = None,
        retries: int = 0,
        env: Mapping[str, str] | None = None,
        priority: int = 0,
        image: str | Image | None = None,
        memory: int | str | None = None,
        cpu: float | None = None,
        keep_warm: float | str | None = None,
        snapshot: bool = False,
        python: str | os.PathLike[str] | None = None,
        signal_before: float | str | None = None,
        signal: str | None = None,
        grace: float | str | None = None,
        notify: str | None = None,
        notify_on: str | Sequence[str] | None = None,
        preemptible: bool = True,
        name: str | None = None,
    ) -> Callable[[Callable[P, R]], Function[P, R]]: ...

    def function(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        gpu: GpuSpec = None,
        timeout: float | str | None = None,
        retries: int = 0,
        env: Mapping[str, str] | None = None,
        priority: int = 0,
        image: str | Image | None = None,
        memory: int | str | None = None,
        cpu: float | None = None,
        keep_warm: float | str | None = None,
        snapshot: bool = False,
        python: str | os.PathLike[str] | None = None,
        signal_before: float | str | None = None,
        signal: str | None = None,
        grace: float | str | None = None,
        notify: str | None = None,
        notify_on: str | Sequence[str] | None = None,
        preemptible: bool = True,
        name: str | None = None,
    ) -> Function[P, R] | Callable[[Callable[P, R]], Function[P, R]]:
        """Decorate a function to run on the daemon: ``@app.function`` or
        ``@app.function(gpu="h100", timeout="2h", ...)``."""
        options = FunctionOptions.build(
            gpu=gpu,
            timeout=timeout,
            retries=retries,
            env=env,
            priority=priority,
            image=image,
            memory=memory,
            cpu=cpu,
            keep_warm=keep_warm,
            snapshot=snapshot,
            python=python,
            signal_before=signal_before,
            signal=signal,
            grace=grace,
            notify=notify,
            notify_on=notify_on,
            preemptible=preemptible,
        )

        def wrap(f: Callable[P, R]) -> Function[P, R]:
            job_name = name or f"{self.name}.{f.__qualname__}"
            wrapped = Function(f, name=job_name, options=options, app=self)
            self._functions[f.__name__] = wrapped
            return wrapped

        return wrap(fn) if fn is not None else wrap

    def cls(self, cls: type | None = None, /, **options: Any) -> Any:
        """Decorate a class whose ``@gpud.method()`` methods run as jobs, with its
        ``@gpud.enter()`` setup run once per worker (keep it with ``keep_warm=``).
        Takes the options of :meth:`function`."""
        opts = FunctionOptions.build(**options)

        def wrap(c: type) -> ClsProxy:
            def make(fn: Any, qualname: str, anchor: type) -> Function[Any, Any]:
                return Function(
                    fn, name=f"{self.name}.{qualname}", options=opts, app=self, anchor=anchor
                )

            return ClsProxy(c, make_function=make)

        return wrap(cls) if cls is not None else wrap


@overload
def function(fn: Callable[P, R], /) -> Function[P, R]: ...
@overload
def function(
    fn: None = None,
    /,
    *,
    gpu: GpuSpec = None,
    timeout: float | str | None = None,
    retries: int = 0,
    env: Mapping[str, str] | None = None,
    priority: int = 0,
    image: str | Image | None = None,
    memory: int | str | None = None,
    cpu: float | None = None,
    keep_warm: float | str | None = None,
    snapshot: bool = False,
    python: str | os.PathLike[str] | None = None,
    signal_before: float | str | None = None,
    signal: str | None = None,
    grace: float | str | None = None,
    notify: str | None = None,
    notify_on: str | Sequence[str] | None = None,
    preemptible: bool = True,
    name: str | None = None,
    url: str | None = None,
) -> Callable[[Callable[P, R]], Function[P, R]]: ...


def function(
    fn: Callable[P, R] | None = None,
    /,
    *,
    gpu: GpuSpec = None,
    timeout: float | str | None = None,
    retries: int = 0,
    env: Mapping[str, str] | None = None,
    priority: int = 0,
    image: str | Image | None = None,
    memory: int | str | None = None,
    cpu: float | None = None,
    keep_warm: float | str | None = None,
    snapshot: bool = False,
    python: str | os.PathLike[str] | None = None,
    signal_before: float | str | None = None,
    signal: str | None = None,
    grace: float | str | None = None,
    notify: str | None = None,
    notify_on: str | Sequence[str] | None = None,
    preemptible: bool = True,
    name: str | None = None,
    url: str | None = None,
) -> Function[P, R] | Callable[[Callable[P, R]], Function[P, R]]:
    """Like ``App.function`` without an App; the job name is ``module.qualname``."""
    options = FunctionOptions.build(
        gpu=gpu,
        timeout=timeout,
        retries=retries,
        env=env,
        priority=priority,
        image=image,
        memory=memory,
        cpu=cpu,
        keep_warm=keep_warm,
        snapshot=snapshot,
        python=python,
        signal_before=signal_before,
        signal=signal,
        grace=grace,
        notify=notify,
        notify_on=notify_on,
        preemptible=preemptible,
    )

    def wrap(f: Callable[P, R]) -> Function[P, R]:
        return Function(f, name=name or _default_name(f), options=options, url=url)

    return wrap(fn) if fn is not None else wrap


class Function(Generic[P, R]):
    """A function that can run as a gpud job. Calling it runs it locally."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str,
        options: FunctionOptions | None = None,
        app: App | None = None,
        url: str | None = None,
        anchor: Any = None,
    ) -> None:
        if isinstance(fn, Function):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"gpud can only run callables, not {fn!r}")
        self._fn = fn
        # Whose project travels by value with it: the function's own, or for a method
        # call (a closure made in gpud_client.clsrun) the user's class.
        self._anchor = anchor if anchor is not None else fn
        self.name = name
        self.options = options or FunctionOptions()
        self.app = app
        self._url = url
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._checked_client: Client | None = None
        self._image: str | None = None  # options.image's name once the daemon has it
        # Look like the function to help(), inspect and tracebacks.
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, attr):
                setattr(self, attr, getattr(fn, attr))
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<gpud Function {self.name}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Referenced from inside user code (one job function calling another), a Function
        # pickles as its raw function. The rebuilding callable must load in the worker,
        # which has no gpud_client: itemgetter(0)((fn,)) is fn, with stdlib parts only.
        return (operator.itemgetter(0), ((self._fn,),))

    @property
    def fn(self) -> Callable[P, R]:
        return self._fn

    @property
    def client(self) -> Client:
        if self.app is not None:
            return self.app.client
        with self._lock:
            if self._client is None:
                self._client = Client(self._url)
            return self._client

    def with_options(self, **changes: Any) -> Function[P, R]:
        """A copy with some options replaced: the decorator's keywords (gpu, timeout,
        retries, env, priority, image, python, name) and ``url``, the daemon to submit to."""
        name = changes.pop("name", None) or self.name
        app, url = self.app, self._url
        if changes.get("url") is not None:
            # Another daemon than the app's: the copy gets a connection of its own.
            app, url = None, changes.pop("url")
        changes.pop("url", None)
        current = dataclasses.asdict(self.options)
        current.update(changes)
        options = FunctionOptions.build(**current)
        return Function(self._fn, name=name, options=options, app=app, url=url, anchor=self._anchor)

    # -- running locally --------------------------------------------------------------

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fn(*args, **kwargs)

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fn(*args, **kwargs)

    # -- requests -------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        o = self.options
        python_path, python_prefix = _interpreter(o.python)
        image = o.image
        if isinstance(image, Image):
            # Its name is known once the daemon has it (spawn and map ask it first).
            image = self._image or image.name
        return {
            "python_path": python_path,
            "python_prefix": python_prefix,
            "name": self.name,
            "python": _python(),
            "gpu": o.gpu,
            "timeout": o.timeout,
            "retries": o.retries,
            "env": dict(o.env),
            "priority": o.priority,
            "image": image,
            "memory": o.memory,
            "cpu": o.cpu,
            "keep_warm": o.keep_warm,
            "snapshot": o.snapshot,
            "signal_before": o.signal_before,
            "signal": o.signal,
            "grace": o.grace,
            "after": list(o.after),
            "after_any": o.after_any,
            "notify": o.notify,
            "notify_on": list(o.notify_on) if o.notify_on is not None else None,
            "preemptible": o.preemptible,
        }

    def submit_request(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], after: Any = None
    ) -> SubmitRequest:
        """The request that submits one call (the function pickled by value). ``after``:
        more dependencies; those its arguments' ``gpud.result_of`` name are implied."""
        with pickle_by_value(self._anchor):
            function_bytes, _ = dumps_function(self._fn)
            args_bytes = dumps_args(args, kwargs)
        common = self._common()
        deps = (*common["after"], *job_ids(after), *result_refs(args, kwargs))
        common["after"] = list(dict.fromkeys(deps))
        return SubmitRequest(function=function_bytes, args=args_bytes, **common)

    def _split_after(self, kwargs: dict[str, Any]) -> Any:
        """``after=`` given to spawn/remote is gpud's, unless the function itself has a
        parameter of that name (then set it with ``.with_options(after=...)``)."""
        if "after" not in kwargs:
            return None
        try:
            own = "after" in inspect.signature(self._fn).parameters
        except (TypeError, ValueError):
            own = False
        return None if own else kwargs.pop("after")

    def batch_request(
        self,
        inputs: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
        max_concurrency: int | None = None,
    ) -> BatchSubmitRequest:
        """The request that submits one job per ``(args, kwargs)``, the function once."""
        with pickle_by_value(self._anchor):
            function_bytes, _ = dumps_function(self._fn)
            payloads = [dumps_args(a, kw) for a, kw in inputs]
        return BatchSubmitRequest(
            function=function_bytes,
            inputs=payloads,
            max_concurrency=max_concurrency,
            **self._common(),
        )

    def _ready_client(self) -> Client:
        client = self.client
        # Only the admin's interpreter is known up front; the caller's own (the default)
        # or a named one is checked by the daemon at submit, as the job's user.
        daemons = _interpreter(self.options.python)[0] == "daemon"
        if self.options.image is None and daemons and self._checked_client is not client:
            _check_worker_python(client.health().worker_python)
            self._checked_client = client
        if isinstance(self.options.image, Image):
            # Asked on every submit (one request when it is built): an image collected
            # since is rebuilt, with its log on stderr.
            self._image = ensure_image(client, self.options.image).name
        return client

    # -- running on the daemon --------------------------------------------------------

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Submit one call and return its handle at once."""
        after = self._split_after(kwargs)
        client = self._ready_client()
        request = self.submit_request(args, kwargs, after)
        info = client.submit(request)
        return JobHandle(info.id, client, info=info)

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the call as a job and return its value (or raise its exception), copying
        the job's log to ``sys.stderr`` meanwhile. Ctrl-C cancels the job.

        One request (``POST /v1/jobs/run``) carries the submit, the log and the outcome."""
        after = self._split_after(kwargs)
        client = self._ready_client()
        value: R = run_call(client, self.submit_request(args, kwargs, after), log_to=sys.stderr)
        return value

    def spawn_map(
        self,
        *iterables: Iterable[Any],
        kwargs: Mapping[str, Any] | None = None,
        max_concurrency: int | None = None,
    ) -> BatchHandle[R]:
        """Submit one job per tuple of ``zip(*iterables)`` (one batch, one request) and
        return its :class:`BatchHandle` at once. ``max_concurrency``: at most this many
        of them run at the same time (like Slurm's ``%N``)."""
        if not iterables:
            raise TypeError("spawn_map() needs at least one iterable")
        return self._spawn_batch(zip(*iterables, strict=False), kwargs, max_concurrency)

    def _spawn_batch(
        self,
        arg_tuples: Iterable[Iterable[Any]],
        kwargs: Mapping[str, Any] | None,
        max_concurrency: int | None,
    ) -> BatchHandle[R]:
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ValueError(
                f"max_concurrency must be a whole number >= 1 (or None for no "
                f"limit), not {max_concurrency!r}"
            )
        extra = dict(kwargs or {})
        inputs = [(tuple(args), extra) for args in arg_tuples]
        if not inputs:
            raise ValueError("no inputs: a batch needs at least one")
        client = self._ready_client()
        response = client.submit_batch(self.batch_request(inputs, max_concurrency))
        return BatchHandle(response.batch_id, client, size=len(response.job_ids), name=self.name)

    def map(
        self,
        *iterables: Iterable[Any],
        kwargs: Mapping[str, Any] | None = None,
        return_exceptions: bool = False,
        order_outputs: bool = True,
        max_concurrency: int | None = None,
        progress: bool | None = None,
    ) -> Iterator[R]:
        """Like the builtin ``map``: one job per tuple of ``zip(*iterables)``, all
        submitted at once (now, not when iterated) as one batch; results in input order,
        or as the jobs end with ``order_outputs=False``, over one streaming request.

        With ``return_exceptions`` a job's exception is yielded instead of raised (errors
        talking to the daemon are still raised). ``max_concurrency``: at most this many
        jobs of the batch run at once. A progress bar goes to stderr when it is a terminal
        and there are 10 inputs or more (``progress`` True/False forces it). Ctrl-C
        cancels the jobs not yet done.
        """
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        return self._map(
            zip(*iterables, strict=False),
            kwargs,
            return_exceptions,
            order_outputs,
            max_concurrency,
            progress,
        )

    def starmap(
        self,
        input_iterator: Iterable[Iterable[Any]],
        *,
        kwargs: Mapping[str, Any] | None = None,
        return_exceptions: bool = False,
        order_outputs: bool = True,
        max_concurrency: int | None = None,
        progress: bool | None = None,
    ) -> Iterator[R]:
        """Like :meth:`map`, but each input is a tuple of positional arguments, spread
        (``itertools.starmap``): ``f.starmap([(1, 2), (3, 4)])`` calls ``f(1, 2)`` and
        ``f(3, 4)``."""
        return self._map(
            input_iterator, kwargs, return_exceptions, order_outputs, max_concurrency, progress
        )

    def _map(
        self,
        arg_tuples: Iterable[Iterable[Any]],
        kwargs: Mapping[str, Any] | None,
        return_exceptions: bool,
        order_outputs: bool,
        max_concurrency: int | None,
        progress: bool | None,
    ) -> Iterator[R]:
        arg_list = list(arg_tuples)
        if not arg_list:
            return iter(())
        batch = self._spawn_batch(arg_list, kwargs, max_concurrency)
        return batch.results(
            order_outputs=order_outputs, return_exceptions=return_exceptions, progress=progress
        )
