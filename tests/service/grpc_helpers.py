"""Starting a real service on a loopback port for a test, and calling it over a real channel."""

from __future__ import annotations

import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.server import Server


@contextlib.asynccontextmanager
async def running(server: Server, serving: bool = True):
    """Starts ``server``, marks it SERVING (as ``serve`` does after warm-up), yields an open channel."""
    await server.start()
    if serving:
        await server.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def expect_status(call, code: grpc.StatusCode, *fragments: str) -> str:
    """Awaits ``call`` and checks it fails with ``code`` and a message containing every fragment."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
        for fragment in fragments:
            assert fragment in err.details(), f"{fragment!r} not in {err.details()!r}"
        return err.details()
    raise AssertionError(f"the call succeeded; expected {code.name}")
