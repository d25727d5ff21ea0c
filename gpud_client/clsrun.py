"""What runs inside a job for ``Cls().method(...)``: standard library only.

This module is pickled *by value* with each method call (the worker has no gpud_client),
so it must stay self-contained. The closure it builds makes the instance, and runs its
``@gpud.enter`` methods, once per worker process; a warm worker keeps the closure (and
so the instance, with whatever ``enter`` loaded) for the next call of the same method.
"""

from __future__ import annotations

from typing import Any

__all__ = ["make_method_call"]

#: gpud_client.payload pickles a module with this marker by value, though it is gpud's.
GPUD_PICKLE_BY_VALUE = True


def make_method_call(
    cls: type,
    method: str,
    enter: tuple[tuple[str, bool], ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exits: tuple[str, ...] = (),
) -> Any:
    """``enter`` is ((name, snap), ...) in definition order. The ``snap=True`` ones run in
    ``__gpud_snap__``, which a snapshot-taking worker calls before its checkpoint (so
    their state is in the snapshot); the others run at the first call in each process,
    restored ones included. ``exits``: the ``@gpud.exit`` methods, run through
    ``atexit`` when the worker process ends (the worker's SIGTERM handler runs them
    too, #14)."""
    state: dict[str, Any] = {}

    def snap_setup() -> None:
        if "instance" not in state:
            instance = cls(*args, **kwargs)
            for name, snap in enter:
                if snap:
                    getattr(instance, name)()
            state["instance"] = instance
            if exits:
                import atexit

                atexit.register(_run_exits, instance, exits)

    def call(*a: Any, **kw: Any) -> Any:
        snap_setup()
        instance = state["instance"]
        if not state.get("entered"):
            for name, snap in enter:
                if not snap:
                    getattr(instance, name)()
            state["entered"] = True
        return getattr(instance, method)(*a, **kw)

    call.__name__ = call.__qualname__ = f"{cls.__qualname__}.{method}"
    call.__gpud_snap__ = snap_setup  # type: ignore[attr-defined]  # a mark on a function
    return call


def _run_exits(instance: Any, exits: tuple[str, ...]) -> None:
    import sys
    import traceback

    for name in exits:
        try:
            getattr(instance, name)()
        except BaseException:  # noqa: BLE001 - one failing exit method must not stop the rest
            print(f"gpud: @gpud.exit method {name} raised:", file=sys.stderr)
            traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
