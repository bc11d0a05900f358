"""The container health check (``python -m services.healthcheck``) against a real service on a loopback port."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

from services.healthcheck import main
from services.reward.servicer import ROLE, SERVICE_NAME
from tests.service.grpc_helpers import running

ROOT = Path(__file__).resolve().parents[2]


async def healthcheck(*argv: str) -> int:
    # The CLI is synchronous; the server runs on this event loop, so the check runs on a thread.
    return await asyncio.to_thread(main, list(argv))


async def reward_server():
    config = ROLE.config_type.model_validate({"function": "services.reward.functions:response_length"})
    server, _port = await ROLE.build_server(config, None)
    return server


async def test_exit_code_follows_health_from_loading_to_serving_to_draining():
    server = await reward_server()
    address = f"127.0.0.1:{server.port}"
    async with running(server, serving=False):
        assert await healthcheck(address) == 1  # listening, model still loading
        assert await healthcheck("--service", SERVICE_NAME, address) == 1
        await server.set_serving(True)
        assert await healthcheck(address) == 0
        assert await healthcheck("--service", SERVICE_NAME, address) == 0
        assert await healthcheck("--service", "rlhf.v1.NoSuchService", address) == 1  # NOT_FOUND
        await server.set_serving(False)  # what SIGTERM does before draining
        assert await healthcheck(address) == 1


async def test_module_entry_point_as_the_image_runs_it():
    server = await reward_server()
    address = f"127.0.0.1:{server.port}"
    command = [sys.executable, "-m", "services.healthcheck", "--service", SERVICE_NAME, address]
    async with running(server):
        process = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == f"{address} {SERVICE_NAME}: SERVING"


async def test_nothing_listening_is_unhealthy(capsys):
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert await healthcheck("--timeout", "2", f"127.0.0.1:{port}") == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
