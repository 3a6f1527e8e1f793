"""`blip-mcp` whose captioner takes `SLOW_LOAD_S` seconds to load, as a real checkpoint read from disk or fetched
from the hub would. It says on stderr when the load starts and when a call starts waiting for it.

Used by the shutdown tests: stopping the process must not wait for the load to finish. A caption call waits for
the load in the event loop (`AppContext.captioner_loaded`); an embedding call waits on the runtime's load lock in
a worker thread. Both say so.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from blip_tools.runtime import Blip2Runtime
from mcp_server._common import AppContext

_load_captioner = Blip2Runtime.load_captioner
_preprocess = Blip2Runtime.preprocess
_load_retrieval = Blip2Runtime.load_retrieval
_captioner_loaded = AppContext.captioner_loaded


def _slow_load_captioner(self: Blip2Runtime) -> Any:
    with self._lock:  # callers wait on the runtime's load lock, as they do during a real load
        if self._captioner is None:
            print("SLOW LOAD started", file=sys.stderr, flush=True)
            time.sleep(float(os.environ.get("SLOW_LOAD_S", "600")))
    return _load_captioner(self)


def _announced_preprocess(self: Blip2Runtime, *args: Any, **kwargs: Any) -> Any:
    print("CALL waiting for the model", file=sys.stderr, flush=True)
    return _preprocess(self, *args, **kwargs)


def _announced_load_retrieval(self: Blip2Runtime) -> Any:
    print("CALL waiting for the model", file=sys.stderr, flush=True)  # on the load lock the captioner's load holds
    return _load_retrieval(self)


async def _announced_captioner_loaded(self: AppContext) -> None:
    if not self.ready.is_set():
        print("CALL waiting for the model", file=sys.stderr, flush=True)
    await _captioner_loaded(self)


Blip2Runtime.load_captioner = _slow_load_captioner  # type: ignore[method-assign]
Blip2Runtime.preprocess = _announced_preprocess  # type: ignore[method-assign]
Blip2Runtime.load_retrieval = _announced_load_retrieval  # type: ignore[method-assign]
AppContext.captioner_loaded = _announced_captioner_loaded  # type: ignore[method-assign]

if __name__ == "__main__":
    from mcp_server.cli import main

    raise SystemExit(main())
