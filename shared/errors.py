"""Errors mapped to gRPC status codes in one place: the server interceptor below.

- ``InvalidInput`` (and any ``ValueError`` from validation) -> INVALID_ARGUMENT, message names the field;
- ``TooLarge`` -> RESOURCE_EXHAUSTED;
- ``NotReady`` -> UNAVAILABLE (model still loading, draining);
- ``Unauthenticated`` (no token, or a wrong one; ``shared.auth``) -> UNAUTHENTICATED;
- ``Conflict`` -> FAILED_PRECONDITION (e.g. a weight version older than the one served);
- anything else -> INTERNAL, logged with the method name and traceback. No exception kills the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from prometheus_client import Counter, Histogram

from shared.auth import Unauthenticated
from shared.logs import METADATA_ITERATION, METADATA_RUN_ID, log_context

log = logging.getLogger(__name__)


class InvalidInput(ValueError):
    """A request field is malformed or out of range."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class TooLarge(Exception):
    """A request asks for more than the server allows (tokens, batch, bytes)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotReady(Exception):
    """The service cannot take work yet (loading) or any more (draining)."""


class Conflict(Exception):
    """The request is well formed but contradicts the server's state."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, TooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotReady):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, Conflict):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


# Standard gRPC server metrics (the names go-grpc-prometheus made common), labelled by service/method/code.
GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"]
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC, seconds.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


class _Undecodable:
    """Stands in for a request message whose bytes do not parse, so the call can be answered INVALID_ARGUMENT after
    the token check (grpc itself would answer INTERNAL before any interceptor code runs)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return deserialize


def _decoded(request):
    if isinstance(request, _Undecodable):
        raise InvalidInput("request", f"the message does not parse: {request.error}")
    return request


async def _decoded_stream(requests: AsyncIterator) -> AsyncIterator:
    async for request in requests:
        yield _decoded(request)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one interceptor of every server: checks the caller's token (``server_auth``; health is open), answers
    unparseable messages INVALID_ARGUMENT, maps exceptions to status codes and records the standard server
    metrics, for every RPC."""

    def __init__(self, server_auth=None):
        self.server_auth = server_auth  # a shared.auth.ServerAuth; None = no token checked

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method  # "/rlhf.v1.Generation/Generate"
        service, _, method = full_method.lstrip("/").rpartition("/")
        deserialize = _lenient(handler.request_deserializer)
        serialize = handler.response_serializer
        kinds = (
            (handler.unary_unary, "unary", grpc.unary_unary_rpc_method_handler, _wrap_unary, False),
            (handler.stream_unary, "client_stream", grpc.stream_unary_rpc_method_handler, _wrap_unary, True),
            (handler.unary_stream, "server_stream", grpc.unary_stream_rpc_method_handler, _wrap_stream, False),
            (handler.stream_stream, "bidi_stream", grpc.stream_stream_rpc_method_handler, _wrap_stream, True),
        )
        for behavior, kind, make_handler, wrap, streamed in kinds:
            if behavior:
                wrapped = wrap(behavior, full_method, (kind, service, method), self.server_auth, streamed)
                return make_handler(wrapped, deserialize, serialize)
        return handler


async def _handle_error(exc: BaseException, context: grpc.aio.ServicerContext, full_method: str) -> grpc.StatusCode:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", full_method)
        message = f"internal error in {full_method}: {type(exc).__name__}: {exc}"
    else:
        log.info("%s rejected (%s): %s", full_method, code.name, exc)
        message = str(exc)
    context.set_code(code)
    context.set_details(message)
    return code


def _final_code(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _log_context(context: grpc.aio.ServicerContext):
    """The caller's run id and iteration (gRPC metadata) as this RPC's log context."""
    metadata = dict(context.invocation_metadata() or ())
    return log_context(metadata.get(METADATA_RUN_ID), metadata.get(METADATA_ITERATION))


def _admit(request, context, full_method: str, server_auth, streamed: bool):
    """The request as the handler should see it, once the token is checked: parse failures become InvalidInput."""
    if server_auth is not None:
        server_auth.check_grpc(full_method, context.invocation_metadata())
    return _decoded_stream(request) if streamed else _decoded(request)


def _wrap_unary(
    behavior: Callable[..., Awaitable], full_method: str, labels: tuple[str, str, str], server_auth, streamed: bool
):
    async def wrapper(request, context):
        GRPC_STARTED.labels(*labels).inc()
        start = time.perf_counter()
        try:
            with _log_context(context):
                request = _admit(request, context, full_method, server_auth, streamed)
                return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _handle_error(exc, context, full_method)
            return None
        finally:
            GRPC_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            GRPC_HANDLED.labels(*labels, _final_code(context)).inc()

    return wrapper


def _wrap_stream(
    behavior: Callable[..., AsyncIterator], full_method: str, labels: tuple[str, str, str], server_auth, streamed: bool
):
    async def wrapper(request, context):
        GRPC_STARTED.labels(*labels).inc()
        start = time.perf_counter()
        try:
            with _log_context(context):
                request = _admit(request, context, full_method, server_auth, streamed)
                async for item in behavior(request, context):
                    yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _handle_error(exc, context, full_method)
        finally:
            GRPC_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            GRPC_HANDLED.labels(*labels, _final_code(context)).inc()

    return wrapper
