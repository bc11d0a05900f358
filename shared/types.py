"""Domain objects that travel between roles. The RL code and the model backends use these, never ``*_pb2``.

Ragged batches are lists of 1-D tensors: element i belongs to sample i, and lengths differ between samples.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the orchestrator uses these types without torch installed
    import torch


class FinishReason(enum.Enum):
    EOS = "eos"  # the model produced its end-of-sequence token (included in the response)
    LENGTH = "length"  # max_new_tokens was reached


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    samples_per_prompt: int = 1

    @property
    def logprob_temperature(self) -> float:
        """T in log softmax(logits / T): the distribution tokens are drawn from (before top-p/top-k), which every
        role's log-probs use so that the PPO ratio and the KL compare the policy that sampled. Greedy: 1."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Sample:
    """One generated response."""

    prompt_index: int  # which prompt of the request this answers
    prompt_ids: torch.Tensor  # (P,) int64
    response_ids: torch.Tensor  # (R,) int64, EOS included when finish_reason is EOS
    response_logprobs: torch.Tensor  # (R,) float32, log softmax(logits / T)[a_t], T = logprob_temperature
    text: str  # decoded response, special tokens skipped
    finish_reason: FinishReason
    policy_version: int
    policy_epoch: int = 0  # epoch of the weights that produced it (0 = as loaded)


@dataclass
class RolloutBatch:
    """What the trainer needs for one PPO step; B samples, ragged along the token axis."""

    prompt_ids: list[torch.Tensor]  # B x (P_i,) int64
    response_ids: list[torch.Tensor]  # B x (R_i,) int64, R_i >= 1
    scores: torch.Tensor  # (B,) float32, reward-model or reward-function score per sample
    reference_logprobs: list[torch.Tensor]  # B x (R_i,) float32, log pi_ref of each response token
    generation_logprobs: list[torch.Tensor]  # B x (R_i,) float32, log pi_old as reported by generation
    policy_version: int = 0  # version of the policy that generated the batch
    temperature: float = 1.0  # T of every log-prob here and in the trainer: log softmax(logits / T)
    group_ids: torch.Tensor | None = None  # (B,) int64: samples with the same id answer the same prompt; None = none

    def __len__(self) -> int:
        return len(self.response_ids)


@dataclass
class TrainStats:
    """Statistics of one TrainStep. Losses and KL are means over response tokens (token-mean)."""

    policy_loss: float = 0.0  # clipped surrogate, mean over epochs and minibatches
    value_loss: float = 0.0  # clipped value loss (0.5 * squared error), same averaging
    # KL(pi_old || pi_ref) per sequence: the configured estimator summed over response tokens, mean over the batch
    kl_mean: float = 0.0
    entropy: float = 0.0  # mean per-token entropy of pi (nats)
    clip_fraction: float = 0.0  # fraction of tokens where the policy ratio was clipped
    approx_kl: float = 0.0  # mean per-token 0.5 * (log pi - log pi_old)^2 during the update
    score_mean: float = 0.0  # mean raw score before normalisation/clipping
    return_mean: float = 0.0  # mean per-token return
    explained_variance: float = 0.0  # 1 - Var(returns - values) / Var(returns)
    kl_coef: float = 0.0  # beta used for this step's reward shaping
    grad_norm: float = 0.0  # mean pre-clipping gradient norm
    learning_rate: float = 0.0
    policy_version: int = 0  # version after the step
    tokens: int = 0  # response tokens trained on
    step_seconds: float = 0.0
    generation_logprob_diff: float = 0.0  # mean |log pi_old(trainer) - log pi_old(generation)| per token
    policy_epoch: int = 0  # the trainer's epoch when the step was applied (a new one at each start and load)
    extra: dict[str, float] = field(default_factory=dict)
