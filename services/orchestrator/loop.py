"""The RLHF loop (synchronous form), independent of the transport:

prompts  = dataset.batch(iteration)                              # the same for the same (seed, iteration)
rollouts = generation.generate(prompts)                          # policy version v
scores, reference_logprobs = both(reward.score, reference.logprobs)  # concurrently
store.put_step(run, iteration, step)                             # before the trainer sees it
stats    = trainer.train_step(step)                              # keyed (run, iteration) -> version v+1
generation.sync_weights(v+1)                                     # before the next generate
store.commit_iteration(run, iteration, record)

The asynchronous form (``RunConfig.asynchronous``) samples iterations i+1 .. i+s (s = ``max_staleness``) in tasks of
their own while the trainer works on iteration i: iteration j is sampled once generation serves the policy after
iteration j-1-s, and generation's weights change only between batches, so the trainer applies a batch at most s
versions after the one that sampled it (exactly s once under way). With s = 0 it is the synchronous loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.orchestrator import metrics
from services.orchestrator.clients import Clients, StepConflict, StepResult, TrainerPosition
from services.orchestrator.config import RunConfig
from services.orchestrator.dataset import PromptCursor, describe, load_prompts
from services.orchestrator.replicas import NoReplicaError
from services.orchestrator.runs import RunDocument
from shared.logs import log_context
from shared.store import StoreConfig, open_store
from shared.types import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class IterationRecord:
    iteration: int  # 1-based
    policy_version: int  # after the step and the weight sync
    reward_mean: float
    reward_std: float
    reward_min: float
    reward_max: float
    response_length_mean: float  # tokens
    eos_fraction: float  # share of samples that ended with EOS
    kl: float  # per-sequence KL(pi_old || pi_ref), nats (trainer's estimator)
    kl_coef: float
    policy_loss: float
    value_loss: float
    entropy: float
    clip_fraction: float
    approx_kl: float
    explained_variance: float
    # generate, score, reference, score_and_reference (score and reference overlap), train, weight_sync; the
    # asynchronous form adds sample_wait (how long the trainer waited for this batch: the part of its sampling that
    # training did not hide), and its weight_sync includes waiting for batches under generation to finish.
    phase_seconds: dict[str, float]
    weight_sync_bytes: int
    samples: int
    wall_seconds: float
    example: dict[str, str] = field(default_factory=dict)  # one prompt/response, for a human to read
    generation_policy_version: int = -1  # the policy version that sampled the batch (-1: a record from before)
    staleness: int = 0  # trainer's version before the step - generation_policy_version (0 = on-policy)


class StopRequested(Exception):
    pass


@dataclass
class SampledAhead:
    """The asynchronous form: one iteration's batch, sampled in a task of its own."""

    task: asyncio.Task  # -> (summary, step), as _sample returns them; not stored yet
    generated: asyncio.Event  # set once generation is done with the batch (or the task ended)


RECHECK_S = 15.0  # while no generation replica serves the policy, look at the trainer again this often


def iteration_seed(run_seed: int, iteration: int) -> int:
    """The sampling seed of an iteration: 62 bits mixed from (run seed, iteration). Prompt k of its batch samples
    with seed + k (generation derives each sample's random stream from that and the sample's index), so seeds of
    different iterations do not overlap and a batch gives the same samples however it is split."""
    digest = hashlib.blake2b(f"rlhf-sampling:{run_seed}:{iteration}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def pack_step(summary: dict, request: bytes) -> bytes:
    """A stored step: what the iteration's record needs (JSON) and the serialized TrainStep request."""
    header = json.dumps(summary).encode()
    return struct.pack("<I", len(header)) + header + request


def unpack_step(blob: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack_from("<I", blob)
    return json.loads(blob[4 : 4 + size]), blob[4 + size :]


class RLHFLoop:
    """Runs the iterations of one run, each exactly once, resuming from the store after any process dies.

    - Iteration i samples prompts (i-1)*P .. i*P-1 of the dataset walk with ``iteration_seed(seed, i)``: the same
      prompts and seeds whenever it runs.
    - Before the trainer is asked, the step (its request and what the record needs) is stored under (run, i); a
      restarted orchestrator sends a stored step again instead of sampling anew, and the trainer applies a
      (run, i) once (a repeat gets the stored result).
    - Before sampling, and whenever the trainer refuses a step, the trainer's position is checked: if its state
      went back (a restart from an older checkpoint), the stored steps since that checkpoint are sent again, then
      generation is synced to the trainer's new weights.
    - The record of iteration i and the run's progress are committed together; steps are then pruned up to the
      trainer's second newest checkpoint of the run.
    """

    def __init__(
        self,
        run_id: str,
        config: RunConfig,
        clients: Clients,
        on_iteration: Callable[[IterationRecord], None] | None = None,
        document: RunDocument | None = None,
        outage_budget_s: float = 600.0,
    ):
        self.run_id = run_id
        self.config = config
        self.clients = clients
        self.on_iteration = on_iteration
        self.records: list[IterationRecord] = []
        self.progressed_at = time.time()  # Unix time of the last completed iteration (the loop's start before one)
        self.stop_requested = False
        self.run_dir = Path(config.runs_dir) / run_id
        self.cursor = PromptCursor(load_prompts(config.dataset), config.seed)
        if document is None:  # a loop on its own (benchmarks, tests): the embedded store under runs_dir
            store = open_store(StoreConfig(), config.runs_dir)
            document = RunDocument.new(store, run_id, config.model_dump(mode="json"))
        self.document = document
        self.store = document.store
        self.outage_budget_s = outage_budget_s
        self._checkpoints: list[int] = []  # iterations of this run covered by the trainer's checkpoints, newest last

    def request_stop(self) -> None:
        self.stop_requested = True

    async def run(self) -> dict:
        """Runs the configured iterations from the last completed one (or until a stop is requested); writes
        summary.json; returns it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics.REPLAYED_ITERATIONS.labels(self.run_id)  # the series exists (at 0) from the start
        metrics.LAST_PROGRESS.labels(self.run_id).set(self.progressed_at)
        await self._restore()
        s = self.config.sampling
        if s.top_p < 1 or s.top_k > 0:
            log.warning(
                "run %s samples with top_p=%s top_k=%s: every log-prob (generation, reference, trainer) is of the "
                "untruncated softmax(logits / T), so the samples come from a narrower distribution than the one PPO "
                "optimises and the KL is estimated on it: the update is slightly off-policy. Use top_p 1, top_k 0 "
                "for training",
                self.run_id,
                s.top_p,
                s.top_k,
            )
        start = time.perf_counter()
        # Asynchronous form: the iterations sampled ahead, under way (the synchronous form keeps None).
        ahead: dict[int, SampledAhead] | None = {} if self.config.asynchronous else None
        try:
            for iteration in range(len(self.records) + 1, self.config.iterations + 1):
                if self.stop_requested:
                    log.info("run %s: stop requested; ending after %d iterations", self.run_id, iteration - 1)
                    break
                with log_context(self.run_id, iteration):  # on every log line here and in the services
                    record = await self._iteration(iteration, ahead)
                self.records.append(record)
                self._publish(record)
                with (self.run_dir / "iterations.jsonl").open("a") as handle:
                    handle.write(json.dumps(asdict(record)) + "\n")
                if self.on_iteration is not None:
                    self.on_iteration(record)
        finally:
            if ahead:
                await _cancel(ahead)
        final_checkpoint = None
        if self.config.checkpoint_at_end and self.records:  # under the trainer's checkpoint root
            final_checkpoint = await self.clients.trainer.save_checkpoint(f"runs/{self.run_id}")
        summary = self.summary(time.perf_counter() - start)
        summary["checkpoint"] = final_checkpoint
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.run_dir / "summary.json")
        return summary

    async def _restore(self) -> None:
        """Takes up the iterations the store holds; the run's files are cut back to them (an iteration that was
        under way when a process died is done again, and its lines must not appear twice)."""
        stored = await asyncio.to_thread(self.store.iterations, self.run_id)
        self.records = [IterationRecord(**r) for r in stored]
        done = len(self.records)
        if [r.iteration for r in self.records] != list(range(1, done + 1)):
            raise RuntimeError(f"run {self.run_id}: the store's iterations are not 1..{done}")
        checkpoint = self.document.doc.get("checkpoint")
        if checkpoint:
            self._checkpoints = [checkpoint["iteration"]]
        if done:
            log.info("run %s: resuming after iteration %d of %d", self.run_id, done, self.config.iterations)
            self._publish(self.records[-1])
        lines = "".join(json.dumps(asdict(r)) + "\n" for r in self.records)
        _rewrite(self.run_dir / "iterations.jsonl", lines)
        rollouts = self.run_dir / "rollouts.jsonl"
        if rollouts.exists():
            kept = [line for line in rollouts.open() if line.strip() and json.loads(line)["iteration"] <= done]
            _rewrite(rollouts, "".join(kept))

    async def _iteration(self, iteration: int, ahead: dict[int, SampledAhead] | None = None) -> IterationRecord:
        """One iteration; ``ahead``: the asynchronous form's batches under way (None: the synchronous form)."""
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        stored = await asyncio.to_thread(self.store.get_step, self.run_id, iteration)
        if ahead is not None:
            await self._sample_ahead(iteration, ahead, this_one=stored is None)
        if stored is not None:  # the orchestrator stopped after storing this step: send the same one again
            summary, step = unpack_step(stored)
            log.info("run %s iteration %d: sending its stored step again", self.run_id, iteration)
            phases.update(summary["phases"])
        else:
            if ahead is None:
                summary, step = await self._sample(iteration, phases)
            else:
                summary, step = await self._sampled_ahead(iteration, ahead, phases)
            await asyncio.to_thread(self.store.put_step, self.run_id, iteration, pack_step(summary, step))
        t2 = time.perf_counter()
        result = await self._train(iteration, step)
        stats = result.stats
        if result.checkpoint:
            self._checkpoints.append(iteration)
        phases["train"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        if self.config.record_rollouts:
            with (self.run_dir / "rollouts.jsonl").open("a") as handle:
                for prompt, text, score in zip(summary["prompts"], summary["texts"], summary["scores"], strict=True):
                    line = {
                        "iteration": iteration,
                        "policy_version": summary["policy_version"],
                        "prompt": prompt,
                        "response": text,
                        "score": score,
                    }
                    handle.write(json.dumps(line) + "\n")
        if ahead:  # generation's weights change between batches, never under one
            await asyncio.gather(*(sampling.generated.wait() for sampling in ahead.values()))
        # Best effort: a replica that misses the new weights is synced before the next batch is sampled.
        sync = await self.clients.generation.sync_weights(stats.policy_version, stats.policy_epoch)
        phases["weight_sync"] = time.perf_counter() - t3
        scores, lengths = summary["scores"], summary["response_lengths"]
        record = IterationRecord(
            iteration=iteration,
            policy_version=stats.policy_version,
            reward_mean=statistics.fmean(scores),
            reward_std=statistics.pstdev(scores),
            reward_min=min(scores),
            reward_max=max(scores),
            response_length_mean=statistics.fmean(lengths),
            eos_fraction=sum(f == "eos" for f in summary["finish_reasons"]) / len(lengths),
            kl=stats.kl_mean,
            kl_coef=stats.kl_coef,
            policy_loss=stats.policy_loss,
            value_loss=stats.value_loss,
            entropy=stats.entropy,
            clip_fraction=stats.clip_fraction,
            approx_kl=stats.approx_kl,
            explained_variance=stats.explained_variance,
            phase_seconds=phases,
            weight_sync_bytes=sync.bytes,
            samples=len(lengths),
            wall_seconds=time.perf_counter() - t0,
            example={"prompt": describe(summary["prompts"][0]), "response": summary["texts"][0]},
            generation_policy_version=summary["policy_version"],
            staleness=stats.policy_version - 1 - summary["policy_version"],
        )
        end = iteration * self.config.prompts_per_iteration
        checkpoint = self.document.doc.get("checkpoint")
        if result.checkpoint:
            checkpoint = {"directory": result.checkpoint, "iteration": iteration}
        await self.document.commit(
            asdict(record),
            iteration=iteration,
            cursor=self.cursor.where(end),
            policy_version=stats.policy_version,
            policy_epoch=stats.policy_epoch,
            checkpoint=checkpoint,
        )
        # Steps a restarted trainer could still need: those after its second newest checkpoint (if the newest one
        # turns out damaged, it resumes from the one before).
        if len(self._checkpoints) >= 2:
            await asyncio.to_thread(self.store.prune_steps, self.run_id, min(self._checkpoints[-2], iteration - 1))
            self._checkpoints = self._checkpoints[-2:]
        return record

    async def _sample_ahead(self, iteration: int, ahead: dict[int, SampledAhead], this_one: bool) -> None:
        """(From the main task, the only one that talks to the trainer.) Brings generation to the trainer's policy
        after iteration - 1 (or after this iteration, when the trainer applied its stored step before the
        orchestrator stopped), then starts sampling the iterations up to iteration + max_staleness not under way
        (this one too when ``this_one``: its step is not stored)."""
        position = await self.clients.trainer.get_state()
        if position.iteration_of(self.run_id) not in (iteration - 1, iteration):
            position = await self._reconcile(iteration - 1)
        await self.clients.generation.sync_weights(position.version, position.epoch)
        last = min(iteration + self.config.max_staleness, self.config.iterations)
        for later in range(iteration if this_one else iteration + 1, last + 1):
            if later not in ahead:
                generated = asyncio.Event()
                ahead[later] = SampledAhead(asyncio.create_task(self._sample_task(later, generated)), generated)

    async def _sample_task(self, iteration: int, generated: asyncio.Event) -> tuple[dict, bytes]:
        try:
            with log_context(self.run_id, iteration):  # not the main task's iteration
                return await self._sample(iteration, {}, generated)
        finally:
            generated.set()  # failed or cancelled: nothing to wait for

    async def _sampled_ahead(
        self, iteration: int, ahead: dict[int, SampledAhead], phases: dict[str, float]
    ) -> tuple[dict, bytes]:
        """The step sampled ahead for ``iteration``. When generation had no replica for it, the batches under way
        are dropped and this one is sampled the synchronous way (which looks at the trainer while it waits)."""
        task = ahead.pop(iteration).task
        begin = time.perf_counter()
        try:
            summary, step = await task
        except NoReplicaError as exc:
            log.warning(
                "run %s iteration %d: %s; sampling it again, without sampling ahead", self.run_id, iteration, exc
            )
            await _cancel(ahead)
            return await self._sample(iteration, phases)
        phases.update(summary["phases"])
        phases["sample_wait"] = time.perf_counter() - begin
        return summary, step

    async def _sample(
        self, iteration: int, phases: dict[str, float], generated: asyncio.Event | None = None
    ) -> tuple[dict, bytes]:
        """Generates, scores and gets the reference log-probs of the iteration's batch: the step to send.
        ``generated``: sampled ahead (the main task synced generation; only it talks to the trainer), set once the
        batch is generated."""
        t0 = time.perf_counter()
        size = self.config.prompts_per_iteration
        prompts = self.cursor.batch_at((iteration - 1) * size, size)
        s = self.config.sampling
        params = SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=iteration_seed(self.config.seed, iteration),
            samples_per_prompt=s.samples_per_prompt,
        )
        if generated is None:
            rollouts = await self._generate(iteration, prompts, params)
        else:
            rollouts = await self.clients.generation.generate(prompts, params, wait_s=RECHECK_S)
            generated.set()
        phases["generate"] = time.perf_counter() - t0

        async def timed(name, awaitable):
            begin = time.perf_counter()
            result = await awaitable
            phases[name] = time.perf_counter() - begin
            return result

        t1 = time.perf_counter()
        scores, reference_logprobs = await asyncio.gather(
            timed("score", self.clients.reward.score(rollouts)),
            timed("reference", self.clients.reference.logprobs(rollouts)),
        )
        phases["score_and_reference"] = time.perf_counter() - t1
        last = iteration == self.config.iterations
        step = self.clients.trainer.prepare_step(
            rollouts, scores, reference_logprobs, self.run_id, iteration, checkpoint=last
        )
        summary = {
            "prompts": rollouts.prompts,
            "texts": rollouts.texts,
            "scores": scores,
            "response_lengths": rollouts.response_lengths,
            "finish_reasons": rollouts.finish_reasons,
            "policy_version": rollouts.policy_version,
            "policy_epoch": rollouts.policy_epoch,
            "phases": dict(phases),
        }
        return summary, step

    async def _generate(self, iteration: int, prompts: list, params: SamplingParams):
        """Samples from the policy of iteration - 1, waiting (up to the outage budget) for generation and for the
        trainer, whose state may go back while the wait lasts."""
        deadline = time.monotonic() + self.outage_budget_s
        while True:
            await self._sync_generation(iteration - 1)
            try:
                return await self.clients.generation.generate(prompts, params, wait_s=RECHECK_S)
            except NoReplicaError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("run %s: %s; checking the trainer and waiting again", self.run_id, exc)

    async def _sync_generation(self, iteration: int) -> None:
        """Makes sure the trainer holds the policy after ``iteration`` and generation serves it."""
        position = await self._reconcile(iteration)
        await self.clients.generation.sync_weights(position.version, position.epoch)

    async def _reconcile(self, iteration: int) -> TrainerPosition:
        """Brings the trainer's state to the end of ``iteration`` of this run: when it went back (a restart from
        an older checkpoint, or from none), the stored steps since are sent again, in order."""
        for _ in range(10):  # the trainer may restart again while steps are replayed
            position = await self.clients.trainer.get_state()
            have = position.iteration_of(self.run_id)
            if have > iteration:
                raise RuntimeError(
                    f"the trainer has applied iteration {have} of run {self.run_id}, past the {iteration} the "
                    "store holds: the run's store was lost or rolled back"
                )
            if have == iteration:
                return position
            log.warning(
                "run %s: the trainer's state is at iteration %d (epoch %d), not %d: replaying iterations %d..%d",
                self.run_id,
                have,
                position.epoch,
                iteration,
                have + 1,
                iteration,
            )
            try:
                for j in range(have + 1, iteration + 1):
                    blob = await asyncio.to_thread(self.store.get_step, self.run_id, j)
                    if blob is None:
                        raise RuntimeError(
                            f"run {self.run_id}: the trainer needs iteration {j} again but its step is no longer "
                            "stored (steps are kept until two trainer checkpoints cover them): has the trainer "
                            "lost its checkpoint root?"
                        )
                    await self.clients.trainer.train_step(unpack_step(blob)[1])
                    metrics.REPLAYED_ITERATIONS.labels(self.run_id).inc()
            except StepConflict as exc:
                log.warning("run %s: replay interrupted (%s); looking at the trainer again", self.run_id, exc)
        raise RuntimeError(f"run {self.run_id}: could not bring the trainer to iteration {iteration}")

    async def _train(self, iteration: int, step: bytes) -> StepResult:
        """Sends the step; a trainer whose state went back is first brought to iteration - 1."""
        for _ in range(10):
            try:
                return await self.clients.trainer.train_step(step)
            except StepConflict as exc:
                log.warning("run %s iteration %d: %s", self.run_id, iteration, exc)
                await self._reconcile(iteration - 1)
        raise RuntimeError(f"run {self.run_id}: the trainer refused iteration {iteration} ten times")

    def _publish(self, record: IterationRecord) -> None:
        labels = (self.run_id,)
        self.progressed_at = time.time()
        metrics.ITERATION.labels(*labels).set(record.iteration)
        metrics.LAST_PROGRESS.labels(*labels).set(self.progressed_at)
        metrics.SAMPLES.labels(*labels).inc(record.samples)
        metrics.REWARD_MEAN.labels(*labels).set(record.reward_mean)
        metrics.REWARD_STD.labels(*labels).set(record.reward_std)
        metrics.REWARD_MIN.labels(*labels).set(record.reward_min)
        metrics.REWARD_MAX.labels(*labels).set(record.reward_max)
        metrics.KL.labels(*labels).set(record.kl)
        metrics.KL_COEF.labels(*labels).set(record.kl_coef)
        metrics.POLICY_VERSION.labels(*labels).set(record.policy_version)
        metrics.RESPONSE_LENGTH.labels(*labels).set(record.response_length_mean)
        metrics.WEIGHT_SYNC_BYTES.labels(*labels).inc(record.weight_sync_bytes)
        for phase, seconds in record.phase_seconds.items():
            metrics.PHASE_SECONDS.labels(self.run_id, phase).observe(seconds)

    def summary(self, wall_seconds: float) -> dict:
        records = self.records
        window = max(1, min(3, len(records)))  # first/last: mean of up to 3 iterations, less noisy than one

        def mean_of(items):
            return statistics.fmean(r.reward_mean for r in items) if items else math.nan

        return {
            "run_id": self.run_id,
            "iterations": len(records),
            "reward_mean_first": records[0].reward_mean if records else None,
            "reward_mean_last": records[-1].reward_mean if records else None,
            "reward_mean_first_3": mean_of(records[:window]) if records else None,
            "reward_mean_last_3": mean_of(records[-window:]) if records else None,
            "kl_last": records[-1].kl if records else None,
            "kl_max": max(r.kl for r in records) if records else None,
            "kl_definition": "per sequence: sum over response tokens of the trainer's estimator (k1 = log pi_old - "
            "log pi_ref by default), batch mean, nats",
            "kl_coef_last": records[-1].kl_coef if records else None,
            "response_length_last": records[-1].response_length_mean if records else None,
            "policy_version": records[-1].policy_version if records else None,
            "wall_seconds": wall_seconds,
            "seconds_per_iteration": wall_seconds / len(records) if records else None,
            "stopped_early": len(records) < self.config.iterations,
            "config": self.config.model_dump(mode="json"),
        }


async def _cancel(ahead: dict[int, SampledAhead]) -> None:
    """Drops the batches sampled ahead (nothing of theirs is stored yet)."""
    for sampling in ahead.values():
        sampling.task.cancel()
    await asyncio.gather(*(sampling.task for sampling in ahead.values()), return_exceptions=True)
    ahead.clear()


def _rewrite(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
