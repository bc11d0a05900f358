"""Reference gRPC servicer: protobuf <-> domain only; the model work is the backend's."""

from __future__ import annotations

import time

import grpc
import torch

from services.reference.backend import ReferenceBackend
from services.reference.config import ReferenceBackendKind, ReferenceConfig
from services.reference.tgi import TgiReferenceBackend
from shared import codec, metrics
from shared.proto.rlhf.v1 import reference_pb2, reference_pb2_grpc
from shared.server import BackendHolder, Role, Server, build_grpc_server
from shared.worker import BatchingQueue, ModelWorker

SERVICE_NAME = reference_pb2.DESCRIPTOR.services_by_name["Reference"].full_name


class ReferenceServicer(BackendHolder, reference_pb2_grpc.ReferenceServicer):
    def __init__(self, config: ReferenceConfig):
        # Concurrent requests are merged into one model call, micro-batched by the backend.
        self.queue = BatchingQueue(ModelWorker("reference"), self._logprobs, max_batch=config.max_batch)
        metrics.register_role("reference")

    def attach(self, backend: ReferenceBackend) -> None:
        super().attach(backend)
        metrics.track_device_memory("reference", backend.device)

    def _logprobs(self, items: list[tuple[torch.Tensor, torch.Tensor, float]]) -> list[torch.Tensor]:
        """One merged model call on the model thread (one per temperature among the merged requests), timed and
        recorded. ``items`` are (prompt_ids, response_ids, temperature)."""
        start = time.perf_counter()
        logprobs: list[torch.Tensor | None] = [None] * len(items)
        for temperature in sorted({t for _, _, t in items}):
            rows = [i for i, item in enumerate(items) if item[2] == temperature]
            pairs = [(items[i][0], items[i][1]) for i in rows]
            for i, values in zip(rows, self.backend.logprobs(pairs, temperature), strict=True):
                logprobs[i] = values
        tokens = sum(int(prompt.numel() + response.numel()) for prompt, response, _ in items)
        metrics.observe_model_call("reference", len(pairs), tokens, time.perf_counter() - start)
        return logprobs

    async def close(self) -> None:
        await self.queue.close()

    async def LogProbs(self, request: reference_pb2.LogProbsRequest, context: grpc.aio.ServicerContext):
        backend: ReferenceBackend = self.backend  # UNAVAILABLE while the model is loading
        prompt_ids = codec.ragged_from_pb(request.prompt_ids, "prompt_ids")
        response_ids = codec.ragged_from_pb(request.response_ids, "response_ids")
        temperature = request.temperature or 1.0
        backend.validate(prompt_ids, response_ids, temperature)
        logprobs = await self.queue.submit([(p, r, temperature) for p, r in zip(prompt_ids, response_ids, strict=True)])
        return reference_pb2.LogProbsResponse(logprobs=codec.ragged_to_pb(logprobs, torch.float32))


async def build_server(config: ReferenceConfig, backend: ReferenceBackend | None) -> tuple[Server, int]:
    """Binds the reference service (health NOT_SERVING); ``backend`` None means attach it later."""
    servicer = ReferenceServicer(config)
    server = await build_grpc_server(
        config.server,
        [(servicer, reference_pb2_grpc.add_ReferenceServicer_to_server, SERVICE_NAME)],
        backend,
        auth=config.auth,
    )
    return server, server.port


def load_backend(config: ReferenceConfig) -> ReferenceBackend | TgiReferenceBackend:
    """The backend ``config.backend`` names."""
    return TgiReferenceBackend(config) if config.backend is ReferenceBackendKind.TGI else ReferenceBackend(config)


ROLE = Role("reference", ReferenceConfig, build_server, load_backend, lambda backend: backend.warm_up())
