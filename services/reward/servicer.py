"""Reward gRPC servicer: protobuf <-> domain only."""

from __future__ import annotations

import time

import grpc
import torch

from services.reward.backend import RewardBackend, load_backend, validate_pairs, warm_up
from services.reward.config import RewardConfig
from shared import codec, metrics
from shared.convert import conversations_from_pb
from shared.errors import InvalidInput
from shared.proto.rlhf.v1 import reward_pb2, reward_pb2_grpc
from shared.server import BackendHolder, Role, Server, build_grpc_server
from shared.worker import BatchingQueue, ModelWorker

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name


class RewardServicer(BackendHolder, reward_pb2_grpc.RewardServicer):
    def __init__(self, config: RewardConfig):
        self.config = config
        # Concurrent requests (the loop, outside API clients) are merged into one model call.
        self.queue = BatchingQueue(ModelWorker("reward"), self._score, max_batch=config.max_batch)
        metrics.register_role("reward")

    def attach(self, backend: RewardBackend) -> None:
        super().attach(backend)
        metrics.track_device_memory("reward", backend.device)

    def _score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """One merged model call on the model thread, timed and recorded."""
        start = time.perf_counter()
        scores = self.backend.score(pairs)
        seconds = time.perf_counter() - start
        metrics.observe_model_call("reward", len(pairs), self.backend.count_tokens(pairs), seconds)
        return scores

    async def close(self) -> None:
        await self.queue.close()

    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        _ = self.backend  # UNAVAILABLE while the model is loading
        backend: RewardBackend = self.backend
        responses = list(request.responses)
        if request.prompts and request.conversations:
            raise InvalidInput("conversations", "give exactly one of prompts or conversations")
        if request.conversations:
            conversations = conversations_from_pb(request.conversations, "conversations")
            validate_pairs(conversations, responses, self.config.max_batch, "conversations")
            pairs = [
                backend.render(c, r, f"conversations[{i}]")
                for i, (c, r) in enumerate(zip(conversations, responses, strict=True))
            ]
        else:
            prompts = list(request.prompts)
            validate_pairs(prompts, responses, self.config.max_batch)
            pairs = list(zip(prompts, responses, strict=True))
        scores = await self.queue.submit(pairs)
        return reward_pb2.ScoreResponse(scores=codec.tensor_to_pb(torch.tensor(scores, dtype=torch.float32)))


async def build_server(config: RewardConfig, backend: RewardBackend | None) -> tuple[Server, int]:
    """Binds the reward service (health NOT_SERVING); ``backend`` None means attach it later."""
    servicer = RewardServicer(config)
    server = await build_grpc_server(
        config.server, [(servicer, reward_pb2_grpc.add_RewardServicer_to_server, SERVICE_NAME)], backend
    )
    return server, server.port


ROLE = Role("reward", RewardConfig, build_server, load_backend, warm_up)
