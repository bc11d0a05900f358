"""Graceful shutdown of a real service process: SIGTERM drains the call in flight, then the process exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher import Launcher
from shared.proto.rlhf.v1 import reward_pb2, reward_pb2_grpc

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


async def test_sigterm_drains_the_call_in_flight_and_exits_zero(tmp_path):
    config = {
        "server": {"port": 0, "metrics_port": 0, "grace_seconds": 10},
        "function": "tests.e2e.slow_reward:slow_length",
    }
    with Launcher(tmp_path, env={"PYTHONPATH": str(ROOT)}) as launcher:
        service = launcher.start("reward", ["serve", "reward"], config)
        info = await asyncio.to_thread(service.wait_ready, 60)
        assert info["metrics_port"] > 0
        async with grpc.aio.insecure_channel(service.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            request = reward_pb2.ScoreRequest(prompts=["p", "q"], responses=["abc", "de"])
            call = asyncio.ensure_future(reward_pb2_grpc.RewardStub(channel).Score(request, timeout=30))
            await asyncio.sleep(0.5)  # the call is now inside the slow function
            service.process.send_signal(signal.SIGTERM)
            reply = await call
        assert list(reply.scores) == [3.0, 2.0]
        code = await asyncio.to_thread(service.process.wait, 20)
        assert code == 0
        log = service.log_path.read_text()
        assert "NOT_SERVING" in log and "stopped" in log
