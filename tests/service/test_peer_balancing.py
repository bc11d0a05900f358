"""Client-side balancing of the orchestrator's channels (``peers.lb_policy``) and the servers' connection age
(``server.max_connection_age_s``): what makes extra reward pods behind a headless Service take training traffic.

In a cluster the orchestrator dials ``dns:///reward-pods:50052``: the headless Service's name resolves to every
ready pod. No DNS server for that runs here, so the several addresses come from gRPC's own ``ipv4:`` resolver (one
name, three addresses: what the DNS answer would be); the balancing policy over them is the same code path.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from services.orchestrator.clients import _channel
from services.orchestrator.config import PeersConfig
from shared.server import ServerConfig, build_grpc_server


class CountingHealth(health_aio.HealthServicer):
    def __init__(self):
        super().__init__()
        self.calls = 0

    async def Check(self, request, context):
        self.calls += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _servers(n: int) -> tuple[list[grpc.aio.Server], list[CountingHealth], list[int]]:
    servers, servicers, ports = [], [], []
    for _ in range(n):
        server, servicer = grpc.aio.server(), CountingHealth()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
        servicers.append(servicer)
    return servers, servicers, ports


async def _calls_per_server(lb_policy: str, calls: int = 30) -> list[int]:
    servers, servicers, ports = await _servers(3)
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        peers = PeersConfig(lb_policy=lb_policy)
        async with _channel(target, peers, "reward", None) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(calls):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return [s.calls for s in servicers]
    finally:
        for server in servers:
            await server.stop(None)


def test_round_robin_spreads_the_calls_over_every_address_of_the_name():
    counts = asyncio.run(_calls_per_server("round_robin"))
    assert sum(counts) == 30 and min(counts) >= 8, counts  # 10 each, give or take a subchannel still connecting


def test_pick_first_sends_every_call_to_one_address():
    counts = sorted(asyncio.run(_calls_per_server("pick_first")))
    assert counts == [0, 0, 30]


async def _reconnections(max_age: float | None, seconds: float = 2.5) -> int:
    """Times the client's channel went back to READY while it kept calling a server of that connection age."""
    config = ServerConfig(host="127.0.0.1", port=0, max_connection_age_s=max_age, max_connection_age_grace_s=1)
    server = await build_grpc_server(config, [])
    await server.start()
    await server.set_serving(True)
    try:
        async with _channel(f"127.0.0.1:{server.port}", PeersConfig(), "health", None) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            readies, state = 0, channel.get_state()

            async def watch():
                nonlocal readies, state
                while True:
                    await channel.wait_for_state_change(state)
                    state = channel.get_state()
                    readies += state is grpc.ChannelConnectivity.READY

            watcher = asyncio.create_task(watch())
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # every call succeeds
                await asyncio.sleep(0.05)
            watcher.cancel()
            return readies
    finally:
        await server.stop(None)


def test_a_maximum_connection_age_makes_clients_reconnect_and_so_resolve_again():
    """With server.max_connection_age_s the server closes each connection after that age (GOAWAY): the client
    reconnects, which is when gRPC's DNS resolver looks the name up again and finds pods added since. Every call
    succeeds throughout; without an age the one connection lives on."""
    assert asyncio.run(_reconnections(0.5)) >= 2
    assert asyncio.run(_reconnections(None)) == 0
