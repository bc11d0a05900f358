"""How the loop talks to each role: one small interface, a gRPC implementation and an in-process one.

The loop never looks inside the token data: ``Rollouts.tokens`` is an opaque handle that the generation client
returns and the reference and trainer clients of the same kind consume. Over gRPC it is the Generate reply,
passed on as packed bytes without decoding (the orchestrator needs no torch); in process it is the backend's list
of ``Sample`` objects. The difference in speed between the two is the services' overhead.
"""

from __future__ import annotations

import array
import asyncio
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from services.orchestrator.config import PeersConfig, RpcConfig
from services.orchestrator.metrics import RPC_FAILURES, RPC_RETRIES
from shared.convert import train_stats_from_pb
from shared.logs import context_metadata
from shared.proto.rlhf.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    tensor_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
)
from shared.types import SamplingParams, TrainStats

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Rollouts:
    """One iteration's samples, as much as the loop itself needs to know."""

    prompts: list[str]  # per sample, its prompt text
    texts: list[str]  # per sample, the decoded response
    response_lengths: list[int]  # per sample, response tokens
    finish_reasons: list[str]  # per sample, "eos" or "length"
    policy_version: int  # version of the weights that produced them
    tokens: Any  # opaque: handed unchanged to the reference and trainer clients of the same kind


@dataclass
class WeightSync:
    version: int
    bytes: int  # payload bytes moved, summed over replicas
    seconds: float


class GenerationClient(Protocol):
    async def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts: ...
    async def sync_weights(self, version: int) -> WeightSync: ...


class RewardClient(Protocol):
    async def score(self, rollouts: Rollouts) -> list[float]: ...


class ReferenceClient(Protocol):
    async def logprobs(self, rollouts: Rollouts) -> Any: ...


class TrainerClient(Protocol):
    async def train_step(self, rollouts: Rollouts, scores: list[float], reference_logprobs: Any) -> TrainStats: ...
    async def save_checkpoint(self, directory: str) -> int: ...


@dataclass
class Clients:
    generation: GenerationClient
    reward: RewardClient
    reference: ReferenceClient
    trainer: TrainerClient
    close: Callable[[], Awaitable[None]] | None = None


# -- gRPC ------------------------------------------------------------------------------------------------------------


class Retrying:
    """Deadline on every call; retries with exponential backoff and jitter while the peer is UNAVAILABLE."""

    RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)

    def __init__(self, config: RpcConfig, peer: str):
        self.config = config
        self.peer = peer

    async def __call__(self, method: str, call: Callable[[float], Awaitable[T]], timeout: float) -> T:
        delay = self.config.initial_backoff_s
        retries = RPC_RETRIES.labels(self.peer, method)  # the series exists (at 0) from the first call
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                return await call(timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() not in self.RETRYABLE or attempt == self.config.max_attempts:
                    RPC_FAILURES.labels(self.peer, method, err.code().name).inc()
                    raise
                retries.inc()
                log.warning(
                    "%s.%s unavailable (attempt %d): %s; retrying in %.1fs",
                    self.peer,
                    method,
                    attempt,
                    err.details(),
                    delay,
                )
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.config.max_backoff_s)
        raise AssertionError("unreachable")


def _channel(address: str, peers: PeersConfig) -> grpc.aio.Channel:
    options = [
        ("grpc.max_send_message_length", peers.max_message_bytes),
        ("grpc.max_receive_message_length", peers.max_message_bytes),
    ]
    return grpc.aio.insecure_channel(address, options=options)


def _floats(tensor: tensor_pb2.Tensor) -> list[float]:
    """float32 scores from packed little-endian bytes, without torch."""
    if tensor.dtype != tensor_pb2.DTYPE_FLOAT32:
        raise ValueError(f"expected float32 scores, got {tensor_pb2.DType.Name(tensor.dtype)}")
    values = array.array("f")
    values.frombytes(tensor.data)
    if sys.byteorder != "little":  # pragma: no cover
        values.byteswap()
    return values.tolist()


def _row_lengths(ragged: tensor_pb2.RaggedTensor) -> list[int]:
    offsets = array.array("q")
    offsets.frombytes(ragged.offsets.data)
    return [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]


_FINISH = {generation_pb2.FINISH_REASON_EOS: "eos", generation_pb2.FINISH_REASON_LENGTH: "length"}


class GrpcGeneration:
    def __init__(self, peers: PeersConfig, rpc: RpcConfig):
        if not peers.generation:
            raise ValueError("peers.generation: at least one generation replica address is required")
        self.rpc = rpc
        self.trainer_address = peers.trainer
        self.channels = [_channel(address, peers) for address in peers.generation]
        self.stubs = [generation_pb2_grpc.GenerationStub(c) for c in self.channels]
        self.retry = Retrying(rpc, "generation")

    async def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        # Split the prompts across replicas (contiguous shares), one call each, concurrently.
        shares = _split(prompts, len(self.stubs))
        sampling = generation_pb2.SamplingParams(
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            samples_per_prompt=params.samples_per_prompt,
        )
        if params.seed is not None:
            sampling.seed = params.seed

        async def one(stub, share, index):
            if params.seed is not None:
                sampling_i = generation_pb2.SamplingParams()
                sampling_i.CopyFrom(sampling)
                sampling_i.seed = params.seed + index
            else:
                sampling_i = sampling
            request = generation_pb2.GenerateRequest(prompts=share, sampling=sampling_i)
            return await self.retry(
                "Generate",
                lambda t: stub.Generate(request, timeout=t, metadata=context_metadata()),
                self.rpc.generate_timeout_s,
            )

        replies = await asyncio.gather(
            *[one(stub, share, i) for i, (stub, share) in enumerate(zip(self.stubs, shares, strict=True)) if share]
        )
        versions = {r.policy_version for r in replies}
        if len(versions) != 1:
            raise RuntimeError(f"generation replicas serve different policy versions: {sorted(versions)}")
        merged = _merge_generate_replies(list(replies))
        share_prompts = [p for share in shares if share for p in share]
        return Rollouts(
            prompts=[share_prompts[i] for i in merged.prompt_index],
            texts=list(merged.texts),
            response_lengths=_row_lengths(merged.response_ids),
            finish_reasons=[_FINISH.get(f, "unspecified") for f in merged.finish_reasons],
            policy_version=merged.policy_version,
            tokens=merged,
        )

    async def sync_weights(self, version: int) -> WeightSync:
        start = time.perf_counter()
        request = generation_pb2.PullWeightsRequest(trainer_address=self.trainer_address, min_version=version)
        results = await asyncio.gather(
            *[
                self.retry(
                    "PullWeights",
                    lambda t, s=stub: s.PullWeights(request, timeout=t, metadata=context_metadata()),
                    self.rpc.weights_timeout_s,
                )
                for stub in self.stubs
            ]
        )
        return WeightSync(
            version=min(r.version for r in results),
            bytes=sum(r.bytes for r in results),
            seconds=time.perf_counter() - start,
        )


def _split(items: list[str], parts: int) -> list[list[str]]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _merge_ragged(parts: list[tensor_pb2.RaggedTensor]) -> tensor_pb2.RaggedTensor:
    """Concatenates ragged tensors of one dtype by their bytes: values appended, offsets shifted."""
    if len(parts) == 1:
        return parts[0]
    offsets = array.array("q", [0])
    data = bytearray()
    for part in parts:
        base = offsets[-1]
        own = array.array("q")
        own.frombytes(part.offsets.data)
        offsets.extend(base + o for o in own[1:])
        data += part.values.data
    values = tensor_pb2.Tensor(dtype=parts[0].values.dtype, shape=[offsets[-1]], data=bytes(data))
    return tensor_pb2.RaggedTensor(
        values=values,
        offsets=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[len(offsets)], data=offsets.tobytes()),
    )


def _merge_generate_replies(
    replies: list[generation_pb2.GenerateResponse],
) -> generation_pb2.GenerateResponse:
    if len(replies) == 1:
        return replies[0]
    merged = generation_pb2.GenerateResponse(policy_version=replies[0].policy_version)
    base = 0
    for reply in replies:
        merged.texts.extend(reply.texts)
        merged.finish_reasons.extend(reply.finish_reasons)
        merged.prompt_index.extend(base + i for i in reply.prompt_index)
        base += (max(reply.prompt_index) + 1) if reply.prompt_index else 0
    for name in ("prompt_ids", "response_ids", "response_logprobs"):
        getattr(merged, name).CopyFrom(_merge_ragged([getattr(r, name) for r in replies]))
    return merged


class GrpcReward:
    def __init__(self, peers: PeersConfig, rpc: RpcConfig):
        self.rpc = rpc
        self.channel = _channel(peers.reward, peers)
        self.stub = reward_pb2_grpc.RewardStub(self.channel)
        self.retry = Retrying(rpc, "reward")

    async def score(self, rollouts: Rollouts) -> list[float]:
        request = reward_pb2.ScoreRequest(prompts=rollouts.prompts, responses=rollouts.texts)
        reply = await self.retry(
            "Score",
            lambda t: self.stub.Score(request, timeout=t, metadata=context_metadata()),
            self.rpc.score_timeout_s,
        )
        return _floats(reply.scores)


class GrpcReference:
    def __init__(self, peers: PeersConfig, rpc: RpcConfig):
        self.rpc = rpc
        self.channel = _channel(peers.reference, peers)
        self.stub = reference_pb2_grpc.ReferenceStub(self.channel)
        self.retry = Retrying(rpc, "reference")

    async def logprobs(self, rollouts: Rollouts) -> tensor_pb2.RaggedTensor:
        reply_in: generation_pb2.GenerateResponse = rollouts.tokens
        request = reference_pb2.LogProbsRequest(prompt_ids=reply_in.prompt_ids, response_ids=reply_in.response_ids)
        reply = await self.retry(
            "LogProbs",
            lambda t: self.stub.LogProbs(request, timeout=t, metadata=context_metadata()),
            self.rpc.logprobs_timeout_s,
        )
        return reply.logprobs


class GrpcTrainer:
    def __init__(self, peers: PeersConfig, rpc: RpcConfig):
        self.rpc = rpc
        self.channel = _channel(peers.trainer, peers)
        self.stub = trainer_pb2_grpc.TrainerStub(self.channel)
        self.retry = Retrying(rpc, "trainer")

    async def train_step(self, rollouts: Rollouts, scores: list[float], reference_logprobs) -> TrainStats:
        generated: generation_pb2.GenerateResponse = rollouts.tokens
        request = trainer_pb2.TrainStepRequest(
            prompt_ids=generated.prompt_ids,
            response_ids=generated.response_ids,
            scores=tensor_pb2.Tensor(
                dtype=tensor_pb2.DTYPE_FLOAT32, shape=[len(scores)], data=array.array("f", scores).tobytes()
            ),
            reference_logprobs=reference_logprobs,
            generation_logprobs=generated.response_logprobs,
            policy_version=generated.policy_version,
        )
        reply = await self.retry(
            "TrainStep",
            lambda t: self.stub.TrainStep(request, timeout=t, metadata=context_metadata()),
            self.rpc.train_timeout_s,
        )
        return train_stats_from_pb(reply.stats)

    async def save_checkpoint(self, directory: str) -> int:
        request = trainer_pb2.CheckpointRequest(directory=directory)
        reply = await self.retry(
            "SaveCheckpoint",
            lambda t: self.stub.SaveCheckpoint(request, timeout=t, metadata=context_metadata()),
            self.rpc.train_timeout_s,
        )
        return reply.policy_version


async def wait_until_serving(peers: PeersConfig, timeout: float) -> None:
    """Polls each peer's grpc.health.v1 until it reports SERVING (or raises TimeoutError naming the laggards)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    addresses = {*peers.generation, peers.reward, peers.reference, peers.trainer}
    deadline = time.monotonic() + timeout
    pending = set(addresses)
    while pending:
        for address in list(pending):
            async with _channel(address, peers) as channel:
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.discard(address)
                except grpc.aio.AioRpcError:
                    pass
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"peers not SERVING after {timeout:.0f}s: {sorted(pending)}")
            await asyncio.sleep(0.5)


def grpc_clients(peers: PeersConfig, rpc: RpcConfig) -> Clients:
    for role in ("reward", "reference", "trainer"):
        if not getattr(peers, role):
            raise ValueError(f"peers.{role}: address required")
    generation = GrpcGeneration(peers, rpc)
    reward, reference, trainer = GrpcReward(peers, rpc), GrpcReference(peers, rpc), GrpcTrainer(peers, rpc)

    async def close() -> None:
        for channel in (*generation.channels, reward.channel, reference.channel, trainer.channel):
            await channel.close()

    return Clients(generation, reward, reference, trainer, close)
