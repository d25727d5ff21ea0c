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
    cls: type, method: str, enter: tuple[str, ...], args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    state: dict[str, Any] = {}

    def call(*a: Any, **kw: Any) -> Any:
        instance = state.get("instance")
        if instance is None:
            instance = cls(*args, **kwargs)
            for name in enter:
                getattr(instance, name)()
            state["instance"] = instance
        return getattr(instance, method)(*a, **kw)

    call.__name__ = call.__qualname__ = f"{cls.__qualname__}.{method}"
    return call
