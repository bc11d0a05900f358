"""The bootstrap every service shares: grpc.aio server with the one interceptor (errors, metrics, tokens), TLS,
health, optional reflection, an optional HTTP app on the same event loop, a metrics port, message-size limits, and a
graceful SIGTERM (health NOT_SERVING, drain, stop with grace).

Each service provides ``build_server(config, backend) -> (server, port)``; ``serve()`` here runs one to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import Field

from shared.auth import AuthConfig, ServerAuth
from shared.config import StrictModel
from shared.errors import ErrorInterceptor, NotReady
from shared.http import HttpServer
from shared.worker import model_thread

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class ServerConfig(StrictModel):
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 in a container")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; unset = off")
    http_port: int | None = Field(
        None, ge=0, le=65535, description="REST port of the service's HTTP API, where it has one; unset = off"
    )
    reflection: bool = Field(True, description="serve gRPC server reflection (behind the token like every method)")
    max_message_bytes: int = Field(64 * MiB, ge=1024, description="largest gRPC message accepted or sent")
    grace_seconds: float = Field(10.0, ge=0, description="on SIGTERM, time for in-flight RPCs to finish")
    max_connection_age_s: float | None = Field(
        None,
        gt=0,
        description="close each client connection after this long (GOAWAY; RPCs in flight get "
        "max_connection_age_grace_s to finish), so that clients balancing over a headless Service resolve its "
        "name again and find pods added since; unset = connections live on",
    )
    max_connection_age_grace_s: float = Field(
        300.0, gt=0, description="time an RPC in flight on a connection closed for its age has to finish"
    )


class BackendHolder:
    """Mixin for servicers: the backend is attached once loaded; until then every RPC is UNAVAILABLE."""

    _backend = None

    @property
    def backend(self):
        if self._backend is None:
            raise NotReady("the model is still loading")
        return self._backend

    def attach(self, backend) -> None:
        self._backend = backend

    async def close(self) -> None:
        """Releases what the servicer started (queues, threads); called after the server stopped."""


@dataclass
class Server:
    """A built, not yet started, service: the grpc server, its bound port, health, and its servicers."""

    grpc_server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    servicers: tuple[BackendHolder, ...] = ()
    config: ServerConfig = field(default_factory=ServerConfig)
    auth: ServerAuth = field(default_factory=ServerAuth)
    http_app: object | None = None  # a FastAPI app served on config.http_port (when set) beside gRPC
    http: HttpServer | None = None
    http_port: int | None = None  # bound once started

    def attach(self, backend) -> None:
        for servicer in self.servicers:
            servicer.attach(backend)

    async def start(self) -> None:
        await self.grpc_server.start()
        if self.http_app is not None and self.config.http_port is not None:
            self.http = HttpServer(self.http_app, self.config.host, self.config.http_port, self.auth)
            self.http_port = await self.http.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in (*self.service_names, ""):
            await self.health.set(name, status)

    async def stop(self, grace: float | None) -> None:
        await self.set_serving(False)
        if self.http is not None:
            await self.http.stop()
        await self.grpc_server.stop(grace)
        for servicer in self.servicers:
            await servicer.close()


def grpc_options(max_message_bytes: int, config: ServerConfig | None = None) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if config is not None and config.max_connection_age_s is not None:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)),
        ]
    return options


async def build_grpc_server(
    config: ServerConfig,
    servicers: Iterable[tuple[BackendHolder, Callable[[BackendHolder, grpc.aio.Server], None], str]],
    backend=None,
    auth: AuthConfig | None = None,
) -> Server:
    """Creates the server with ``(servicer, add_XServicer_to_server, full service name)`` triples, health
    (NOT_SERVING) and reflection, and binds it (TLS and tokens from ``auth``). ``backend`` may be None and attached
    later (see ``serve``)."""
    servicers = list(servicers)
    service_names = tuple(name for _, _, name in servicers)
    server_auth = ServerAuth.load(auth or AuthConfig(), config.host, "gRPC server")
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(server_auth)], options=grpc_options(config.max_message_bytes, config)
    )
    for servicer, add_to_server, _ in servicers:
        add_to_server(servicer, server)
        if backend is not None:
            servicer.attach(backend)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
    address = f"{config.host}:{config.port}"
    credentials = server_auth.grpc_credentials()
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    built = Server(server, port, health_servicer, service_names, tuple(s for s, _, _ in servicers), config, server_auth)
    await built.set_serving(False)
    return built


async def serve(
    server: Server,
    load_backend: Callable[[], object],
    warm_up: Callable[[object], None] | None,
    grace_seconds: float,
    on_ready: Callable[[Server], None] | None = None,
    *,
    role: str,
) -> None:
    """Runs a built server to the end: listen (health NOT_SERVING), load the backend on ``role``'s model thread
    (``shared.worker.model_thread``, where its ModelWorker runs every later call), warm it up there,
    flip health to SERVING; on SIGTERM/SIGINT go NOT_SERVING, drain in-flight RPCs for ``grace_seconds``, stop.

    Listening before the model is loaded lets probes and clients see the service come up.
    """
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening on port %d; loading the model", server.port)
    # On the model thread, where every later torch call of the service runs (shared.worker says why).
    load = loop.run_in_executor(model_thread(role), load_backend)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if load.done():
        backend = load.result()
        if warm_up is not None:
            await loop.run_in_executor(model_thread(role), warm_up, backend)
        server.attach(backend)
        await server.set_serving(True)
        log.info("serving %s on port %d", ",".join(server.service_names), server.port)
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
    log.info("shutting down: health NOT_SERVING, draining for up to %.1f s", grace_seconds)
    await server.stop(grace_seconds)
    for task in (load, stopper):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    log.info("stopped")


@dataclass(frozen=True)
class Role:
    """What ``rlhf serve <role>`` needs to run a service: its config type and how to build, load and warm it."""

    name: str
    config_type: type[StrictModel]
    build_server: Callable[[StrictModel, object], Awaitable[tuple[Server, int]]]
    load_backend: Callable[[StrictModel], object]
    warm_up: Callable[[object], None]
    # Ranks > 0 of a torchrun group (the trainer only): load the backend and run rank 0's commands; they serve
    # nothing themselves.
    follow: Callable[[StrictModel], None] | None = None
