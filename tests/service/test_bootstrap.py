"""What every service shares, checked for each role: reflection, health before the model is loaded, UNAVAILABLE
while loading, and the metrics port."""

from __future__ import annotations

import importlib

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.cli import ROLE_MODULES
from shared.proto.rlhf.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.service.grpc_helpers import expect_status, health_status, running

FIRST_CALL = {
    "generation": lambda ch: generation_pb2_grpc.GenerationStub(ch).Info(generation_pb2.InfoRequest(), timeout=5),
    "reward": lambda ch: reward_pb2_grpc.RewardStub(ch).Score(reward_pb2.ScoreRequest(), timeout=5),
    "reference": lambda ch: reference_pb2_grpc.ReferenceStub(ch).LogProbs(reference_pb2.LogProbsRequest(), timeout=5),
    "trainer": lambda ch: trainer_pb2_grpc.TrainerStub(ch).GetState(trainer_pb2.GetStateRequest(), timeout=5),
}


@pytest.mark.parametrize("role_name", sorted(ROLE_MODULES))
async def test_role_serves_reflection_and_is_not_serving_until_loaded(role_name):
    module = importlib.import_module(ROLE_MODULES[role_name])
    role = module.ROLE
    overrides = {"function": "services.reward.functions:response_length"} if role_name == "reward" else {}
    config = role.config_type.model_validate(overrides)
    server, port = await role.build_server(config, None)
    assert port > 0
    async with running(server, serving=False) as channel:
        assert await health_status(channel, module.SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        await expect_status(FIRST_CALL[role_name](channel), grpc.StatusCode.UNAVAILABLE, "loading")

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for response in stub.ServerReflectionInfo(requests(), timeout=5):
            names = {s.name for s in response.list_services_response.service}
    assert {module.SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert f"rlhf.v1.{role_name.capitalize()}" == module.SERVICE_NAME
