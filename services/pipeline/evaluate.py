"""Evaluation of policies on held-out prompts: gold and proxy reward with 95% intervals, KL to the SFT model,
response length, and sample generations.

One sample per prompt at the configured temperature, with the same seed for every policy.
KL to SFT is per sequence: sum over response tokens of log pi(a_t) - log pi_sft(a_t) on the policy's own samples
(the k1 Monte Carlo estimate of KL(pi || pi_sft)), averaged over prompts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.generation.backend import GenerationBackend
from services.generation.config import GenerationConfig
from services.pipeline.task import gold_reward
from services.reference.backend import ReferenceBackend
from services.reference.config import ReferenceConfig
from services.reward.backend import ModelRewardBackend
from services.reward.config import RewardConfig
from shared.types import SamplingParams


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation, 1.96 standard errors)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.inf
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class PolicyEvaluation:
    policy: str
    path: str
    prompts: int
    gold_reward_mean: float
    gold_reward_ci95: float  # half-width of the 95% interval of the mean
    proxy_reward_mean: float  # the trained reward model's (normalised) score
    proxy_reward_ci95: float
    kl_to_sft: float  # nats per sequence, k1 estimate on the policy's samples
    kl_to_sft_ci95: float
    response_length_mean: float  # tokens
    eos_fraction: float  # share of responses that ended with EOS rather than at max_new_tokens
    samples: list[dict] = field(default_factory=list)  # {"prompt", "response", "gold", "proxy"} for the report

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_policies(
    policies: dict[str, Path],
    sft_dir: Path,
    reward_dir: Path,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    examples: int,
    cpu_threads: int = 0,
    gold: Callable[[str, str], float] = gold_reward,
) -> dict[str, PolicyEvaluation]:
    """``gold(prompt, response)``: the judge that training never sees (the built-in task's gold reward unless
    given)."""
    reward = ModelRewardBackend(
        RewardConfig.model_validate({"model": {"path": str(reward_dir), "cpu_threads": cpu_threads}})
    )
    reference = ReferenceBackend(
        ReferenceConfig.model_validate({"model": {"path": str(sft_dir), "cpu_threads": cpu_threads}})
    )
    results = {}
    for name, path in policies.items():
        generation = GenerationBackend(
            GenerationConfig.model_validate({"model": {"path": str(path), "cpu_threads": cpu_threads}})
        )
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        samples = generation.generate(generation.tokenize(prompts), params)
        texts = [s.text for s in samples]
        gold_scores = [gold(p, t) for p, t in zip(prompts, texts, strict=True)]
        proxy = reward.score(list(zip(prompts, texts, strict=True)))
        sft_logprobs = reference.logprobs([(s.prompt_ids, s.response_ids) for s in samples])
        kl = [float((s.response_logprobs - ref).sum()) for s, ref in zip(samples, sft_logprobs, strict=True)]
        gold_mean, gold_ci = mean_ci95(gold_scores)
        proxy_mean, proxy_ci = mean_ci95(proxy)
        kl_mean, kl_ci = mean_ci95(kl)
        results[name] = PolicyEvaluation(
            policy=name,
            path=str(path),
            prompts=len(prompts),
            gold_reward_mean=gold_mean,
            gold_reward_ci95=gold_ci,
            proxy_reward_mean=proxy_mean,
            proxy_reward_ci95=proxy_ci,
            kl_to_sft=kl_mean,
            kl_to_sft_ci95=kl_ci,
            response_length_mean=statistics.fmean(int(s.response_ids.numel()) for s in samples),
            eos_fraction=sum(s.finish_reason.value == "eos" for s in samples) / len(samples),
            samples=[
                {"prompt": prompts[i], "response": texts[i], "gold": gold_scores[i], "proxy": proxy[i]}
                for i in range(min(examples, len(prompts)))
            ],
        )
        del generation  # one policy in memory at a time
    return results
