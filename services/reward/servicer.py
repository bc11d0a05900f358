"""Reward gRPC servicer: protobuf <-> domain only; the scorer (``services.reward.scoring``) does the rest."""

from __future__ import annotations

import grpc

from services.reward.backend import RewardBackend, load_backend, warm_up
from services.reward.config import RewardConfig
from services.reward.http import build_app
from services.reward.scoring import RewardScorer, ScoreQuery
from shared.proto.rlhf.v1 import reward_pb2, reward_pb2_grpc
from shared.server import Role, Server, build_grpc_server

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name


class RewardServicer(reward_pb2_grpc.RewardServicer):
    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer

    def attach(self, backend: RewardBackend) -> None:
        self.scorer.attach(backend)

    async def close(self) -> None:
        await self.scorer.close()

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        result = await self.scorer.score(ScoreQuery.from_pb(request))
        return reward_pb2.ScoreResponse(scores=result.scores)


async def build_server(config: RewardConfig, backend: RewardBackend | None) -> tuple[Server, int]:
    """Binds the reward service (health NOT_SERVING), with its REST API when ``server.http_port`` is set (served on
    the same event loop, through the same scorer); ``backend`` None means attach it later."""
    scorer = RewardScorer(config)
    server = await build_grpc_server(
        config.server,
        [(RewardServicer(scorer), reward_pb2_grpc.add_RewardServicer_to_server, SERVICE_NAME)],
        backend,
        auth=config.auth,
    )
    server.http_app = build_app(scorer, server.auth)
    return server, server.port


ROLE = Role("reward", RewardConfig, build_server, load_backend, warm_up)
