"""How the loop talks to each role: one small interface, a gRPC implementation and an in-process one.

The loop never looks inside the token data: ``Rollouts.tokens`` is an opaque handle that the generation client
returns and the reference and trainer clients of the same kind consume. Over gRPC it is the Generate reply,
passed on as packed bytes without decoding (the orchestrator needs no torch); in process it is the backend's list
of ``Sample`` objects. The difference in speed between the two is the services' overhead.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from services.orchestrator.config import DiscoveryMode, PeersConfig, RpcConfig
from services.orchestrator.dataset import Prompt
from services.orchestrator.metrics import GENERATION_RESHARES, RPC_FAILURES, RPC_RETRIES, WAITING, waiting
from services.orchestrator.replicas import Replica, ReplicaPool, replica_source, same_weights
from shared.auth import ClientAuth
from shared.convert import conversations_to_pb, train_stats_from_pb
from shared.logs import context_metadata
from shared.proto.rlhf.v1 import (
    generation_pb2,
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

RESEND_LIMIT = 20  # sends of one share of a batch before the batch fails (each waits for a usable replica)


@dataclass
class Rollouts:
    """One iteration's samples, as much as the loop itself needs to know."""

    prompts: list[Prompt]  # per sample, its prompt: text, or a conversation (list of {role, content})
    texts: list[str]  # per sample, the decoded response
    response_lengths: list[int]  # per sample, response tokens
    finish_reasons: list[str]  # per sample, "eos" or "length"
    policy_version: int  # version of the weights that produced them
    tokens: Any  # opaque: handed unchanged to the reference and trainer clients of the same kind
    temperature: float = 1.0  # T of every log-prob of these samples: log softmax(logits / T) (1 for greedy)
    policy_epoch: int = 0  # epoch of those weights (the trainer's incarnation; 0 = as loaded)


@dataclass
class WeightSync:
    version: int
    bytes: int  # payload bytes moved, summed over replicas
    seconds: float
    epoch: int = 0


@dataclass
class StepResult:
    stats: TrainStats
    replayed: bool  # the trainer had applied this (run, iteration) before: its stored statistics
    checkpoint: str  # checkpoint directory the trainer wrote after the step ("" = none)


@dataclass
class TrainerPosition:
    """Where the trainer's state is: its incarnation, its weights' version, the key of its last step, and the
    newest checkpoint under its root (the key of that checkpoint's last step)."""

    epoch: int
    version: int
    run_id: str
    iteration: int
    checkpoint: str = ""
    checkpoint_run_id: str = ""
    checkpoint_iteration: int = 0

    def iteration_of(self, run_id: str) -> int:
        """The last iteration of ``run_id`` the trainer's state includes (0: none, or another run's state)."""
        return self.iteration if self.run_id == run_id else 0


class StepConflict(RuntimeError):
    """The trainer refused a step that does not follow its state (it went back to an older checkpoint)."""


class GenerationClient(Protocol):
    async def generate(self, prompts: list[Prompt], params: SamplingParams, wait_s: float | None = None) -> Rollouts:
        """Samples; waits up to ``wait_s`` (default: the outage budget) for a replica serving the synced weights,
        then raises ``NoReplicaError``."""

    async def sync_weights(self, version: int, epoch: int = 0) -> WeightSync: ...


class RewardClient(Protocol):
    async def score(self, rollouts: Rollouts) -> list[float]: ...


class ReferenceClient(Protocol):
    async def logprobs(self, rollouts: Rollouts) -> Any: ...


class TrainerClient(Protocol):
    def prepare_step(
        self,
        rollouts: Rollouts,
        scores: list[float],
        reference_logprobs: Any,
        run_id: str,
        iteration: int,
        checkpoint: bool = False,
    ) -> bytes:
        """The step's request, serialized (a ``TrainStepRequest``): stored before it is sent, so that it can be
        sent again after any process dies."""

    async def train_step(self, step: bytes) -> StepResult:
        """Applies a prepared step once (a retry of an applied one returns its stored result); raises
        ``StepConflict`` when it does not follow the trainer's state."""

    async def get_state(self) -> TrainerPosition: ...
    async def save_checkpoint(self, name: str) -> str:
        """Saves the trainer's state as ``name`` under its checkpoint root; returns the directory written."""


@dataclass
class Clients:
    generation: GenerationClient
    reward: RewardClient
    reference: ReferenceClient
    trainer: TrainerClient
    close: Callable[[], Awaitable[None]] | None = None


# -- gRPC ------------------------------------------------------------------------------------------------------------


class Retrying:
    """Deadline on every call; while the peer is down (UNAVAILABLE) or too slow (DEADLINE_EXCEEDED), retries with
    exponential backoff and jitter for up to ``rpc.outage_budget_s``, with ``rlhf_waiting_for_peer{peer}`` at 1
    and a warning naming the peer. Other errors are raised at once (a bad request stays bad)."""

    RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def __init__(self, config: RpcConfig, peer: str):
        self.config = config
        self.peer = peer

    async def __call__(self, method: str, call: Callable[[float], Awaitable[T]], timeout: float) -> T:
        delay = self.config.initial_backoff_s
        retries = RPC_RETRIES.labels(self.peer, method)  # the series exists (at 0) from the first call
        WAITING.labels(self.peer)
        started = time.monotonic()
        attempt = 0
        wait = contextlib.ExitStack()
        with wait:
            while True:
                attempt += 1
                try:
                    return await call(timeout)
                except grpc.aio.AioRpcError as err:
                    waited = time.monotonic() - started
                    if err.code() not in self.RETRYABLE or waited + delay > self.config.outage_budget_s:
                        RPC_FAILURES.labels(self.peer, method, err.code().name).inc()
                        if err.code() in self.RETRYABLE:
                            log.error(
                                "%s.%s: %s for %.0fs, past the outage budget (rpc.outage_budget_s %.0fs)",
                                self.peer,
                                method,
                                err.code().name,
                                waited,
                                self.config.outage_budget_s,
                            )
                        raise
                    retries.inc()
                    if attempt == 1:
                        wait.enter_context(waiting(self.peer))
                    log.warning(
                        "waiting for %s: %s.%s %s (attempt %d, %.0fs so far): %s; retrying in %.1fs",
                        self.peer,
                        self.peer,
                        method,
                        err.code().name,
                        attempt,
                        waited,
                        err.details(),
                        delay,
                    )
                    await asyncio.sleep(delay * (0.5 + random.random() / 2))
                    delay = min(delay * 2, self.config.max_backoff_s)


def _channel(address: str, peers: PeersConfig, role: str, auth: ClientAuth | None) -> grpc.aio.Channel:
    """A channel to ``role``'s service: its token on every call, TLS when configured (``shared.auth``)."""
    options = [
        ("grpc.max_send_message_length", peers.max_message_bytes),
        ("grpc.max_receive_message_length", peers.max_message_bytes),
        ("grpc.lb_policy_name", peers.lb_policy),
    ]
    return (auth or ClientAuth()).open_channel(address, role, options)


def _row_lengths(ragged: tensor_pb2.RaggedTensor) -> list[int]:
    offsets = array.array("q")
    offsets.frombytes(ragged.offsets.data)
    return [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]


_FINISH = {generation_pb2.FINISH_REASON_EOS: "eos", generation_pb2.FINISH_REASON_LENGTH: "length"}


class GrpcGeneration:
    """Generation over the replicas of a ``ReplicaPool``: each batch is split across the replicas serving the
    current policy version, and a share whose replica fails, leaves or answers with another version is re-sent to
    the others, so every prompt is generated exactly once, by the current policy."""

    # A call that fails with one of these says the replica is down, gone or stuck, not that the request is bad.
    REPLICA_FAULTS = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

    def __init__(self, peers: PeersConfig, rpc: RpcConfig, auth: ClientAuth | None = None):
        self.peers = peers
        self.rpc = rpc
        self.auth = auth
        self.pool = ReplicaPool(
            replica_source(peers, rpc),
            lambda address: _channel(address, peers, "generation", auth),
            rpc,
            "",  # replicas pull from the trainer their own config names (generation's trainer_addresses)
        )

    async def _initial_weights(self) -> tuple[int, int]:
        """The (epoch, version) batches come from before the first weight sync: the trainer's (a client with no
        trainer, sampling only, takes the newest weights a replica serves)."""
        if not self.peers.trainer:
            return await self.pool.newest_version(self.rpc.wait_ready_s)
        async with _channel(self.peers.trainer, self.peers, "trainer", self.auth) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            state = await Retrying(self.rpc, "trainer")(
                "GetState",
                lambda t: stub.GetState(trainer_pb2.GetStateRequest(), timeout=t, metadata=context_metadata()),
                self.rpc.train_timeout_s,
            )
        return state.epoch, state.policy_version

    async def generate(self, prompts: list[Prompt], params: SamplingParams, wait_s: float | None = None) -> Rollouts:
        if not prompts:
            raise ValueError("prompts: empty batch")
        as_conversations = conversational(prompts)
        pool = self.pool
        if pool.version is None:
            epoch, version = await self._initial_weights()
            await pool.ensure_version(version, epoch)
        version, epoch = pool.version, pool.epoch
        wait_s = self.rpc.outage_budget_s if wait_s is None else wait_s
        sampling = generation_pb2.SamplingParams(
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            samples_per_prompt=params.samples_per_prompt,
        )

        async def call(replica: Replica, offset: int, share: list[Prompt]) -> generation_pb2.GenerateResponse:
            if as_conversations:
                request = generation_pb2.GenerateRequest(conversations=conversations_to_pb(share), sampling=sampling)
            else:
                request = generation_pb2.GenerateRequest(prompts=share, sampling=sampling)
            if params.seed is not None:  # a share's seed follows its place in the batch, whichever replica runs it
                request.sampling.seed = params.seed + offset
            return await replica.stub.Generate(
                request, timeout=self.rpc.generate_timeout_s, metadata=context_metadata()
            )

        # Shares are contiguous (offset, prompts) slices of the batch; replies are kept by offset.
        pending: list[tuple[int, list[Prompt], int]] = [(0, prompts, 1)]  # (offset, prompts, attempt)
        running: dict[asyncio.Task, tuple[Replica, int, list[Prompt], int]] = {}
        replies: dict[int, generation_pb2.GenerateResponse] = {}
        try:
            while pending or running:
                if pending:
                    replicas = await pool.wait_usable(wait_s)
                    for offset, share, attempt in pending:
                        if attempt > RESEND_LIMIT:
                            raise RuntimeError(
                                f"prompts {offset}..{offset + len(share) - 1} were sent {attempt - 1} times "
                                f"without a usable reply; replicas: {pool.describe()}"
                            )
                        pieces = _split(share, min(len(replicas), len(share)))
                        piece_offset = offset
                        for replica, piece in zip(replicas, pieces, strict=False):
                            task = pool.call(replica, call(replica, piece_offset, piece))
                            running[task] = (replica, piece_offset, piece, attempt)
                            piece_offset += len(piece)
                    pending = []
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    replica, offset, share, attempt = running.pop(task)
                    reason = self._settle(task, replica, (epoch, version))
                    if reason is None:
                        log.debug(
                            "generation replica %s generated prompts %d..%d at policy version %d",
                            replica.address,
                            offset,
                            offset + len(share) - 1,
                            version,
                        )
                        replies[offset] = task.result()
                        continue
                    GENERATION_RESHARES.labels(reason).inc()
                    log.warning(
                        "re-sending prompts %d..%d (%s on %s) to the other replicas",
                        offset,
                        offset + len(share) - 1,
                        reason,
                        replica.address,
                    )
                    pending.append((offset, share, attempt + 1))
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

        offsets = sorted(replies)
        merged = _merge_generate_replies([replies[o] for o in offsets], offsets)
        expected = [i for i in range(len(prompts)) for _ in range(max(1, params.samples_per_prompt))]
        if list(merged.prompt_index) != expected:  # a bug if it happens: never train on a lost or doubled prompt
            raise RuntimeError("generation replies do not cover every prompt exactly once")
        return Rollouts(
            prompts=[prompts[i] for i in merged.prompt_index],
            texts=list(merged.texts),
            response_lengths=_row_lengths(merged.response_ids),
            finish_reasons=[_FINISH.get(f, "unspecified") for f in merged.finish_reasons],
            policy_version=merged.policy_version,
            tokens=merged,
            temperature=params.logprob_temperature,
            policy_epoch=merged.policy_epoch,
        )

    def _settle(self, call: asyncio.Task, replica: Replica, weights: tuple[int, int]) -> str | None:
        """None when the call's reply is good; else why its share must be re-sent. Raises on a bad request."""
        if call.cancelled():  # the pool cancels the calls of a replica that left
            return "gone"
        if (err := call.exception()) is not None:
            if isinstance(err, grpc.aio.AioRpcError) and err.code() in self.REPLICA_FAULTS:
                self.pool.mark_failed(replica, f"Generate: {err.code().name} {err.details()}")
                return "failed"
            if isinstance(err, grpc.aio.AioRpcError):
                RPC_FAILURES.labels("generation", "Generate", err.code().name).inc()
            raise err
        reply = call.result()
        if not same_weights((reply.policy_epoch, reply.policy_version), weights):
            self.pool.mark_stale(replica, reply.policy_version, reply.policy_epoch)
            return "stale"
        return None

    async def sync_weights(self, version: int, epoch: int = 0) -> WeightSync:
        start = time.perf_counter()
        moved = await self.pool.ensure_version(version, epoch)
        return WeightSync(version=version, bytes=moved, seconds=time.perf_counter() - start, epoch=epoch)

    async def close(self) -> None:
        await self.pool.close()


def conversational(prompts: list[Prompt]) -> bool:
    """True for a batch of conversations, False for text; a batch holds one kind (as a dataset file does)."""
    kinds = {isinstance(p, list) for p in prompts}
    if len(kinds) > 1:
        raise ValueError("prompts: a batch mixes text prompts and conversations")
    return kinds == {True}


def _split(items: list, parts: int) -> list[list]:
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
    replies: list[generation_pb2.GenerateResponse], offsets: list[int]
) -> generation_pb2.GenerateResponse:
    """One response from the replies to contiguous shares of a batch; ``offsets[i]`` is the batch index of the
    first prompt of reply i's share (its ``prompt_index`` counts from there)."""
    if len(replies) == 1:
        return replies[0]
    merged = generation_pb2.GenerateResponse(
        policy_version=replies[0].policy_version, policy_epoch=replies[0].policy_epoch
    )
    for reply, offset in zip(replies, offsets, strict=True):
        merged.texts.extend(reply.texts)
        merged.finish_reasons.extend(reply.finish_reasons)
        merged.prompt_index.extend(offset + i for i in reply.prompt_index)
    for name in ("prompt_ids", "response_ids", "response_logprobs"):
        getattr(merged, name).CopyFrom(_merge_ragged([getattr(r, name) for r in replies]))
    return merged


class GrpcReward:
    def __init__(self, peers: PeersConfig, rpc: RpcConfig, auth: ClientAuth | None = None):
        self.rpc = rpc
        self.channel = _channel(peers.reward, peers, "reward", auth)
        self.stub = reward_pb2_grpc.RewardStub(self.channel)
        self.retry = Retrying(rpc, "reward")

    async def score(self, rollouts: Rollouts) -> list[float]:
        if conversational(rollouts.prompts):
            request = reward_pb2.ScoreRequest(
                conversations=conversations_to_pb(rollouts.prompts), responses=rollouts.texts
            )
        else:
            request = reward_pb2.ScoreRequest(prompts=rollouts.prompts, responses=rollouts.texts)
        reply = await self.retry(
            "Score",
            lambda t: self.stub.Score(request, timeout=t, metadata=context_metadata()),
            self.rpc.score_timeout_s,
        )
        return list(reply.scores)


class GrpcReference:
    def __init__(self, peers: PeersConfig, rpc: RpcConfig, auth: ClientAuth | None = None):
        self.rpc = rpc
        self.channel = _channel(peers.reference, peers, "reference", auth)
        self.stub = reference_pb2_grpc.ReferenceStub(self.channel)
        self.retry = Retrying(rpc, "reference")

    async def logprobs(self, rollouts: Rollouts) -> tensor_pb2.RaggedTensor:
        reply_in: generation_pb2.GenerateResponse = rollouts.tokens
        request = reference_pb2.LogProbsRequest(
            prompt_ids=reply_in.prompt_ids, response_ids=reply_in.response_ids, temperature=rollouts.temperature
        )
        reply = await self.retry(
            "LogProbs",
            lambda t: self.stub.LogProbs(request, timeout=t, metadata=context_metadata()),
            self.rpc.logprobs_timeout_s,
        )
        return reply.logprobs


class GrpcTrainer:
    def __init__(self, peers: PeersConfig, rpc: RpcConfig, auth: ClientAuth | None = None):
        self.rpc = rpc
        self.channel = _channel(peers.trainer, peers, "trainer", auth)
        self.stub = trainer_pb2_grpc.TrainerStub(self.channel)
        # TrainStep taking the request already serialized (as stored): no parse and re-serialize per send.
        self._train_step_bytes = self.channel.unary_unary(
            "/rlhf.v1.Trainer/TrainStep",
            request_serializer=None,
            response_deserializer=trainer_pb2.TrainStepResponse.FromString,
        )
        self.retry = Retrying(rpc, "trainer")

    def prepare_step(
        self,
        rollouts: Rollouts,
        scores: list[float],
        reference_logprobs,
        run_id: str,
        iteration: int,
        checkpoint: bool = False,
    ) -> bytes:
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
            temperature=rollouts.temperature,
            run_id=run_id,
            iteration=iteration,
            checkpoint=checkpoint,
            group_ids=generated.prompt_index,
        )
        return request.SerializeToString()

    async def train_step(self, step: bytes) -> StepResult:
        try:
            reply = await self.retry(
                "TrainStep",
                lambda t: self._train_step_bytes(step, timeout=t, metadata=context_metadata()),
                self.rpc.train_timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION:
                raise StepConflict(err.details()) from None
            raise
        return StepResult(train_stats_from_pb(reply.stats), reply.replayed, reply.checkpoint)

    async def get_state(self) -> TrainerPosition:
        state = await self.retry(
            "GetState",
            lambda t: self.stub.GetState(trainer_pb2.GetStateRequest(), timeout=t, metadata=context_metadata()),
            self.rpc.train_timeout_s,
        )
        return TrainerPosition(
            epoch=state.epoch,
            version=state.policy_version,
            run_id=state.run_id,
            iteration=state.iteration,
            checkpoint=state.checkpoint,
            checkpoint_run_id=state.checkpoint_run_id,
            checkpoint_iteration=state.checkpoint_iteration,
        )

    async def save_checkpoint(self, name: str) -> str:
        request = trainer_pb2.CheckpointRequest(name=name)
        reply = await self.retry(
            "SaveCheckpoint",
            lambda t: self.stub.SaveCheckpoint(request, timeout=t, metadata=context_metadata()),
            self.rpc.train_timeout_s,
        )
        return reply.directory


async def wait_until_serving(peers: PeersConfig, timeout: float, auth: ClientAuth | None = None) -> None:
    """Polls each peer's grpc.health.v1 until it reports SERVING (or raises TimeoutError naming the laggards)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # Discovered replicas are the pool's to wait for (it uses them once they serve the policy version).
    generation = peers.generation if peers.generation_discovery.mode is DiscoveryMode.STATIC else []
    addresses = {*generation, peers.reward, peers.reference, peers.trainer}
    deadline = time.monotonic() + timeout
    pending = set(addresses)
    while pending:
        for address in list(pending):
            async with _channel(address, peers, "health", auth) as channel:  # health needs TLS, no token
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


def grpc_clients(peers: PeersConfig, rpc: RpcConfig, auth: ClientAuth | None = None) -> Clients:
    peers.require_addresses()
    generation = GrpcGeneration(peers, rpc, auth)
    reward, reference, trainer = (
        GrpcReward(peers, rpc, auth),
        GrpcReference(peers, rpc, auth),
        GrpcTrainer(peers, rpc, auth),
    )

    async def close() -> None:
        await generation.close()
        for channel in (reward.channel, reference.channel, trainer.channel):
            await channel.close()

    return Clients(generation, reward, reference, trainer, close)
