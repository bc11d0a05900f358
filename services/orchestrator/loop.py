"""The RLHF loop (synchronous form), independent of the transport:

prompts  = dataset.next_batch()
rollouts = generation.generate(prompts)                          # policy version v
scores, reference_logprobs = both(reward.score, reference.logprobs)  # concurrently
stats    = trainer.train_step(rollouts, scores, reference_logprobs) # -> version v+1
generation.sync_weights(v+1)                                     # before the next generate
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.orchestrator import metrics
from services.orchestrator.clients import Clients
from services.orchestrator.config import RunConfig
from services.orchestrator.dataset import PromptCursor, describe, load_prompts
from shared.logs import log_context
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
    phase_seconds: dict[str, float]  # generate, score+reference (overlapped), train, weight_sync
    weight_sync_bytes: int
    samples: int
    wall_seconds: float
    example: dict[str, str] = field(default_factory=dict)  # one prompt/response, for a human to read


class StopRequested(Exception):
    pass


class RLHFLoop:
    def __init__(
        self,
        run_id: str,
        config: RunConfig,
        clients: Clients,
        on_iteration: Callable[[IterationRecord], None] | None = None,
    ):
        self.run_id = run_id
        self.config = config
        self.clients = clients
        self.on_iteration = on_iteration
        self.records: list[IterationRecord] = []
        self.stop_requested = False
        self.run_dir = Path(config.runs_dir) / run_id
        self.cursor = PromptCursor(load_prompts(config.dataset), config.seed)

    def request_stop(self) -> None:
        self.stop_requested = True

    async def run(self) -> dict:
        """Runs the configured iterations (or until a stop is requested); writes summary.json; returns it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
        for iteration in range(1, self.config.iterations + 1):
            if self.stop_requested:
                log.info("run %s: stop requested; ending after %d iterations", self.run_id, iteration - 1)
                break
            with log_context(self.run_id, iteration):  # on every log line here and in the services
                record = await self._iteration(iteration)
            self.records.append(record)
            self._publish(record)
            with (self.run_dir / "iterations.jsonl").open("a") as handle:
                handle.write(json.dumps(asdict(record)) + "\n")
            if self.on_iteration is not None:
                self.on_iteration(record)
        if self.config.checkpoint_at_end and self.records:
            await self.clients.trainer.save_checkpoint(str((self.run_dir / "checkpoint").resolve()))
        summary = self.summary(time.perf_counter() - start)
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.run_dir / "summary.json")
        return summary

    async def _iteration(self, iteration: int) -> IterationRecord:
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        prompts = self.cursor.next_batch(self.config.prompts_per_iteration)
        s = self.config.sampling
        params = SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=self.config.seed * 100_003 + iteration,
            samples_per_prompt=s.samples_per_prompt,
        )
        rollouts = await self.clients.generation.generate(prompts, params)
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
        t2 = time.perf_counter()
        stats = await self.clients.trainer.train_step(rollouts, scores, reference_logprobs)
        phases["train"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        if self.config.record_rollouts:
            with (self.run_dir / "rollouts.jsonl").open("a") as handle:
                for prompt, text, score in zip(rollouts.prompts, rollouts.texts, scores, strict=True):
                    handle.write(
                        json.dumps(
                            {
                                "iteration": iteration,
                                "policy_version": rollouts.policy_version,
                                "prompt": prompt,
                                "response": text,
                                "score": score,
                            }
                        )
                        + "\n"
                    )
        sync = await self.clients.generation.sync_weights(stats.policy_version)
        phases["weight_sync"] = time.perf_counter() - t3
        if sync.version != stats.policy_version:
            raise RuntimeError(f"generation serves version {sync.version}, trainer is at {stats.policy_version}")
        lengths = rollouts.response_lengths
        return IterationRecord(
            iteration=iteration,
            policy_version=sync.version,
            reward_mean=statistics.fmean(scores),
            reward_std=statistics.pstdev(scores),
            reward_min=min(scores),
            reward_max=max(scores),
            response_length_mean=statistics.fmean(lengths),
            eos_fraction=sum(f == "eos" for f in rollouts.finish_reasons) / len(lengths),
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
            example={"prompt": describe(rollouts.prompts[0]), "response": rollouts.texts[0]},
        )

    def _publish(self, record: IterationRecord) -> None:
        labels = (self.run_id,)
        metrics.ITERATION.labels(*labels).set(record.iteration)
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
