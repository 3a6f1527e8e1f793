"""Telling Ctrl-C apart at a command's top level, also when the `KeyboardInterrupt` arrived wrapped in another error."""

from __future__ import annotations


def caused_by_ctrl_c(exc: BaseException) -> bool:
    """True for a `KeyboardInterrupt`, or an error raised from one or while one was being handled.

    Ctrl-C can land anywhere, and some code turns the interrupt into another error: Python 3.11 re-raises anything
    that escapes a `__set_name__` (dataclass and pydantic fields have one) as `RuntimeError`, so Ctrl-C while a
    module defines such a class, e.g. during a command's imports, surfaces as "RuntimeError: Error calling
    __set_name__".
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
