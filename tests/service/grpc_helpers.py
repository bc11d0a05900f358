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


@contextlib.asynccontextmanager
async def synced_replicas(trainer, trainer_config, generation_config, pushed, pulled, chunk_bytes: int, version: int):
    """A trainer service and two generation services on loopback: ``pushed`` gets the trainer's stream through
    UpdateWeights (in ``chunk_bytes`` chunks), ``pulled`` pulls it itself (PullWeights, ``min_version``=version).
    Yields (push result, pull result, a Generation stub of the pulled replica) while the servers run."""
    from services.generation.servicer import build_server as build_generation_server
    from services.trainer.servicer import build_server as build_trainer_server
    from shared.proto.rlhf.v1 import generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc

    trainer_server, trainer_port = await build_trainer_server(trainer_config, trainer)
    generation_config = generation_config.model_copy(update={"trainer_addresses": [f"127.0.0.1:{trainer_port}"]})
    push_server, _ = await build_generation_server(generation_config, pushed)
    pull_server, _ = await build_generation_server(generation_config, pulled)
    async with (
        running(trainer_server) as trainer_channel,
        running(push_server) as push_channel,
        running(pull_server) as pull_channel,
    ):
        stream = trainer_pb2_grpc.TrainerStub(trainer_channel).StreamWeights(
            trainer_pb2.StreamWeightsRequest(chunk_bytes=chunk_bytes), timeout=30
        )
        chunks = [chunk async for chunk in stream]
        push = await generation_pb2_grpc.GenerationStub(push_channel).UpdateWeights(iter(chunks), timeout=30)
        pull_stub = generation_pb2_grpc.GenerationStub(pull_channel)
        pull = await pull_stub.PullWeights(
            generation_pb2.PullWeightsRequest(min_version=version),  # from the configured trainer
            timeout=30,
        )
        yield push, pull, pull_stub
