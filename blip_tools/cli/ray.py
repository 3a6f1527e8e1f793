"""`blip-tools serve-ray`: deploy BLIP-2 replicas on a Ray cluster (local or multi-node) behind MCP over HTTP."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

from ..errors import CapabilityUnavailable
from ._common import add_model_options, settings_from_args

_PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
_PROXY_READY_S = "20"
"""Seconds a readiness check of Serve's HTTP proxy may take on a Ray instance serve-ray starts (Ray's default: 5)."""

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve-ray`."""
    p = sub.add_parser(
        "serve-ray",
        help="serve on Ray Serve: N replicas (one model each) behind MCP over HTTP (needs the [ray] extra)",
        description="Deploy Blip2Service replicas on Ray Serve. Clients connect with "
        "`blip-mcp --connect http://HOST:PORT/mcp` or RemoteService(URL); Python code in the cluster can use "
        "blip_tools.ray_serve.RayServeClient.",
    )
    add_model_options(p)
    g = p.add_argument_group("scaling")
    g.add_argument("--replicas", type=int, default=1, help="replicas, each with its own model (default 1)")
    g.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica, fractions allowed (default 0)")
    g.add_argument("--cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    g.add_argument(
        "--max-ongoing-requests", type=int, default=32, help="requests one replica batches at once (default 32)"
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=64,
        help="requests waiting for a replica at each HTTP proxy (one per node with replicas) before callers get "
        "Overloaded / HTTP 503 (default 64; -1 unbounded)",
    )
    g.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the retry hint of a refused request: Retry-After on Ray's HTTP 503, retry_after_s on Overloaded "
        "(default 1; needs Ray 2.60 or later)",
    )
    g = p.add_argument_group("cluster and HTTP")
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join, e.g. 'auto' or ray://head:10001 (default: RAY_ADDRESS, else a local instance)",
    )
    g.add_argument("--host", default="127.0.0.1", help="where Ray's HTTP proxy listens (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port of Ray's proxy (default 8000)")
    g.add_argument("--route-prefix", default="/", help="HTTP route of the app; MCP is at <prefix>/mcp (default /)")
    g.add_argument("--name", default="blip", help="Serve application name (default blip)")
    g.add_argument("--token", default=None, help="bearer token (prefer BLIP_TOKEN); required for a non-loopback host")
    g.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        default=[],
        metavar="NAME",
        help="extra Host header to accept, e.g. the head node's DNS name (repeatable)",
    )
    g.add_argument(
        "--detach",
        action="store_true",
        help="deploy and exit, leaving the app running on the cluster (with --address); default: serve until Ctrl-C",
    )
    p.set_defaults(handler=_serve_ray)


def _serve_ray(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise CapabilityUnavailable('Ray Serve is not installed: pip install "blip-tools[ray]".') from exc

    from ..ray_serve import RayServeConfig, run

    settings = settings_from_args(args)
    token = args.token or settings.token
    config = RayServeConfig(
        num_replicas=args.replicas,
        num_gpus=args.gpus,
        num_cpus=args.cpus,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        retry_after_s=args.retry_after,
        route_prefix=args.route_prefix,
        name=args.name,
        token=token,
        http_host=args.host,
        http_port=args.port,
        allowed_hosts=list(args.allowed_hosts),
    )
    config.check()
    from mcp_server.http import HttpConfig, authority

    HttpConfig(host=args.host, token=token).check()  # same rule as blip-mcp: no open non-loopback server
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.detach and not address:
        print("error: --detach needs a running cluster (--address or RAY_ADDRESS)", file=sys.stderr)
        return 2
    if not address:
        # Ray starts here, and its processes read this: Serve's controller gives its HTTP proxy 3 checks of 5 s to
        # start, then kills it and serve.start() fails (ActorDiedError). On a busy 2-core host the proxy took 21 s.
        os.environ.setdefault(_PROXY_READY_ENV, _PROXY_READY_S)
    ray.init(address=address, include_dashboard=False if not address else None, logging_level=logging.WARNING)
    leave_running = False
    deployed = False
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        host, port = _proxy_in_use(args.host, args.port, token)
        config = dataclasses.replace(config, http_host=host, http_port=port)
        run(settings, config)
        deployed = True
        prefix = args.route_prefix.rstrip("/")
        url = f"http://{authority('127.0.0.1' if host in ('0.0.0.0', '::', '') else host, port)}{prefix}/mcp"
        print(f"blip-tools on Ray Serve: {args.replicas} replica(s) of {settings.model}", file=sys.stderr)
        print(f"MCP endpoint: {url}", file=sys.stderr)
        print(f"connect with: blip-mcp --connect {url}", file=sys.stderr)
        if args.detach:
            leave_running = True
            return 0
        _wait_for_signal()
        print("shutting down the replicas", file=sys.stderr)
    finally:  # also after a failed deploy or a Ctrl-C while deploying
        if not leave_running:
            if not address:
                serve.shutdown()
            elif deployed:  # a shared cluster: remove only this app; other Serve apps (and Serve itself) keep running
                serve.delete(args.name)
            # a deploy that failed or was interrupted: `run` removed what it created, and nothing else is ours
        ray.shutdown()
    return 0


def _proxy_in_use(host: str, port: int, token: str | None) -> tuple[str, int]:
    """The host and port Ray's HTTP proxy really uses: `--host`/`--port` apply only where serve-ray starts Serve.

    Attached to a Serve instance that was already running, its own address counts, for the printed endpoint, for
    the replicas' Host checks and for the token rule (an instance open to the network needs a token).
    """
    from mcp_server.http import HttpConfig, authority

    from ..errors import InvalidInput
    from ..ray_serve import proxy_address

    actual = proxy_address()
    if actual is None:
        logger.warning("could not read the HTTP address from Serve; assuming --host %s --port %d", host, port)
        return host, port
    if actual == (host, port):
        return actual
    where = authority(*actual)
    print(
        f"note: Serve was already running on this cluster, with its HTTP proxy on {where}; --host and --port "
        "apply only where serve-ray starts Serve",
        file=sys.stderr,
    )
    try:
        HttpConfig(host=actual[0], token=token).check()
    except InvalidInput as exc:
        raise InvalidInput(f"The running Serve instance's HTTP proxy listens on {where}: {exc}") from exc
    return actual


def _wait_for_signal() -> None:
    """Block until Ctrl-C, `kill` or a systemd stop; a second one during shutdown interrupts as usual."""
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: not set from Python; leave ours (it only sets a finished event)
                signal.signal(signum, handler)
