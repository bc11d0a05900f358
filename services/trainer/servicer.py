"""Trainer gRPC servicer: protobuf <-> domain only; PPO is the backend's."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import torch

from services.trainer import distributed
from services.trainer import metrics as trainer_metrics
from services.trainer.backend import TrainerBackend
from services.trainer.checkpoint import CheckpointRoot
from services.trainer.config import TrainerConfig
from shared import codec, metrics
from shared.convert import train_stats_to_pb
from shared.errors import InvalidInput
from shared.paths import confine
from shared.proto.rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from shared.server import BackendHolder, Role, Server, build_grpc_server
from shared.types import RolloutBatch, TrainStats
from shared.validation import check_batch_size, check_row_lengths, check_temperature, check_token_rows
from shared.weights import chunk_tensor
from shared.worker import ModelWorker

log = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 1024
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name


def rollout_from_pb(request: trainer_pb2.TrainStepRequest) -> RolloutBatch:
    prompt_ids = codec.ragged_from_pb(request.prompt_ids, "prompt_ids")
    response_ids = codec.ragged_from_pb(request.response_ids, "response_ids")
    reference = codec.ragged_from_pb(request.reference_logprobs, "reference_logprobs")
    generation = codec.ragged_from_pb(request.generation_logprobs, "generation_logprobs")
    scores = codec.tensor_from_pb(request.scores, "scores")
    return RolloutBatch(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        scores=scores.to(torch.float32),
        reference_logprobs=[r.to(torch.float32) for r in reference],
        generation_logprobs=[g.to(torch.float32) for g in generation],
        policy_version=request.policy_version,
        temperature=request.temperature or 1.0,
        group_ids=torch.tensor(list(request.group_ids), dtype=torch.int64) if request.group_ids else None,
    )


def rollout_to_pb(batch: RolloutBatch, run_id: str = "", iteration: int = 0) -> trainer_pb2.TrainStepRequest:
    """The inverse of ``rollout_from_pb`` (for in-process callers that store their steps as requests)."""
    return trainer_pb2.TrainStepRequest(
        prompt_ids=codec.ragged_to_pb(batch.prompt_ids, torch.int64),
        response_ids=codec.ragged_to_pb(batch.response_ids, torch.int64),
        scores=codec.tensor_to_pb(batch.scores.to(torch.float32)),
        reference_logprobs=codec.ragged_to_pb(batch.reference_logprobs, torch.float32),
        generation_logprobs=codec.ragged_to_pb(batch.generation_logprobs, torch.float32),
        policy_version=batch.policy_version,
        temperature=batch.temperature,
        run_id=run_id,
        iteration=iteration,
        group_ids=[] if batch.group_ids is None else batch.group_ids.tolist(),
    )


class TrainerServicer(BackendHolder, trainer_pb2_grpc.TrainerServicer):
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.worker = ModelWorker("trainer")
        # Weight streams read the live parameters (no copy of the model); a TrainStep waits until none is open.
        self._streams = 0
        self._streams_done = asyncio.Condition()
        self.root = CheckpointRoot(config.checkpoint.root, config.checkpoint.keep) if config.checkpoint.root else None
        # The newest checkpoint under the root: its directory and the key of its last step; and its step.
        self.checkpoint: tuple[str, str, int] = ("", "", 0)
        self._checkpoint_step = -1
        metrics.register_role("trainer", holds_weights=True)

    def attach(self, backend: TrainerBackend) -> None:
        super().attach(backend)
        metrics.track_device_memory("trainer", backend.device)
        metrics.WEIGHTS_VERSION.labels("trainer").set(backend.version)
        if backend.loaded_checkpoint is not None and self.root is not None:
            self.checkpoint = (str(backend.loaded_checkpoint), *backend.ledger.position())
            self._checkpoint_step = backend.step

    async def close(self) -> None:
        """Under torchrun, tells the other ranks to stop (they exit, and torchrun with them)."""
        if isinstance(self._backend, distributed.Leader):
            await self.worker.run(self._backend.stop_followers)
            await self.worker.run(distributed.leave)

    def _train_step(
        self, batch: RolloutBatch, run_id: str, iteration: int, checkpoint: bool
    ) -> tuple[TrainStats, bool, str]:
        """The backend's PPO step (at most once per key), timed on the model thread and recorded; then a checkpoint
        under the root when one is due. Returns (stats, replayed, checkpoint directory or "")."""
        backend: TrainerBackend = self.backend
        start = time.perf_counter()
        stats, replayed = backend.keyed_step(batch, run_id, iteration)
        if not replayed:
            trainer_metrics.observe_train_step(batch, stats, time.perf_counter() - start)
            metrics.WEIGHTS_VERSION.labels("trainer").set(backend.version)
        every = self.config.checkpoint.every
        due = checkpoint or (every > 0 and backend.step % every == 0)
        written = ""
        if self.root is not None and due and self._checkpoint_step != backend.step:
            written = self._save_to_root()
        return stats, replayed, written

    def _save_to_root(self) -> str:
        """A checkpoint under the root after a step (model thread). A failure is logged, not raised: the step
        stands, and the previous checkpoint remains the one a restart resumes from."""
        try:
            return str(self._checkpoint_now())
        except Exception:
            log.exception("checkpoint of step %d under %s failed", self.backend.step, self.root.root)
            trainer_metrics.CHECKPOINT_FAILURES.inc()
            return ""

    def _checkpoint_now(self) -> Path:
        """Writes a checkpoint under the root and makes it the one GetState reports (model thread)."""
        backend: TrainerBackend = self.backend
        path = self.root.save(backend.step, backend.save_checkpoint)
        self.checkpoint = (str(path), *backend.ledger.position())
        self._checkpoint_step = backend.step
        trainer_metrics.CHECKPOINTS.inc()
        return path

    async def _exclusive(self, fn, *args):
        """Runs a call that changes the weights, once no weight stream is open (and holds new ones off)."""
        async with self._streams_done:
            await self._streams_done.wait_for(lambda: self._streams == 0)
            return await self.worker.run(fn, *args)

    def _validate(self, batch: RolloutBatch) -> None:
        backend: TrainerBackend = self.backend
        vocab = backend.policy.get_input_embeddings().num_embeddings
        check_batch_size(len(batch.prompt_ids), "prompt_ids", self.config.max_batch)
        check_temperature(batch.temperature, "temperature")
        check_token_rows(batch.prompt_ids, "prompt_ids", vocab)
        check_token_rows(batch.response_ids, "response_ids", vocab)
        check_row_lengths(batch.reference_logprobs, batch.response_ids, "reference_logprobs", "response_ids")
        check_row_lengths(batch.generation_logprobs, batch.response_ids, "generation_logprobs", "response_ids")
        if tuple(batch.scores.shape) != (len(batch.response_ids),):
            raise InvalidInput("scores", f"shape {list(batch.scores.shape)}, expected [{len(batch.response_ids)}]")

    async def TrainStep(self, request: trainer_pb2.TrainStepRequest, context: grpc.aio.ServicerContext):
        _ = self.backend  # UNAVAILABLE while the model is loading
        batch = rollout_from_pb(request)
        self._validate(batch)
        stats, replayed, written = await self._exclusive(
            self._train_step, batch, request.run_id, request.iteration, request.checkpoint
        )
        response = trainer_pb2.TrainStepResponse(stats=train_stats_to_pb(stats), replayed=replayed, checkpoint=written)
        if replayed:
            trainer_metrics.REPLAYED_STEPS.inc()
            log.info(
                "step (run %s, iteration %d) was applied before: its stored result, nothing trained",
                request.run_id,
                request.iteration,
            )
            return response
        log.info(
            "step -> version %d: %d samples, %d tokens, kl %.3f, beta %.4f, policy loss %.4f, %.2fs",
            stats.policy_version,
            len(batch),
            stats.tokens,
            stats.kl_mean,
            stats.kl_coef,
            stats.policy_loss,
            stats.step_seconds,
        )
        return response

    async def StreamWeights(self, request: trainer_pb2.StreamWeightsRequest, context: grpc.aio.ServicerContext):
        backend: TrainerBackend = self.backend
        max_bytes = self.config.server.max_message_bytes
        limit = max_bytes - min(64 * 1024, max_bytes // 2)  # room for the chunk's other fields
        chunk_bytes = request.chunk_bytes or limit
        if chunk_bytes < MIN_CHUNK_BYTES:  # a tiny chunk size would turn one stream into millions of messages
            raise InvalidInput("chunk_bytes", f"must be 0 (the default) or >= {MIN_CHUNK_BYTES}, got {chunk_bytes}")
        chunk_bytes = min(chunk_bytes, limit)
        async with self._streams_done:  # not while a TrainStep runs; several replicas may stream at once
            self._streams += 1
        try:
            start, sent = time.perf_counter(), 0
            # A tensor at a time (a sharded trainer gathers each from every rank's shard): no TrainStep runs while
            # a stream is open, so the tensors are all of one version. Copied on the model thread, like every other
            # torch call of this service: copies made on the event loop's thread gave torch a second OpenMP thread
            # team, and every later TrainStep ran up to 30% slower (measured at 19M parameters on 2 cores: 4.5-4.9 s
            # per step before a stream, 5.3-6.3 s after).
            names = backend.policy_names()
            version, adapter_config, epoch = backend.version, backend.adapter_config, backend.epoch
            for index, name in enumerate(names):
                tensor = await self.worker.run(backend.policy_tensor, name)
                config = adapter_config if index == 0 else ""
                for chunk in chunk_tensor(name, tensor, version, len(names), chunk_bytes, config, epoch):
                    sent += len(chunk.data)
                    yield chunk
                del tensor
            metrics.observe_weight_update("trainer", sent, time.perf_counter() - start)  # complete streams only
        finally:
            async with self._streams_done:
                self._streams -= 1
                self._streams_done.notify_all()

    def _named(self, name: str) -> Path:
        """``name`` under the checkpoint root: a caller can neither leave the root nor pick another directory."""
        if self.root is None:
            raise InvalidInput("name", "this trainer has no checkpoint.root to keep checkpoints under")
        return confine(self.root.root, name, "name")

    async def SaveCheckpoint(self, request: trainer_pb2.CheckpointRequest, context):
        backend: TrainerBackend = self.backend
        if not request.name:
            path = await self.worker.run(self._checkpoint_now) if self.root else self._named("")
        else:
            directory = self._named(request.name)
            if CheckpointRoot.PATTERN.match(directory.name) or directory.name.startswith("."):
                raise InvalidInput("name", f"{request.name!r}: step-<n> and hidden names belong to the rotation")
            directory.parent.mkdir(parents=True, exist_ok=True)
            path = await self.worker.run(backend.save_checkpoint, directory)
        return trainer_pb2.CheckpointResponse(directory=str(path), policy_version=backend.version, step=backend.step)

    async def LoadCheckpoint(self, request: trainer_pb2.CheckpointRequest, context):
        directory = self._named(request.name)
        if not (directory / "trainer_state.json").is_file():
            raise InvalidInput("name", f"{request.name!r} is not a checkpoint directory")
        backend: TrainerBackend = self.backend
        await self._exclusive(backend.load_checkpoint, directory)
        metrics.WEIGHTS_VERSION.labels("trainer").set(backend.version)
        return trainer_pb2.CheckpointResponse(
            directory=str(directory), policy_version=backend.version, step=backend.step
        )

    async def GetState(self, request, context):
        backend: TrainerBackend = self.backend
        run_id, iteration = backend.ledger.position()
        checkpoint, checkpoint_run_id, checkpoint_iteration = self.checkpoint
        return trainer_pb2.TrainerState(
            policy_version=backend.version,
            step=backend.step,
            kl_coef=backend.kl_coef,
            epoch=backend.epoch,
            run_id=run_id,
            iteration=iteration,
            checkpoint=checkpoint,
            checkpoint_run_id=checkpoint_run_id,
            checkpoint_iteration=checkpoint_iteration,
        )


# The backend's methods every rank runs when the trainer is sharded (services.trainer.distributed).
COLLECTIVE = frozenset({"keyed_step", "train_step", "policy_tensor", "save_checkpoint", "load_checkpoint"})


def load_backend(config: TrainerConfig) -> TrainerBackend:
    """The trainer's backend; under torchrun (rank 0, which serves) its collective methods run on every rank."""
    ranks = distributed.from_environment(config.policy.device)
    backend = _load(config, ranks)
    return distributed.Leader(backend, ranks, COLLECTIVE) if ranks is not None else backend


def follow(config: TrainerConfig) -> None:
    """A rank > 0 under torchrun: loads the same backend and runs rank 0's commands until it stops."""
    ranks = distributed.from_environment(config.policy.device)
    if ranks is None:
        raise ValueError("follow: not under torchrun (WORLD_SIZE unset or 1)")
    distributed.follow(_load(config, ranks), ranks)
    distributed.leave()


def _load(config: TrainerConfig, ranks: distributed.Ranks | None) -> TrainerBackend:
    # Under torchrun every rank runs this: the checkpoint loads below are collectives, made in step.
    backend = TrainerBackend(
        config.policy,
        config.critic,
        config.ppo,
        gradient_checkpointing=config.gradient_checkpointing,
        lora=config.lora,
        ranks=ranks,
    )
    loaded = None
    if config.checkpoint.root:  # the newest good checkpoint of an earlier run of this trainer, if any
        root = CheckpointRoot(config.checkpoint.root, config.checkpoint.keep)
        root.clean_staging()
        loaded = backend.loaded_checkpoint = root.load_latest(backend.load_checkpoint)
        if loaded is not None:
            log.info("resumed from %s: step %d, policy version %d", loaded, backend.step, backend.version)
    if loaded is None and config.resume_from:
        backend.load_checkpoint(Path(config.resume_from))
    return backend


def warm_up(backend: TrainerBackend) -> None:
    """Nothing to warm: the first TrainStep pays its own start-up."""


async def build_server(config: TrainerConfig, backend: TrainerBackend | None) -> tuple[Server, int]:
    """Binds the trainer service (health NOT_SERVING); ``backend`` None means attach it later."""
    servicer = TrainerServicer(config)
    server = await build_grpc_server(
        config.server,
        [(servicer, trainer_pb2_grpc.add_TrainerServicer_to_server, SERVICE_NAME)],
        backend,
        auth=config.auth,
    )
    return server, server.port


ROLE = Role("trainer", TrainerConfig, build_server, load_backend, warm_up, follow=follow)
