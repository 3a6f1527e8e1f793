"""Scale out on Ray Serve: replicas that each own one `Blip2Service`, behind HTTP (MCP) and a handle API.

Each replica builds one `Blip2Service` (its own model copy and dynamic batcher) and serves:

- **HTTP**: the same app as `blip-mcp --transport http` (streamable-HTTP MCP at `/mcp`, `/healthz`, token and
  Host checks), mounted with `@serve.ingress`; Ray's HTTP proxy spreads requests over the replicas. So
  `blip-mcp --connect http://HEAD:8000/mcp` and `RemoteService("http://HEAD:8000/mcp")` work unchanged. MCP runs
  stateless there (`HttpConfig.stateless`): any replica answers any request, so session-based HTTP MCP clients
  work too, except that their `notifications/cancelled` may reach another replica.
- **Handle**: `caption`, `answer`, `score`, `embed_images`, `embed_texts`, `stats`, `model_info` methods for Python
  callers in the cluster; `RayServeClient` wraps a handle and returns the typed results, mapping Ray's
  `BackPressureError` (more than `max_queued_requests` waiting) to `Overloaded`.

Capacity (Ray's limits count HTTP requests and handle calls, not tool calls): `max_ongoing_requests` bounds the
requests one replica works on at once (they batch inside it); `max_queued_requests` bounds those waiting for a
replica *at each caller*, that is at each HTTP proxy (one per node that runs replicas) and at each handle. Beyond
that the caller answers `Overloaded` (HTTP 503) at once; a refused request never reached a replica. So one proxy
takes about `num_replicas * max_ongoing_requests + max_queued_requests` requests before refusing (260 at once
against 2 x 32 + 64: 131 served over HTTP at one request per call, 141-152 through a handle, every refusal
before the first result).
Ray counts a request as queued until its router has picked a replica, so a burst that arrives all at once can be
refused a little before that; the first `max_queued_requests` always get in. Every MCP message is a request
(`tools/list` too), so a client that needs two requests for one tool call can have the second refused.
Refusals carry a retry hint: HTTP 503s get `Retry-After: <retry_after_s>` and handle callers' `Overloaded` its
`retry_after_s` (Ray's `backpressure_config`, Ray 2.60 and later; older Ray sends no header and callers assume 1 s).
Ray logs a warning per refused request in the process that refused it; where blip-tools runs (the process that
deploys, and `RayServeClient`'s) those warnings are thinned to one line per `REFUSAL_LOG_INTERVAL_S` with the
count of the others (`limit_refusal_warnings`). The HTTP proxy is Ray's own process: its log keeps one line each.
Start it with `blip-tools serve-ray` (needs the `ray` extra: `pip install "blip-tools[ray]"`).
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BlipError, CapabilityUnavailable, InvalidInput, ModelNotAvailable, Overloaded
from .results import AnswerResult, CaptionResult, EmbeddingResult, ModelInfo, ScoreResult, ServiceStats
from .settings import BlipSettings

logger = logging.getLogger(__name__)

DEFAULT_APP_NAME = "blip"
DEFAULT_DEPLOYMENT_NAME = "Blip2Deployment"

REFUSAL_LOG_INTERVAL_S = 10.0
"""At most one line per this many seconds for Ray's per-request back-pressure warning (see `RefusalLogLimiter`)."""

_SERVE_LOGGER = "ray.serve"
_BACKPRESSURE_MESSAGE = "Request dropped due to backpressure"
"""How Ray Serve's `BackPressureError` message (logged by its router for every refusal) begins."""


def _require_ray() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise CapabilityUnavailable(
            'Ray Serve is not installed: pip install "blip-tools[ray]" (or pip install "ray[serve]").'
        ) from exc
    return ray, serve


@dataclass
class RayServeConfig:
    """How the deployment is scaled and exposed."""

    num_replicas: int = 1
    """Replicas, each with its own model copy and batcher."""

    num_gpus: float = 0.0
    """GPUs per replica (fractions share a GPU between replicas)."""

    num_cpus: float = 1.0
    """CPUs reserved per replica."""

    max_ongoing_requests: int = 32
    """Requests one replica works on at once (they batch together); twice `max_batch_size` keeps it busy."""

    max_queued_requests: int = 64
    """Requests waiting for a replica at each caller (each HTTP proxy, each handle); one more gets `Overloaded`
    (HTTP 503) at once. -1 means unbounded."""

    route_prefix: str = "/"
    """HTTP route of the app on Ray's proxy: the MCP endpoint is `<route_prefix>/mcp`."""

    name: str = DEFAULT_APP_NAME
    """Serve application name (one per deployment of blip-tools on a cluster)."""

    token: str | None = None
    """Bearer token for HTTP (required when Ray's proxy listens beyond loopback)."""

    http_host: str = "127.0.0.1"
    """Where Ray's HTTP proxy listens; decides the Host names accepted (see `allowed_hosts`)."""

    http_port: int = 8000
    """The port of Ray's HTTP proxy (what the replicas report in their logs)."""

    allowed_hosts: list[str] = field(default_factory=list)
    """Extra Host header values to accept (the head node's DNS name, a load balancer's name)."""

    max_constructor_retries: int | None = None
    """Replica starts Ray tries before the deployment fails (None: Ray's default, 3 per replica, at most 20)."""

    retry_after_s: float | None = 1.0
    """The retry hint of a refusal beyond `max_queued_requests`: Ray's HTTP 503 carries `Retry-After` (whole
    seconds, rounded up) and a handle's `Overloaded` this `retry_after_s`. None: no header. Needs Ray 2.60 or later
    (`backpressure_config`); older Ray sends no header."""

    def check(self) -> None:
        """Readable errors for impossible values, before anything starts."""
        if self.num_replicas < 1:
            raise InvalidInput(f"num_replicas must be an integer >= 1, got {self.num_replicas}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise InvalidInput(f"num_gpus and num_cpus must be >= 0, got {self.num_gpus} and {self.num_cpus}")
        if self.max_ongoing_requests < 1:
            raise InvalidInput(f"max_ongoing_requests must be an integer >= 1, got {self.max_ongoing_requests}")
        if self.max_queued_requests < -1:
            raise InvalidInput(f"max_queued_requests must be -1 (unbounded) or >= 0, got {self.max_queued_requests}")
        if self.max_constructor_retries is not None and self.max_constructor_retries < 1:
            raise InvalidInput(
                f"max_constructor_retries must be None or an integer >= 1, got {self.max_constructor_retries}"
            )
        if self.retry_after_s is not None and not (math.isfinite(self.retry_after_s) and self.retry_after_s >= 0):
            raise InvalidInput(f"retry_after_s must be None or a number of seconds >= 0, got {self.retry_after_s}")
        if not self.route_prefix.startswith("/"):
            raise InvalidInput(f"route_prefix must start with '/', got {self.route_prefix!r}")


def _replica_identity() -> dict[str, Any]:
    """Which replica (and process) answered: for logs, tests and spreading checks."""
    from ray import serve

    try:
        replica_id = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (direct use in tests)
        replica_id = "local"
    return {"replica": replica_id, "pid": os.getpid()}


class Blip2Deployment:
    """One Ray Serve replica: one `Blip2Service`, its MCP HTTP app, and handle methods.

    Handle methods take image references (paths the replica's node can read, data URIs, base64, bytes or PIL
    images) and return `{"replica": ..., "pid": ..., "result": <result as JSON-able dict>}`; `RayServeClient`
    unwraps them into typed results. Errors are `BlipError`s.
    """

    def __init__(self, settings: dict[str, Any], config: dict[str, Any] | None = None) -> None:
        from mcp_server.server import create_server

        from .service import Blip2Service

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.settings = BlipSettings(**settings)
        self.config = RayServeConfig(**(config or {}))
        self.service = Blip2Service(self.settings).start()
        self.server = create_server(self.service)
        self.identity = _replica_identity()
        logger.info("blip-tools replica %s (pid %s) ready", self.identity["replica"], self.identity["pid"])

    def __serve_build_asgi_app__(self) -> Any:
        """The replica's HTTP app: the same MCP app, checks and routes as `blip-mcp --transport http`."""
        from mcp_server.http import HttpConfig, build_http_app

        # Stateless: Ray's proxy sends one client's requests to any replica, and a session lives in one replica
        # only (a session-based client would get "404 Session not found" from the others).
        http = HttpConfig(
            host=self.config.http_host,
            port=self.config.http_port,
            token=self.config.token,
            allowed_hosts=list(self.config.allowed_hosts),
            stateless=True,
        )
        return build_http_app(self.server, http)

    def _reply(self, result: Any) -> dict[str, Any]:
        if isinstance(result, list):
            value: Any = [r.model_dump(mode="json") if not isinstance(r, BlipError) else _error_dict(r) for r in result]
        else:
            value = result.model_dump(mode="json")
        return {**self.identity, "result": value}

    async def whoami(self) -> dict[str, Any]:
        """This replica's id and process id."""
        return dict(self.identity)

    async def caption(self, image: Any, prompt: str | None = None, **gen: Any) -> dict[str, Any]:
        """Caption one image (batched with whatever else this replica is serving)."""
        return self._reply(await self.service.acaption(image, prompt, **gen))

    async def answer(self, image: Any, question: str, **gen: Any) -> dict[str, Any]:
        """Answer a question about one image."""
        return self._reply(await self.service.aanswer(image, question, **gen))

    async def score(self, image: Any, texts: Sequence[str]) -> dict[str, Any]:
        """ITC and ITM scores of texts against one image."""
        return self._reply(await self.service.ascore(image, texts))

    async def embed_images(self, images: Sequence[Any], include_query_vectors: bool = False) -> dict[str, Any]:
        """Image embeddings; a bad image yields its error in place."""
        results = await self.service.aembed_images(
            images, include_query_vectors=include_query_vectors, return_exceptions=True
        )
        return self._reply(results)

    async def embed_texts(self, texts: Sequence[str]) -> dict[str, Any]:
        """Text embeddings."""
        return self._reply(await self.service.aembed_texts(texts))

    async def stats(self) -> dict[str, Any]:
        """This replica's service counters."""
        return self._reply(self.service.stats())

    async def model_info(self) -> dict[str, Any]:
        """This replica's model, device and limits."""
        return self._reply(self.service.model_info())

    def __del__(self) -> None:  # replicas are torn down by Ray; drain what is queued
        service = getattr(self, "service", None)
        if service is not None and not service.closed:
            service.close(drain=True, timeout_s=10.0)


def _error_dict(exc: BlipError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": str(exc)}}


def build_app(settings: BlipSettings, config: RayServeConfig | None = None) -> Any:
    """The Serve application (`serve.run(build_app(...))`): replicas of `Blip2Deployment` with the config's limits."""
    _, serve = _require_ray()
    config = config or RayServeConfig()
    config.check()
    actor_options: dict[str, Any] = {"num_cpus": config.num_cpus}
    if config.num_gpus:
        actor_options["num_gpus"] = config.num_gpus
    options: dict[str, Any] = {}
    if config.max_constructor_retries is not None:
        options["max_constructor_retry_count"] = config.max_constructor_retries
    if config.retry_after_s is not None:
        if "backpressure_config" in inspect.signature(serve.deployment).parameters:
            options["backpressure_config"] = {"retry_after_s": config.retry_after_s}
        else:  # Ray before 2.60: its 503 has no Retry-After (RemoteService then assumes 1 s)
            logger.debug("this Ray Serve has no backpressure_config: its 503s carry no Retry-After")
    limit_refusal_warnings()  # the process that deploys holds handles too (and usually shows its log)
    ingress_cls = serve.ingress()(Blip2Deployment)
    deployment = serve.deployment(
        ingress_cls,
        name=DEFAULT_DEPLOYMENT_NAME,
        num_replicas=config.num_replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=10,
        **options,
    )
    config_dict = {
        "num_replicas": config.num_replicas,
        "http_host": config.http_host,
        "http_port": config.http_port,
        "token": config.token,
        "allowed_hosts": list(config.allowed_hosts),
        "route_prefix": config.route_prefix,
        "name": config.name,
    }
    return deployment.bind(settings.for_server().model_dump(mode="json"), config_dict)  # replicas serve for good


def run(settings: BlipSettings, config: RayServeConfig | None = None, *, blocking: bool = False) -> Any:
    """Deploy on the connected Ray cluster (`ray.init` first, or let Serve start a local one); return the handle.

    A deploy that fails (or is interrupted) removes the application it created, so `serve status` shows no
    `DEPLOY_FAILED` app left behind. Serve itself and every other application keep running; an application of
    the same name that was already serving before this call is left for its owner to see.

    Raises:
        BlipError: the replicas could not start (e.g. `ModelNotAvailable` for a checkpoint that does not load),
            with the replica's own message, once Ray has given up retrying.
    """
    ray, serve = _require_ray()
    config = config or RayServeConfig()
    app = build_app(settings, config)
    replaces = _serving_app_named(ray, serve, config.name)
    try:
        return serve.run(app, name=config.name, route_prefix=config.route_prefix, blocking=blocking)
    except RuntimeError as exc:  # Serve's "Deploying application X failed": the replica's error is in its status
        error = _deploy_error(serve, config.name)  # read before the app (and its status) is deleted
        if not replaces:
            _delete_app(serve, config.name)
        raise error from exc
    except BaseException:  # Ctrl-C or a lost cluster while deploying: no half-deployed app left behind
        if not replaces:
            _delete_app(serve, config.name)
        raise


_NOT_SERVING = {"DEPLOY_FAILED", "DELETING", "NOT_STARTED"}
"""Application states with nothing to lose: a failed deploy over such an app deletes it."""


def _serving_app_named(ray: Any, serve: Any, name: str) -> bool:
    """Whether an application called `name` was already deployed (and not failed) before this deploy.

    Unknown counts as yes: a failed deploy then leaves the app in place rather than risk deleting someone else's.
    """
    if not ray.is_initialized():  # `serve.run` starts a fresh local instance: nothing can be there yet
        return False
    try:
        app = serve.status().applications.get(name)
    except Exception:
        logger.debug("serve.status() failed before deploying %r", name, exc_info=True)
        return True
    return app is not None and getattr(app.status, "value", app.status) not in _NOT_SERVING


def _delete_app(serve: Any, name: str) -> None:
    """Remove this call's failed application; a failure to do so is logged, never raised over the real error."""
    try:
        serve.delete(name)
    except Exception:
        logger.warning("Could not delete the failed Serve app %r; serve status may list it", name, exc_info=True)


def proxy_address() -> tuple[str, int] | None:
    """Where the running Serve instance's HTTP proxy listens, `(host, port)`, as Serve itself records it.

    `serve.start(http_options=...)` applies its host and port only when it starts Serve: attached to an instance
    that was already running, it ignores them (Serve logs a warning), and this is the address really in use.
    None when no Serve instance is reachable from this process.
    """
    try:
        # No public API returns the HTTP options in-process (`serve.status()` leaves them out); the client that
        # `serve.start` and `serve.status` use holds them, read once from the controller.
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        options = client.http_config
        return str(options.host), int(options.port)
    except Exception:
        logger.debug("could not read the HTTP options of the running Serve instance", exc_info=True)
        return None


# "blip_tools.errors.ModelNotAvailable: Could not load ..." as the last line of a replica's traceback
_REPLICA_ERROR = re.compile(r"^blip_tools\.errors\.(\w+): (.+)$", re.MULTILINE)


def _deploy_error(serve: Any, app_name: str) -> BlipError:
    """The typed error for a failed deployment, from the message Serve keeps of the replica's last failure."""
    from . import errors

    messages: list[str] = []
    try:
        app = serve.status().applications.get(app_name)
        if app is not None:
            messages = [d.message for d in app.deployments.values() if d.message]
            messages += [app.message] if app.message else []
    except Exception:  # the status itself is unreadable: still say what failed
        logger.debug("serve.status() failed after a failed deployment", exc_info=True)
    for message in messages:
        found = _REPLICA_ERROR.findall(message)
        if found:
            name, text = found[-1]
            kind = getattr(errors, name, None)
            if isinstance(kind, type) and issubclass(kind, BlipError):
                try:
                    return kind(f"The blip-tools replicas of Serve app {app_name!r} could not start: {text}")
                except TypeError:  # a leaf with another constructor: keep the text
                    break
    why = messages[-1].strip().splitlines()[-1] if messages else "see the Ray Serve logs"
    return ModelNotAvailable(
        f"The blip-tools replicas of Serve app {app_name!r} could not start: {why}. "
        "`serve status` and the replica logs say more."
    )


# ---------------------------------------------------------------------------------------------- refusal warnings
class RefusalLogLimiter(logging.Filter):
    """Thins Ray Serve's back-pressure warning, which its router logs once per refused request, to one line per
    `interval_s`, without losing the count.

    The first refusal after a quiet interval is logged as Ray wrote it; the ones that follow within `interval_s`
    are counted, and when the interval ends one summary line (on the same logger, also a warning) says how many
    more were refused since the last line and quotes the latest. A burst of 10,000 refusals in a second is two
    lines; a sustained overload one line per interval. Other records pass untouched. Thread-safe.
    """

    def __init__(
        self,
        interval_s: float = REFUSAL_LOG_INTERVAL_S,
        *,
        logger_name: str = _SERVE_LOGGER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._logger = logging.getLogger(logger_name)
        self._clock = clock
        self._lock = threading.Lock()
        self._quiet_until = -math.inf
        self._last_line_at = 0.0
        self._suppressed = 0
        self._latest = ""
        self._timer: threading.Timer | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "blip_refusal_summary", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format is not ours to judge
            return True
        if not message.startswith(_BACKPRESSURE_MESSAGE):
            return True
        now = self._clock()
        with self._lock:
            if now >= self._quiet_until and self._suppressed == 0:
                self._quiet_until = now + self.interval_s
                self._last_line_at = now
                return True
            self._suppressed += 1
            self._latest = message
            if self._timer is None:
                self._timer = threading.Timer(max(0.0, self._quiet_until - now), self.flush)
                self._timer.daemon = True
                self._timer.start()
        return False

    def flush(self) -> None:
        """Log the summary of the refusals counted since the last line, if any (also called at exit)."""
        with self._lock:
            count, latest = self._suppressed, self._latest
            self._suppressed = 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not count:
                return
            now = self._clock()
            since, self._last_line_at = now - self._last_line_at, now
            self._quiet_until = now + self.interval_s  # refusals are still coming: the next line an interval on
        self._logger.warning(
            "%d more requests dropped due to backpressure in the last %.1f s (logged once per %g s by blip-tools; "
            "latest: %s)",
            count,
            since,
            self.interval_s,
            latest,
            extra={"blip_refusal_summary": True},
        )


_limiter_lock = threading.Lock()


def limit_refusal_warnings(interval_s: float = REFUSAL_LOG_INTERVAL_S) -> RefusalLogLimiter:
    """Install (once per process) the `RefusalLogLimiter` on Ray Serve's logger, where its router logs a warning
    per refused request; returns the one installed. It acts in this process only: Ray's HTTP proxy runs in an actor
    of its own, which no application code reaches, and logs each refusal there."""
    serve_logger = logging.getLogger(_SERVE_LOGGER)
    with _limiter_lock:
        for existing in serve_logger.filters:
            if isinstance(existing, RefusalLogLimiter):
                return existing
        limiter = RefusalLogLimiter(interval_s)
        serve_logger.addFilter(limiter)
        atexit.register(limiter.flush)
        return limiter


# ---------------------------------------------------------------------------------------------- client side
def map_ray_error(exc: BaseException) -> BlipError | None:
    """The `BlipError` for what a handle call raised: back-pressure → `Overloaded`, replica errors unwrapped."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

    current: BaseException | None = exc
    seen = 0
    while current is not None and seen < 8:
        if isinstance(current, BackPressureError):
            retry = getattr(current, "retry_after_s", None)
            return Overloaded(
                f"All blip-tools replicas are busy and their queue is full ({current}). Retry shortly, or add "
                "replicas (--replicas) / raise --max-queued-requests.",
                retry_after_s=float(retry) if retry else 1.0,
            )
        if isinstance(current, RayActorError | ReplicaUnavailableError):
            # killed (OOM killer, node lost, crash) while serving the call: Serve starts a replacement
            return ModelNotAvailable(
                f"The blip-tools replica serving this call died or became unreachable ({type(current).__name__}); "
                "Ray Serve replaces it. Retry the call; if it keeps happening, check the replica logs (out of "
                "memory?) and `serve status`."
            )
        if isinstance(current, BlipError):  # Ray's `RayTaskError(InvalidImage)` wrapper keeps the original as `cause`
            original = getattr(current, "cause", None)
            return original if isinstance(original, BlipError) else current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
        seen += 1
    return None


class RayServeClient:
    """Typed access to a `Blip2Deployment` handle: `CaptionResult` etc., `BlipError`s, `Overloaded` on back-pressure.

    `last_replica` records which replica answered the last call (useful to see requests spread).
    """

    def __init__(self, handle: Any | None = None, *, app_name: str = DEFAULT_APP_NAME) -> None:
        _, serve = _require_ray()
        limit_refusal_warnings()  # this process's router logs a warning per refused call
        self.handle = handle if handle is not None else serve.get_app_handle(app_name)
        self.last_replica: dict[str, Any] | None = None

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            reply = await getattr(self.handle, method).remote(*args, **kwargs)
        except Exception as exc:
            mapped = map_ray_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        self.last_replica = {"replica": reply["replica"], "pid": reply["pid"]}
        return reply["result"]

    async def acaption(self, image: Any, prompt: str | None = None, **gen: Any) -> CaptionResult:
        """Caption one image on some replica."""
        return CaptionResult.model_validate(await self._call("caption", image, prompt, **gen))

    async def aanswer(self, image: Any, question: str, **gen: Any) -> AnswerResult:
        """Answer a question about one image on some replica."""
        return AnswerResult.model_validate(await self._call("answer", image, question, **gen))

    async def ascore(self, image: Any, texts: Sequence[str]) -> ScoreResult:
        """Scores of texts against one image."""
        return ScoreResult.model_validate(await self._call("score", image, list(texts)))

    async def aembed_images(self, images: Sequence[Any]) -> list[EmbeddingResult | BlipError]:
        """Image embeddings (one replica call for the list); bad images give their error in place."""
        from .remote import error_from_text

        out: list[EmbeddingResult | BlipError] = []
        for item in await self._call("embed_images", list(images)):
            if "error" in item and "vector" not in item:
                out.append(error_from_text(f"[{item['error']['code']}] {item['error']['message']}"))
            else:
                out.append(EmbeddingResult.model_validate(item))
        return out

    async def aembed_texts(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        """Text embeddings."""
        return [EmbeddingResult.model_validate(r) for r in await self._call("embed_texts", list(texts))]

    async def astats(self) -> ServiceStats:
        """Counters of whichever replica answers (each replica counts its own)."""
        return ServiceStats.model_validate(await self._call("stats"))

    async def amodel_info(self) -> ModelInfo:
        """Model, device and limits of a replica."""
        return ModelInfo.model_validate(await self._call("model_info"))


__all__ = [
    "REFUSAL_LOG_INTERVAL_S",
    "Blip2Deployment",
    "RayServeClient",
    "RayServeConfig",
    "RefusalLogLimiter",
    "build_app",
    "limit_refusal_warnings",
    "map_ray_error",
    "proxy_address",
    "run",
]
