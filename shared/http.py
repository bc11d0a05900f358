"""HTTP beside gRPC: a FastAPI app served by uvicorn on the service's own event loop.

Running in the same loop as the grpc.aio server is what lets an HTTP request and a gRPC request meet in one
batching queue. Signals stay with the caller (``shared.server.serve`` or the orchestrator), not uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from shared.auth import ServerAuth, Unauthenticated, http_dependency, uvicorn_tls_options
from shared.errors import Conflict, NotReady, TooLarge

log = logging.getLogger(__name__)


def protected(server_auth: ServerAuth) -> list:
    """``dependencies=`` for every route that needs the token (all but health)."""
    return [Depends(http_dependency(server_auth))]


# The HTTP side of shared.errors' mapping: the same exceptions, the matching statuses.
_HTTP_STATUS = ((Unauthenticated, 401), (TooLarge, 413), (ValueError, 400), (NotReady, 503), (Conflict, 409))


def http_status_for(exc: BaseException) -> int:
    return next((status for kind, status in _HTTP_STATUS if isinstance(exc, kind)), 500)


def install_error_handlers(app: FastAPI) -> None:
    """Maps the project's exceptions raised in a route to HTTP statuses with ``{"error": message}`` (the field
    named in the message); anything else is a 500 that is logged."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status = http_status_for(exc)
        if status == 500:
            log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
            message = f"internal error: {type(exc).__name__}: {exc}"
        else:
            message = str(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    for kind, _ in _HTTP_STATUS:
        app.add_exception_handler(kind, handle)


class HttpServer:
    """uvicorn serving ``app`` on ``host:port`` (0 = a free port) with the TLS of ``server_auth``."""

    def __init__(self, app: FastAPI, host: str, port: int, server_auth: ServerAuth):
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="on", **uvicorn_tls_options(server_auth.tls)
        )
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # the caller owns SIGTERM
        self.host = host
        self.port: int | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                await self._task  # raises what stopped it (e.g. the port is taken)
                raise OSError(f"HTTP server on {self.host} stopped during start-up")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if self.server.config.ssl_certfile else "http"
        log.info("%s on %s://%s:%d", getattr(self.server.config.app, "title", "HTTP"), scheme, self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
