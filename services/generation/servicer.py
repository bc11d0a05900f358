"""Generation gRPC servicer: protobuf <-> domain only; sampling and weight swaps are the backend's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import torch

from services.generation import metrics as generation_metrics
from services.generation.backend import GenerationBackend, OnToken
from services.generation.config import GenerationConfig
from services.generation.tgi import tgi_app
from shared import codec, metrics
from shared.auth import ClientAuth
from shared.convert import conversations_from_pb
from shared.errors import Conflict, InvalidInput, NotReady
from shared.proto.rlhf.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    weights_pb2,
)
from shared.server import BackendHolder, Role, Server, build_grpc_server, grpc_options
from shared.types import FinishReason, Sample, SamplingParams
from shared.worker import ModelWorker

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name

_FINISH_TO_PB = {
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
}


def sampling_from_pb(message: generation_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=message.max_new_tokens,
        temperature=message.temperature,
        top_p=message.top_p or 1.0,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        samples_per_prompt=message.samples_per_prompt or 1,
    )


def samples_to_pb(samples: list[Sample], temperature: float) -> generation_pb2.GenerateResponse:
    """One model-thread call's samples: one weights (epoch, version) for the whole batch."""
    return generation_pb2.GenerateResponse(
        prompt_ids=codec.ragged_to_pb([s.prompt_ids for s in samples], torch.int64),
        response_ids=codec.ragged_to_pb([s.response_ids for s in samples], torch.int64),
        response_logprobs=codec.ragged_to_pb([s.response_logprobs for s in samples], torch.float32),
        texts=[s.text for s in samples],
        finish_reasons=[_FINISH_TO_PB[s.finish_reason] for s in samples],
        prompt_index=[s.prompt_index for s in samples],
        policy_version=samples[0].policy_version,
        policy_epoch=samples[0].policy_epoch,
        logprob_temperature=temperature,
    )


async def _as_asked(chunks: AsyncIterator[weights_pb2.WeightChunk], min_version: int, epoch: int):
    """Passes the chunks on, failing at the first one older than ``min_version`` or of another epoch than ``epoch``
    (when set): before anything is swapped in. Either means the trainer is not where the caller thinks (it
    restarted): FAILED_PRECONDITION, for the caller to look again."""
    async for chunk in chunks:
        if chunk.version < min_version:
            raise Conflict(f"min_version: trainer holds version {chunk.version} < {min_version}")
        if epoch and chunk.epoch != epoch:
            raise Conflict(f"epoch: trainer's weights are of epoch {chunk.epoch}, not {epoch} (it restarted)")
        yield chunk


def _trainer_error(address: str, err: grpc.aio.AioRpcError) -> Exception:
    """What the caller of PullWeights is told when the trainer failed it: down or slow is UNAVAILABLE (try again),
    a refused token is this service's configuration (FAILED_PRECONDITION), not the caller's."""
    detail = f"trainer {address}: {err.code().name}: {err.details()}"
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return NotReady(detail)
    if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return Conflict(f"{detail} (check this service's auth.peer_token_files.trainer and TLS)")
    return Conflict(detail)


class GenerationServicer(BackendHolder, generation_pb2_grpc.GenerationServicer):
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.worker = ModelWorker("generation")
        self._update_lock = asyncio.Lock()  # one weight update at a time
        self.client_auth = ClientAuth.load(config.auth)  # token and TLS for the trainer PullWeights dials
        metrics.register_role("generation", holds_weights=True)

    def attach(self, backend: GenerationBackend) -> None:
        super().attach(backend)
        metrics.track_device_memory("generation", backend.device)
        metrics.WEIGHTS_VERSION.labels("generation").set(backend.version)

    def _generate(self, prompts: list[torch.Tensor], params: SamplingParams) -> list[Sample]:
        """The backend's generate, timed on the model thread (queueing excluded) and recorded."""
        start = time.perf_counter()
        samples = self.backend.generate(prompts, params)
        generation_metrics.observe_generate(samples, time.perf_counter() - start)
        return samples

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        backend: GenerationBackend = self.backend
        params = sampling_from_pb(request.sampling)
        given = [bool(request.prompts), request.HasField("prompt_ids"), bool(request.conversations)]
        if sum(given) != 1:
            raise InvalidInput("prompts", "give exactly one of prompts (text), prompt_ids or conversations")
        if request.HasField("prompt_ids"):
            prompts = codec.ragged_from_pb(request.prompt_ids, "prompt_ids")
        elif request.conversations:
            prompts = backend.tokenize_conversations(conversations_from_pb(request.conversations, "conversations"))
        else:
            prompts = backend.tokenize(list(request.prompts))
        backend.validate(prompts, params)
        samples = await self.worker.run(self._generate, prompts, params)
        return samples_to_pb(samples, params.logprob_temperature)

    async def UpdateWeights(self, request_iterator: AsyncIterator[weights_pb2.WeightChunk], context):
        try:
            return await self._apply(request_iterator)
        except (InvalidInput, Conflict):
            # Read the rest of a refused update before answering: a client stream cut short while the client is
            # still sending can reach the client as INTERNAL ("Internal error from Core") instead of this status.
            async for _ in request_iterator:
                pass
            raise

    def _trainer_address(self, asked: str) -> str:
        """The configured trainer to pull from: a caller cannot make this service dial an address of its choice."""
        allowed = self.config.trainer_addresses
        if not allowed:
            raise InvalidInput("trainer_address", "this service has no trainer_addresses configured to pull from")
        if not asked:
            return allowed[0]
        if asked not in allowed:
            raise InvalidInput("trainer_address", f"{asked!r} is not one of the configured trainer_addresses")
        return asked

    async def PullWeights(self, request: generation_pb2.PullWeightsRequest, context: grpc.aio.ServicerContext):
        address = self._trainer_address(request.trainer_address)
        options = grpc_options(self.config.server.max_message_bytes)
        async with self.client_auth.open_channel(address, "trainer", options) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            chunk_bytes = max(1024, self.config.server.max_message_bytes // 2)
            stream = stub.StreamWeights(trainer_pb2.StreamWeightsRequest(chunk_bytes=chunk_bytes))
            try:
                return await self._apply(_as_asked(stream, request.min_version, request.epoch))
            except grpc.aio.AioRpcError as err:
                raise _trainer_error(address, err) from None

    async def _apply(self, chunks: AsyncIterator[weights_pb2.WeightChunk]) -> weights_pb2.WeightUpdateResult:
        backend: GenerationBackend = self.backend
        async with self._update_lock:
            start = time.perf_counter()
            assembler = backend.weight_assembler()
            async for chunk in chunks:
                assembler.add(chunk)
            # Tensors are made on the model thread, as every torch call of the service is (a second thread's
            # torch work gives torch a second OpenMP team, which slowed later model calls down; see the trainer).
            state = await self.worker.run(assembler.finish)
            await self.worker.run(
                backend.swap_weights, state, assembler.version, assembler.adapter_config, assembler.epoch
            )
            seconds = time.perf_counter() - start
            metrics.observe_weight_update("generation", assembler.bytes, seconds)
            metrics.WEIGHTS_VERSION.labels("generation").set(assembler.version)
            return weights_pb2.WeightUpdateResult(
                version=assembler.version,
                tensors=len(state),
                bytes=assembler.bytes,
                seconds=seconds,
                epoch=assembler.epoch,
            )

    async def Info(self, request, context):
        backend: GenerationBackend = self.backend
        return generation_pb2.ModelInfo(
            model=self.config.model.path,
            policy_version=backend.version,
            policy_epoch=backend.epoch,
            vocab_size=backend.vocab_size,
            eos_token_id=backend.eos_token_id,
            pad_token_id=backend.pad_token_id,
            dtype=str(next(backend.model.parameters()).dtype).removeprefix("torch."),
            device=str(backend.device),
            adapter_config=backend.adapter_config,
        )

    async def generate_one(
        self, prompt: torch.Tensor, params: SamplingParams, on_token: OnToken, prefill: bool = False
    ) -> tuple[Sample, torch.Tensor | None]:
        """One sample for the TGI-compatible REST API (``services.generation.tgi``, which validated the request), on
        the model thread as Generate runs, told token by token to ``on_token``; with ``prefill``, also the prompt
        tokens' log-probs (``backend.prefill_logprobs``) under the same weights."""
        backend: GenerationBackend = self.backend

        def run() -> tuple[Sample, torch.Tensor | None]:
            start = time.perf_counter()
            samples = backend.generate([prompt], params, on_token)
            generation_metrics.observe_generate(samples, time.perf_counter() - start)
            return samples[0], backend.prefill_logprobs(prompt) if prefill else None

        return await self.worker.run(run)


async def build_server(config: GenerationConfig, backend: GenerationBackend | None) -> tuple[Server, int]:
    """Binds the generation service (health NOT_SERVING); ``backend`` None means attach it later."""
    servicer = GenerationServicer(config)
    server = await build_grpc_server(
        config.server,
        [(servicer, generation_pb2_grpc.add_GenerationServicer_to_server, SERVICE_NAME)],
        backend,
        auth=config.auth,
    )
    server.http_app = tgi_app(servicer, server.auth)  # TGI's REST protocol, served when server.http_port is set
    return server, server.port


ROLE = Role("generation", GenerationConfig, build_server, GenerationBackend, GenerationBackend.warm_up)
