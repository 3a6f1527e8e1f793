"""Does the HTTP daemon stay healthy under client churn? RSS, open fds, threads, asyncio tasks and MCP sessions of a
real `blip-mcp --transport http` daemon (tiny checkpoint, CPU) before and after each scenario.

    python benchmarks/http_churn.py --checkpoint /tmp/tiny          # `blip-tools tiny-checkpoint /tmp/tiny` first
    python benchmarks/http_churn.py --checkpoint /tmp/tiny --sessions 2000 --only churn

Scenarios: `churn` (N sequential SDK client sessions, handshake-era and modern: initialize, one caption_image,
close; then N more, 32 at a time), `vanish` (clients killed with sessions open, then in the middle of queued calls:
how many of their calls the model still computes), `slow` (silent, half-sent-head and half-sent-body connections:
are they closed?), `burst` (500 concurrent `initialize`, closed, then left open until the idle timeout).
The daemon runs under a small wrapper that reports asyncio tasks and sessions on SIGUSR1 and can hold the model
(a gate file) so calls queue.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

REPO = Path(__file__).resolve().parents[1]

WRAPPER = r"""
import asyncio, gc, json, os, signal, sys, threading, time
import mcp_server.web as web
seen = {}
build = web.build_app
def build_app(server, *a, **k):
    seen["server"] = server
    return build(server, *a, **k)
web.build_app = build_app
def dump(*_):
    gc.collect()
    server = seen.get("server")
    context = server.current_context if server else None
    gated = context.service.runtime.generate if context else None
    out = {"tasks": len(asyncio.all_tasks()), "sessions": len(server.session_manager._server_instances),
           "computed": getattr(gated, "computed", 0)}
    with open(os.environ["CHURN_STATS"] + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(os.environ["CHURN_STATS"] + ".tmp", os.environ["CHURN_STATS"])
def gate(*_):
    runtime = seen["server"].current_context.service.runtime
    generate = runtime.generate
    def gated(*a, **k):
        while os.path.exists(os.environ["CHURN_STATS"] + ".gate"):
            time.sleep(0.01)
        gated.computed += len(a[0])
        return generate(*a, **k)
    gated.computed = 0
    runtime.generate = gated
signal.signal(signal.SIGUSR1, dump)
signal.signal(signal.SIGUSR2, gate)
from mcp_server.cli import main
sys.exit(main())
"""

CLIENT = r"""
import sys, anyio
from mcp import Client
async def main(url, mode, image):
    async with Client(url, mode=mode) as client:
        print("ready", flush=True)
        if image != "-":
            await client.call_tool("caption_image", {"image": image, "max_new_tokens": 3})
        await anyio.sleep(3600)
anyio.run(main, *sys.argv[1:])
"""

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "churn", "version": "0"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class Daemon:
    def __init__(self, checkpoint: Path, work: Path, idle_s: float) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.stats_path = work / "stats.json"
        self.gate_path = Path(f"{self.stats_path}.gate")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP_")}
        env.update(CHURN_STATS=str(self.stats_path), PYTHONPATH=str(REPO))
        args = ["--transport", "http", "--port", str(self.port), "--session-idle-timeout", str(idle_s)]
        args += ["--model", str(checkpoint / "captioner"), "--retrieval-model", str(checkpoint / "retrieval")]
        args += ["--device", "cpu", "--allowed-dir", str(work)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, *args], stderr=(work / "daemon.err").open("wb"), env=env
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise SystemExit(f"the daemon did not start: {(work / 'daemon.err').read_text()[-2000:]}")
        os.kill(self.proc.pid, signal.SIGUSR2)  # install the gate (open while no gate file exists)

    def stats(self, settle_s: float = 1.0) -> dict[str, Any]:
        time.sleep(settle_s)
        self.stats_path.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR1)
        while not self.stats_path.exists():
            time.sleep(0.02)
        out = json.loads(self.stats_path.read_text())
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        out["rss_mb"] = round(int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024, 1)  # type: ignore[index]
        out["threads"] = int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
        out["fds"] = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        return out

    def close(self) -> None:
        self.gate_path.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def show(label: str, stats: dict[str, Any]) -> None:
    print(f"{label:<44} " + " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)


async def session(url: str, mode: str, image: str) -> None:
    from mcp import Client

    async with Client(url, mode=mode) as client:  # type: ignore[arg-type]
        result = await client.call_tool("caption_image", {"image": image, "max_new_tokens": 3})
        assert not result.is_error, result


async def sessions(url: str, mode: str, image: str, n: int, at_once: int) -> int:
    limit, failed = anyio.Semaphore(at_once), 0

    async def one() -> None:
        nonlocal failed
        async with limit:
            try:
                await session(url, mode, image)
            except Exception:
                failed += 1

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return failed


def churn(d: Daemon, image: str, n: int) -> None:
    for mode in ("legacy", "auto"):
        show(f"{mode}: before", d.stats())
        for at_once in (1, 32):
            start = time.monotonic()
            failed = anyio.run(sessions, d.url, mode, image, n, at_once)
            show(
                f"{mode}: {n} sessions, {at_once} at once, {time.monotonic() - start:.0f} s, {failed} failed", d.stats()
            )


def vanish(d: Daemon, image: str, n: int, idle_s: float) -> None:
    def clients(mode: str, what: str) -> list[subprocess.Popen[bytes]]:
        procs = [
            subprocess.Popen([sys.executable, "-c", CLIENT, d.url, mode, what], stdout=subprocess.PIPE)
            for _ in range(n)
        ]
        for proc in procs:
            assert proc.stdout is not None
            proc.stdout.readline()
        return procs

    def kill(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            proc.kill()
            proc.wait()

    show("vanish: before", d.stats())
    procs = clients("legacy", "-")
    show(f"vanish: {n} sessions open", d.stats())
    kill(procs)
    show(f"vanish: {n} clients killed", d.stats())
    show(f"vanish: after the idle timeout ({idle_s:g} s)", d.stats(idle_s + 2))
    for mode in ("legacy", "auto"):
        d.gate_path.touch()
        procs = clients(mode, image)
        computed = d.stats(3)["computed"]
        show(f"vanish {mode}: {n} calls waiting", d.stats(0))
        kill(procs)
        d.gate_path.unlink()
        after = d.stats(3)
        show(f"vanish {mode}: killed; computed for them: {after['computed'] - computed}", after)
    show(f"vanish: after the idle timeout ({idle_s:g} s)", d.stats(idle_s + 2))


def slow(d: Daemon, n: int) -> None:
    body = json.dumps(INIT).encode()
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nAccept: application/json, text/event-stream\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    show("slow: before", d.stats())
    held = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(3 * n)]
    for sock in held[n : 2 * n]:
        sock.sendall(head[:30])
    for sock in held[2 * n :]:
        sock.sendall(head + body[:10])
    show(f"slow: {n} silent, {n} half a head, {n} half a body", d.stats())
    start = time.monotonic()
    for wait in (10, 40, 75):
        time.sleep(max(0.0, wait - (time.monotonic() - start)))
        open_ = 0
        for sock in held:
            sock.settimeout(0.01)
            try:
                open_ += sock.recv(65536) != b""  # an answer (408) still counts as open until the close
            except TimeoutError:
                open_ += 1
            except OSError:
                pass
        show(f"slow: after {wait} s, {open_} of {3 * n} still open", d.stats(0))
    for sock in held:
        sock.close()


def burst(d: Daemon, n: int, idle_s: float) -> None:
    async def inits(close: bool) -> dict[Any, int]:
        codes: dict[Any, int] = {}
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:

            async def one() -> None:
                try:
                    r = await http.post(d.url, json=INIT, headers=ACCEPT)
                    key: Any = r.status_code
                    if close and "mcp-session-id" in r.headers:
                        headers = {**ACCEPT, "mcp-session-id": r.headers["mcp-session-id"]}
                        await http.delete(d.url, headers={**headers, "mcp-protocol-version": "2025-06-18"})
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                codes[key] = codes.get(key, 0) + 1

            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one)
        return codes

    show("burst: before", d.stats())
    for rnd in range(3):
        show(f"burst {rnd}: {n} initialize + DELETE {anyio.run(inits, True)}", d.stats())
    for _ in range(3):
        show(f"burst: {n} initialize, never closed {anyio.run(inits, False)}", d.stats())
    show(f"burst: after the idle timeout ({idle_s:g} s)", d.stats(idle_s + 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="from `blip-tools tiny-checkpoint DIR`")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20, help="killed clients, and held connections of each kind")
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--idle-timeout", type=float, default=10.0, help="the daemon's --session-idle-timeout")
    parser.add_argument("--only", choices=["churn", "vanish", "slow", "burst"], action="append")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="http_churn_") as tmp:
        work = Path(tmp)
        import numpy as np
        from PIL import Image

        image = str(work / "img.png")
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
        daemon = Daemon(args.checkpoint, work, args.idle_timeout)
        try:
            for name in args.only or ["churn", "vanish", "slow", "burst"]:
                if name == "churn":
                    churn(daemon, image, args.sessions)
                elif name == "vanish":
                    vanish(daemon, image, args.clients, args.idle_timeout)
                elif name == "slow":
                    slow(daemon, args.clients)
                else:
                    burst(daemon, args.burst, args.idle_timeout)
        finally:
            daemon.close()


if __name__ == "__main__":
    main()
