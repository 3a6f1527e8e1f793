"""Logging to stderr for the command-line programs (`blip-tools`, `blip-mcp`): each record printed once."""

from __future__ import annotations

import logging

#: Libraries that add a stderr handler of their own to their top logger and still let records propagate to
#: the root logger, so with the root logger configured as well each of their lines would be printed twice
#: (huggingface_hub's retry warnings when the hub is unreachable: two lines per retry, once bare and once
#: formatted). Its handler is added only when its logging module is first imported (usually while the model
#: loads), so it cannot be removed up front; the root handlers skip what it prints instead.
_ECHOING_LIBRARIES = ("huggingface_hub",)


class SkipLibraryEchoes(logging.Filter):
    """For root handlers: drop a record that a library's own handler has already written."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in _ECHOING_LIBRARIES:
            if record.name == name or record.name.startswith(name + "."):
                top = logging.getLogger(name)
                # A record that reached the root passed that logger's handlers on the way up; a library without
                # a handler of its own (not imported yet, or one the user removed) is printed here as usual.
                return not (top.handlers and top.propagate)
        return True


def skip_library_echoes() -> None:
    """Add `SkipLibraryEchoes` to every root handler that does not have it yet."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, SkipLibraryEchoes) for f in handler.filters):
            handler.addFilter(SkipLibraryEchoes())


__all__ = ["SkipLibraryEchoes", "skip_library_echoes"]
