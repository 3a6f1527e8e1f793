"""`blip-mcp` for benchmarks: with `BLIP_BENCH_NULL=1` the service runs the null model (B3's MCP layers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if os.environ.get("BLIP_BENCH_NULL") == "1":
        import blip_tools.service
        from benchmarks.null_model import NullRuntime

        blip_tools.service.Blip2Runtime = NullRuntime  # type: ignore[misc]
    from mcp_server.cli import main

    raise SystemExit(main())
