"""In-process clients: the same backends the services wrap, called directly (no gRPC, no serialization).

Each backend keeps its own model thread, as in its service, so the loop's concurrency is the same.
"""

from __future__ import annotations

import time

import torch

from services.generation.backend import GenerationBackend
from services.orchestrator.clients import (
    Clients,
    Rollouts,
    StepConflict,
    StepResult,
    TrainerPosition,
    WeightSync,
    conversational,
)
from services.orchestrator.dataset import Prompt
from services.reference.backend import ReferenceBackend
from services.reward.backend import RewardBackend
from services.trainer.backend import TrainerBackend
from services.trainer.servicer import rollout_from_pb, rollout_to_pb
from shared.errors import Conflict
from shared.paths import confine
from shared.proto.rlhf.v1 import trainer_pb2
from shared.types import RolloutBatch, Sample, SamplingParams
from shared.weights import chunk_weights
from shared.worker import ModelWorker


class InProcessGeneration:
    def __init__(self, backend: GenerationBackend, trainer: TrainerBackend):
        self.backend = backend
        self.trainer = trainer
        self.worker = ModelWorker("generation")

    async def generate(self, prompts: list[Prompt], params: SamplingParams, wait_s: float | None = None) -> Rollouts:
        ids = (
            self.backend.tokenize_conversations(prompts) if conversational(prompts) else self.backend.tokenize(prompts)
        )
        self.backend.validate(ids, params)
        samples: list[Sample] = await self.worker.run(self.backend.generate, ids, params)
        return Rollouts(
            prompts=[prompts[s.prompt_index] for s in samples],
            texts=[s.text for s in samples],
            response_lengths=[int(s.response_ids.numel()) for s in samples],
            finish_reasons=[s.finish_reason.value for s in samples],
            policy_version=samples[0].policy_version,
            tokens=samples,
            temperature=params.logprob_temperature,
            policy_epoch=samples[0].policy_epoch,
        )

    async def sync_weights(self, version: int, epoch: int = 0) -> WeightSync:
        # The same chunking and checks as over the wire, minus the transport.
        start = time.perf_counter()
        served = (self.backend.epoch, self.backend.version)
        if served == (self.trainer.epoch, self.trainer.version) or served[1] == self.trainer.version == 0:
            return WeightSync(version=self.backend.version, bytes=0, seconds=0.0, epoch=self.backend.epoch)
        assembler = self.backend.weight_assembler()
        chunks = chunk_weights(
            list(self.trainer.policy_state()),
            self.trainer.version,
            adapter_config=self.trainer.adapter_config,
            epoch=self.trainer.epoch,
        )
        for chunk in chunks:
            assembler.add(chunk)
        state = assembler.finish()
        await self.worker.run(self.backend.swap_weights, state, assembler.version, assembler.adapter_config)
        return WeightSync(
            version=assembler.version,
            bytes=assembler.bytes,
            seconds=time.perf_counter() - start,
            epoch=assembler.epoch,
        )


class InProcessReward:
    def __init__(self, backend: RewardBackend):
        self.backend = backend
        self.worker = ModelWorker("reward")

    async def score(self, rollouts: Rollouts) -> list[float]:
        if conversational(rollouts.prompts):
            pairs = [
                self.backend.render(c, r, f"conversations[{i}]")
                for i, (c, r) in enumerate(zip(rollouts.prompts, rollouts.texts, strict=True))
            ]
        else:
            pairs = list(zip(rollouts.prompts, rollouts.texts, strict=True))
        return await self.worker.run(self.backend.score, pairs)


class InProcessReference:
    def __init__(self, backend: ReferenceBackend):
        self.backend = backend
        self.worker = ModelWorker("reference")

    async def logprobs(self, rollouts: Rollouts) -> list[torch.Tensor]:
        samples: list[Sample] = rollouts.tokens
        pairs = [(s.prompt_ids, s.response_ids) for s in samples]
        return await self.worker.run(self.backend.logprobs, pairs, rollouts.temperature)


class InProcessTrainer:
    def __init__(self, backend: TrainerBackend, checkpoint_root: str | None = None):
        self.backend = backend
        self.checkpoint_root = checkpoint_root  # where save_checkpoint(name) writes (None = it cannot)
        self.worker = ModelWorker("trainer")

    def prepare_step(
        self,
        rollouts: Rollouts,
        scores: list[float],
        reference_logprobs,
        run_id: str,
        iteration: int,
        checkpoint: bool = False,
    ) -> bytes:
        samples: list[Sample] = rollouts.tokens
        batch = RolloutBatch(
            prompt_ids=[s.prompt_ids for s in samples],
            response_ids=[s.response_ids for s in samples],
            scores=torch.tensor(scores, dtype=torch.float32),
            reference_logprobs=list(reference_logprobs),
            generation_logprobs=[s.response_logprobs for s in samples],
            policy_version=rollouts.policy_version,
            temperature=rollouts.temperature,
            group_ids=torch.tensor([s.prompt_index for s in samples], dtype=torch.int64),
        )
        return rollout_to_pb(batch, run_id, iteration).SerializeToString()

    async def train_step(self, step: bytes) -> StepResult:
        request = trainer_pb2.TrainStepRequest.FromString(step)
        try:
            stats, replayed = await self.worker.run(
                self.backend.keyed_step, rollout_from_pb(request), request.run_id, request.iteration
            )
        except Conflict as exc:
            raise StepConflict(str(exc)) from None
        return StepResult(stats, replayed, "")

    async def get_state(self) -> TrainerPosition:
        run_id, iteration = self.backend.ledger.position()
        return TrainerPosition(self.backend.epoch, self.backend.version, run_id, iteration)

    async def save_checkpoint(self, name: str) -> str:
        if self.checkpoint_root is None:
            raise ValueError("checkpoint_at_end: this in-process trainer has no checkpoint root")
        directory = confine(self.checkpoint_root, name, "name")
        directory.parent.mkdir(parents=True, exist_ok=True)
        return str(await self.worker.run(self.backend.save_checkpoint, directory))


def inprocess_clients(
    generation: GenerationBackend,
    reward: RewardBackend,
    reference: ReferenceBackend,
    trainer: TrainerBackend,
    checkpoint_root: str | None = None,
) -> Clients:
    return Clients(
        InProcessGeneration(generation, trainer),
        InProcessReward(reward),
        InProcessReference(reference),
        InProcessTrainer(trainer, checkpoint_root),
    )
