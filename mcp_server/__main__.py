"""`python -m mcp_server`: the same as the `blip-mcp` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
