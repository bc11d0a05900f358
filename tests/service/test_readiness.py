"""The control API's readiness (GET /readyz) and the last-progress gauge, over in-process clients whose reward
service answers only when the test lets it: a run that stalls, progresses, stalls again and ends."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.orchestrator.app import create_app
from services.orchestrator.config import OrchestratorConfig
from tests.helpers import tiny_inprocess_clients
from tests.service.test_orchestrator import _until_done

STALL_LIMIT_S = 1.0


class GatedReward:
    """The in-process reward client, each Score call waiting for a permit of ``gate``: the run stalls in its
    score phase until the test releases one."""

    def __init__(self, inner, gate: asyncio.Semaphore):
        self.inner = inner
        self.gate = gate

    async def score(self, rollouts):
        await self.gate.acquire()
        return await self.inner.score(rollouts)


@pytest.fixture
def gate():
    return asyncio.Semaphore(0)


@pytest.fixture
def gated_clients(tiny_policy_dir, gate):
    def factory():
        clients = tiny_inprocess_clients(tiny_policy_dir)
        return dataclasses.replace(clients, reward=GatedReward(clients.reward, gate))

    return factory


def last_progress(metrics_text: str, run_id: str) -> float:
    (family,) = [
        f for f in text_string_to_metric_families(metrics_text) if f.name == "rlhf_last_progress_timestamp_seconds"
    ]
    (value,) = [s.value for s in family.samples if s.labels == {"run_id": run_id}]
    return value


async def test_readyz_is_503_with_a_reason_while_an_active_run_stalls_and_200_while_it_progresses_or_ended(
    gated_clients, gate, tmp_path
):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat is", "the day was", "we", "she"]))
    config = OrchestratorConfig.model_validate(
        {
            "api": {"stall_limit_s": STALL_LIMIT_S},
            "run": {
                "dataset": str(dataset),
                "prompts_per_iteration": 4,
                "runs_dir": str(tmp_path),
                "sampling": {"max_new_tokens": 4},
            },
        }
    )
    transport = httpx.ASGITransport(app=create_app(config, gated_clients))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:

        async def readyz() -> tuple[int, dict]:
            reply = await client.get("/readyz")
            return reply.status_code, reply.json()

        async def past_the_limit() -> None:
            await asyncio.sleep(STALL_LIMIT_S + 0.3)

        assert await readyz() == (200, {"status": "ready"})  # no run
        started = time.time()
        assert (await client.post("/runs", json={"iterations": 2, "run_id": "gated"})).status_code == 201
        assert await readyz() == (200, {"status": "ready"})  # just started: within the limit

        await past_the_limit()  # iteration 1 waits for the reward service
        code, body = await readyz()
        assert code == 503 and body["status"] == "stalled", body
        assert body["reason"].startswith("run gated (running, 0 iterations done) has completed no iteration for ")
        assert "(api.stall_limit_s 1)" in body["reason"], body
        assert (await client.get("/healthz")).status_code == 200  # liveness does not follow the run
        stamp = last_progress((await client.get("/metrics")).text, "gated")
        assert started <= stamp <= time.time() - STALL_LIMIT_S  # the loop's start: no iteration yet

        released = time.time()
        gate.release()  # iteration 1 completes; iteration 2 waits for the reward service in turn
        while (await client.get("/runs/gated")).json()["iteration"] < 1:
            await asyncio.sleep(0.02)
        assert await readyz() == (200, {"status": "ready"})  # the iteration reset the clock
        assert released <= last_progress((await client.get("/metrics")).text, "gated") <= time.time()

        await past_the_limit()
        code, body = await readyz()
        assert code == 503 and body["reason"].startswith("run gated (running, 1 iterations done)"), body

        gate.release()
        assert (await _until_done(client, "gated"))["state"] == "completed"
        await past_the_limit()
        assert await readyz() == (200, {"status": "ready"})  # a finished run is not stalled
        metrics = (await client.get("/metrics")).text
        assert 'rlhf_run_state{run_id="gated",state="completed"} 1.0' in metrics
        assert 'rlhf_run_state{run_id="gated",state="running"} 0.0' in metrics
