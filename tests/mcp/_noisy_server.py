"""`blip-mcp` with noisy library code: each caption first writes to stdout every way a library might.

Used by the stdio tests to prove that only protocol messages reach the real stdout.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from blip_tools.service import Blip2Service

_acaption = Blip2Service.acaption


async def _noisy_acaption(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    print("NOISE print() from library code")
    sys.stdout.write("NOISE sys.stdout.write\n")
    sys.stdout.flush()
    os.write(1, b"NOISE os.write(1)\n")
    sys.__stdout__.write("NOISE sys.__stdout__\n")  # type: ignore[union-attr]
    sys.__stdout__.flush()  # type: ignore[union-attr]
    subprocess.run([sys.executable, "-c", "print('NOISE child process')"], check=True)
    warnings.warn("NOISE warnings.warn", UserWarning, stacklevel=1)
    logging.getLogger("noisy.library").warning("NOISE logging")
    return await _acaption(self, *args, **kwargs)


Blip2Service.acaption = _noisy_acaption  # type: ignore[method-assign]

if __name__ == "__main__":
    from mcp_server.cli import main

    raise SystemExit(main())
