"""Typed config of the trainer service: one place for every default (PPO, KL, critic, LoRA, precision)."""

from __future__ import annotations

import enum

from pydantic import Field, model_validator

from shared.auth import AuthConfig
from shared.config import StrictModel
from shared.modeling import ModelConfig
from shared.rl_math import AdvantageEstimator, KLEstimator
from shared.server import ServerConfig


class KLMode(enum.StrEnum):
    ADAPTIVE = "adaptive"  # Ziegler et al. 2019: beta moves toward the target per-sequence KL
    FIXED = "fixed"  # constant beta (InstructGPT)


class CriticInit(enum.StrEnum):
    REWARD_MODEL = "reward_model"  # backbone and scoring head of a reward model: values start at the RM score
    POLICY = "policy"  # backbone of the policy (or another causal LM) with a zero head: values start at 0


class ScoreNormalization(enum.StrEnum):
    NONE = "none"
    RUNNING = "running"  # (score - running mean) / running std over every score seen so far


class KLPlacement(enum.StrEnum):
    REWARD = "reward"  # InstructGPT: -beta * KL_t in each token's reward (k1 by default)
    LOSS = "loss"  # GRPO: + beta * KL_t as a loss term on the policy's log-probs (k3 by default), none in the reward


class KLConfig(StrictModel):
    mode: KLMode = Field(KLMode.ADAPTIVE, description="adaptive (Ziegler et al. 2019) or fixed KL coefficient")
    init_coef: float = Field(0.05, ge=0, description="initial (or, when fixed, constant) KL coefficient beta")
    target: float = Field(
        6.0, gt=0, description="adaptive: target per-sequence KL(pi || pi_ref) in nats, summed over the response"
    )
    horizon: int = Field(10000, gt=0, description="adaptive: samples over which beta may change by 20%")
    estimator: KLEstimator | None = Field(
        None,
        description="per-token KL estimator: k1, k2 or k3; none means k1 in the reward and k3 (low variance, "
        "Schulman 2020) as a loss term",
    )
    placement: KLPlacement = Field(
        KLPlacement.REWARD, description="where the penalty goes: in the per-token reward, or as a loss term"
    )

    @property
    def effective_estimator(self) -> KLEstimator:
        if self.estimator is not None:
            return self.estimator
        return KLEstimator.K3 if self.placement is KLPlacement.LOSS else KLEstimator.K1

    @model_validator(mode="after")
    def _loss_needs_a_gradient(self) -> KLConfig:
        if self.placement is KLPlacement.LOSS and self.estimator is KLEstimator.K1:
            raise ValueError(
                "estimator: k1 as a loss term has zero expected gradient (it does nothing); use k3 (or k2) with "
                "placement loss, or placement reward"
            )
        return self


class PPOConfig(StrictModel):
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate of the policy")
    critic_learning_rate: float | None = Field(
        None, gt=0, description="AdamW learning rate of the critic; none means learning_rate"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (policy and critic)")
    ppo_epochs: int = Field(4, gt=0, description="passes over each rollout batch")
    target_kl: float | None = Field(
        None,
        gt=0,
        description="early stop of an update: once a minibatch's approx_kl (per token, k2: mean of "
        "0.5 (log pi - log pi_old)^2) exceeds 1.5 x target_kl, that minibatch and every later one of the step are not "
        "applied (OpenAI baselines, Stable-Baselines3); none = every minibatch of every epoch",
    )
    minibatch_size: int = Field(8, gt=0, description="sequences per optimizer step")
    micro_batch_size: int = Field(
        8, gt=0, description="sequences per forward/backward; gradients are accumulated over a minibatch"
    )
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon")
    clip_range_value: float = Field(0.2, gt=0, description="value clip: new values stay within old +- this")
    value_coef: float = Field(0.1, ge=0, description="weight of the value loss in the total loss")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus: loss -= entropy_coef * entropy")
    gamma: float = Field(1.0, ge=0, le=1, description="discount factor")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    whiten_advantages: bool = Field(True, description="normalise advantages over the batch's response tokens")
    score_normalization: ScoreNormalization = Field(
        ScoreNormalization.NONE, description="normalisation of the reward-model scores before the KL penalty"
    )
    score_clip: float | None = Field(
        None, gt=0, description="clip scores to [-c, c] after normalisation; none disables"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm, per model")
    advantage_estimator: AdvantageEstimator = Field(
        AdvantageEstimator.GAE,
        description="gae: a learned critic (GAE); grpo: each score normalised within the group of samples of its "
        "prompt; rloo: the leave-one-out mean of the group as baseline; reinforce_plus_plus: returns whitened over "
        "the batch. The last three load no critic; grpo and rloo need samples_per_prompt >= 2",
    )
    grpo_scale_rewards: bool = Field(
        True, description="grpo: divide by the group's standard deviation (false: Dr. GRPO, mean-centred only)"
    )
    off_policy_cap: float = Field(
        2.0,
        gt=0,
        description="a batch sampled by an older policy version (the asynchronous loop): each token's loss is "
        "weighted by pi_old / pi_behaviour (the trainer's log-prob over generation's), truncated at this cap",
    )
    fuse_first_pass: bool = Field(
        True,
        description="when the batch is one minibatch of one micro-batch, the old log-probs and values come from "
        "the first epoch's own forward (the weights have not moved yet) instead of a forward of their own",
    )
    kl: KLConfig = Field(default_factory=KLConfig, description="KL penalty")
    seed: int = Field(0, description="seed of the initialisation and of the minibatch shuffling")

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> PPOConfig:
        if self.micro_batch_size > self.minibatch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must be <= minibatch_size ({self.minibatch_size})"
            )
        return self

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator is AdvantageEstimator.GAE

    @property
    def needs_groups(self) -> bool:
        return self.advantage_estimator in (AdvantageEstimator.GRPO, AdvantageEstimator.RLOO)


class CriticConfig(StrictModel):
    init: CriticInit = Field(CriticInit.POLICY, description="what the critic starts from")
    path: str = Field(
        "", description="model directory to initialise from; empty means the policy's path (reward_model needs it)"
    )

    @model_validator(mode="after")
    def _reward_model_needs_path(self) -> CriticConfig:
        if self.init is CriticInit.REWARD_MODEL and not self.path:
            raise ValueError("path: init=reward_model needs the reward model's directory")
        return self


class LoRAConfig(StrictModel):
    """LoRA (Hu et al. 2021) with peft: the base weights stay frozen, low-rank adapters on ``target_modules`` train."""

    rank: int = Field(0, ge=0, description="adapter rank r; 0 = LoRA off: full fine-tuning")
    alpha: float = Field(32, gt=0, description="scale numerator: the adapter's update is (alpha / rank) * B A")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on the adapter's input; written into the adapter's config, but inactive in PPO, which "
        "keeps its models in eval mode (with dropout the ratio would not start at 1)",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="names of the linear layers that get adapters (peft's target_modules), e.g. attention "
        "q/k/v/o_proj; add gate_proj/up_proj/down_proj for the MLP",
    )
    critic: bool = Field(True, description="adapters on the critic's backbone too (its value head stays fully trained)")
    export_merged: bool = Field(
        True,
        description="checkpoints also write policy/: the adapter merged into the base weights, a plain Hugging "
        "Face model (+ tokenizer) for evaluation and serving; the adapter/ directory is written either way",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class CheckpointConfig(StrictModel):
    """The trainer's own checkpoints, from which a restarted trainer resumes by itself."""

    root: str = Field(
        "",
        description="directory of the rotating checkpoints (in Kubernetes a PersistentVolume); at start-up the "
        "newest one that loads is restored. Empty = none",
    )
    every: int = Field(
        10,
        ge=0,
        description="write one after every this many steps (0 = only when a TrainStep asks, as a run's last "
        "does); a restart replays at most this many iterations",
    )
    keep: int = Field(3, ge=1, description="newest checkpoints kept; older ones are deleted after each write")


class TrainerConfig(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig, description="tokens and TLS (shared.auth)")
    policy: ModelConfig = Field(default_factory=ModelConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA adapters instead of full fine-tuning")
    max_batch: int = Field(4096, ge=1, description="most samples accepted in one TrainStep")
    resume_from: str = Field(
        "", description="checkpoint directory to load at start-up when checkpoint.root holds none (empty = none)"
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations in the backward pass instead of storing them (policy and "
        "critic): activation memory down to about one layer's, for about 30% more compute",
    )
