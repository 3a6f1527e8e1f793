"""B3: per-call latency of each layer — runtime, service (sync/async), LangChain tool, MCP in-memory, MCP stdio,
MCP HTTP — with a null model (pure overhead) and with the benchmark-size model. Two floors of the MCP SDK stand
next to the in-memory row, both around the same service call and returning only text: `mcp_bare_sdk`, a bare
`MCPServer` tool, and `mcp_sdk_round_trip`, a low-level `Server` whose `tools/call` handler awaits the call itself
(no tool layer at all): what the SDK's client and in-memory transport cost with no server code in the way.

Calls are sequential (one caller) and interleaved round by round across layers (the order reversed every other
round), so machine noise hits every layer alike; figures are medians. The checks use paired ratios: each round's
layer call divided by the same round's service call, then the median over rounds, which cancels the slow drifts
of a shared machine that a ratio of two medians keeps. The in-process layers take their rounds first; MCP stdio
and HTTP (servers in subprocesses, `benchmarks/_null_server.py`) then take theirs with fresh service calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from .harness import Check, ScenarioResult, median, ratios
from .null_model import NullRuntime
from .scenarios import BenchContext
from .sizes import make_images

REPO = Path(__file__).resolve().parents[1]
_NULL_SERVER = Path(__file__).with_name("_null_server.py")


def b3_layers(ctx: BenchContext) -> ScenarioResult:
    """Per-call overhead of each layer; checks LangChain and MCP in-memory against a direct service call."""
    rounds = ctx.scale(120 if ctx.size != "real" else 3, 8)
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b3.png"
        make_images(1, ctx.size, seed=30)[0].save(path)
        for kind in ("null", "model"):
            times = asyncio.run(_measure(ctx, kind, str(path), rounds))
            medians = {layer: median(values) for layer, values in times.items()}
            bases = ("service", "service_async")
            for layer, value in medians.items():
                if "@" in layer:
                    continue  # the service calls an out-of-process layer was paired with
                sync, async_ = (f"{layer}@service", f"{layer}@service_async") if layer in _OUT_OF_PROCESS else bases
                rows.append(
                    {
                        "model": kind if kind == "null" else ctx.size,
                        "layer": layer,
                        "median_ms": value * 1000,
                        "overhead_vs_service_ms": (value - median(times[sync])) * 1000,
                        "x_service": _paired(times[layer], times[sync]),
                        "x_service_async": _paired(times[layer], times[async_]),
                    }
                )
            if kind == "model" and ctx.size == "tiny":
                lc = _paired(times["langchain_tool"], times["service"])
                mcp = _paired(times["mcp_in_memory"], times["service_async"])
                checks.append(Check("tiny: LangChain tool <= 1.03x a direct service call", lc <= 1.03, f"{lc:.3f}x"))
                checks.append(
                    Check(
                        "tiny: MCP in-memory <= 1.03x a direct service call (acaption, which its tool awaits)",
                        mcp <= 1.03,
                        f"{mcp:.3f}x ({_paired(times['mcp_in_memory'], times['service']):.3f}x the sync call; the "
                        f"SDK's floors, returning only the caption text: a bare tool "
                        f"{_paired(times['mcp_bare_sdk'], times['service_async']):.3f}x, the round trip with no "
                        f"tool layer {_paired(times['mcp_sdk_round_trip'], times['service_async']):.3f}x)",
                    )
                )
    return ScenarioResult(
        "B3",
        "per-call latency of each layer",
        ctx.size,
        rows,
        checks,
        notes=[
            f"median of {rounds} sequential calls per layer, interleaved (order reversed every other round); the "
            "in-process layers run their rounds first, then MCP stdio and HTTP in rounds of their own with fresh "
            "service calls to compare with; `mcp_bare_sdk` and `mcp_sdk_round_trip` are the SDK's floors for the "
            "MCP in-memory row: a bare `MCPServer` tool, and a low-level `Server` whose tools/call handler awaits "
            "the call with no tool layer, each awaiting the same `acaption` and returning only the caption text "
            "(no output schema, none of our wrapping); x_ columns are paired: the median over rounds of the "
            "layer's call / that round's service call; every layer decodes the same PNG path; the service's 2 ms "
            "idle wait window is included from `service` on"
        ],
    )


def _paired(values: list[float], base: list[float]) -> float:
    """Median over rounds of `values[i] / base[i]` (both measured in round i)."""
    return median(ratios(values, base))


async def _measure(ctx: BenchContext, kind: str, path: str, rounds: int) -> dict[str, list[float]]:
    from mcp import Client, types
    from mcp.server import MCPServer
    from mcp.server.lowlevel import Server

    from blip_tools.images import load_image
    from blip_tools.langchain import CaptionImageTool
    from blip_tools.params import GenerationParams
    from blip_tools.runtime import GenerationItem
    from mcp_server import create_server

    gen = {"max_new_tokens": ctx.tokens}
    svc = ctx.service(NullRuntime if kind == "null" else None)
    rt = svc.runtime
    params = GenerationParams(**gen)
    tool = CaptionImageTool(service=svc)
    args = {"image": path, **gen}

    def direct() -> Any:
        loaded = load_image(path, svc.settings)
        item = GenerationItem(rt.preprocess(loaded.image, loaded.sha256), rt.encode_prompt(None))
        return rt.generate([item], params)

    bare = MCPServer("bare")

    @bare.tool(name="caption_text", structured_output=False)
    async def caption_text(image: str, max_new_tokens: int) -> str:
        """The cheapest MCP wrapper of the same service call: unstructured text, no output schema."""
        return (await svc.acaption(image, max_new_tokens=max_new_tokens)).caption

    async def list_tools(_ctx: Any, _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool(name="caption_text", input_schema={"type": "object"})])

    async def call_tool(_ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        """The SDK's round trip alone: no tool layer, no validation, the same service call."""
        arguments = params.arguments or {}
        result = await svc.acaption(arguments["image"], max_new_tokens=arguments["max_new_tokens"])
        return types.CallToolResult(content=[types.TextContent(type="text", text=result.caption)])

    round_trip = Server("round-trip", on_list_tools=list_tools, on_call_tool=call_tool)

    layers: dict[str, Callable[[], Awaitable[Any]]] = {}

    async def call_sync(fn: Callable[[], Any]) -> Any:
        return fn()

    layers["runtime"] = lambda: call_sync(direct)
    layers["service"] = lambda: call_sync(lambda: svc.caption(path, **gen))
    layers["service_async"] = lambda: svc.acaption(path, **gen)
    layers["langchain_tool"] = lambda: call_sync(lambda: tool.invoke(args))
    layers["langchain_tool_async"] = lambda: tool.ainvoke(args)
    try:
        async with contextlib.AsyncExitStack() as stack:
            memory = await stack.enter_async_context(Client(create_server(svc)))
            layers["mcp_in_memory"] = lambda: _call(memory, args)
            floor = await stack.enter_async_context(Client(bare))
            layers["mcp_bare_sdk"] = lambda: _call(floor, args, "caption_text")
            sdk = await stack.enter_async_context(Client(round_trip))
            layers["mcp_sdk_round_trip"] = lambda: _call(sdk, args, "caption_text")
            stdio = await stack.enter_async_context(Client(_stdio_params(ctx, kind)))
            layers["mcp_stdio"] = lambda: _call(stdio, args)
            url = await stack.enter_async_context(_http_server(ctx, kind))
            http = await stack.enter_async_context(Client(url))
            layers["mcp_http"] = lambda: _call(http, args)
            for fn in layers.values():  # warm-up (model load in subprocesses, first-call paths)
                await fn()
                await fn()
            # In-process layers first, on their own: the server subprocesses' after-call work (their own model,
            # logging, GC) must not land on them. Then the out-of-process layers, paired with fresh service calls.
            times = await _rounds({k: v for k, v in layers.items() if k not in _OUT_OF_PROCESS}, rounds)
            bases = {"service": layers["service"], "service_async": layers["service_async"]}
            remote = await _rounds({**bases, **{k: layers[k] for k in _OUT_OF_PROCESS}}, rounds)
            for name in _OUT_OF_PROCESS:
                times[name] = remote[name]
                for base in bases:
                    times[f"{name}@{base}"] = remote[base]
    finally:
        svc.close()
    return times


_OUT_OF_PROCESS = ("mcp_stdio", "mcp_http")


async def _rounds(layers: dict[str, Callable[[], Awaitable[Any]]], rounds: int) -> dict[str, list[float]]:
    """`rounds` rounds of one call per layer, the order reversed every other round; seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    order = list(layers.items())
    for _ in range(rounds):
        for name, fn in order:
            start = time.perf_counter()
            await fn()
            times[name].append(time.perf_counter() - start)
        order.reverse()  # no layer always runs right after the same neighbour
    return times


async def _call(client: Any, args: dict[str, Any], tool: str = "caption_image") -> Any:
    result = await client.call_tool(tool, args)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content}")
    return result


def _server_env(ctx: BenchContext, kind: str) -> dict[str, str]:
    import torch

    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP_")}
    settings = ctx.settings()
    env.update(
        {
            "BLIP_MODEL": settings.model,
            "BLIP_RETRIEVAL_MODEL": settings.retrieval_model,
            "BLIP_DEVICE": "cpu",
            "BLIP_DTYPE": "float32",
            "BLIP_FEATURE_CACHE_SIZE": "0",
            "BLIP_PREFIX_CACHE_SIZE": "0",
            "BLIP_BENCH_NULL": "1" if kind == "null" else "0",
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            "TRANSFORMERS_VERBOSITY": "error",
        }
    )
    return env


def _stdio_params(ctx: BenchContext, kind: str) -> Any:
    from mcp.client.stdio import StdioServerParameters

    return StdioServerParameters(
        command=sys.executable,
        args=[str(_NULL_SERVER), "--log-level", "WARNING"],
        env=_server_env(ctx, kind),
        cwd=str(REPO),
    )


@contextlib.asynccontextmanager
async def _http_server(ctx: BenchContext, kind: str) -> AsyncIterator[str]:
    """`blip-mcp --transport http` on a free loopback port in a subprocess; yields its MCP URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(_NULL_SERVER), "--transport", "http", "--port", str(port), "--log-level", "WARNING"]
    proc = subprocess.Popen(
        cmd, env=_server_env(ctx, kind), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the MCP HTTP server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the MCP HTTP server did not start within 120 s") from None
                await asyncio.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
