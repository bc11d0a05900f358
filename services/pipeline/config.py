"""Typed config of ``rlhf pipeline``: every stage's settings, with defaults that run the built-in task on a
laptop CPU in a few minutes."""

from __future__ import annotations

import enum

from pydantic import Field, model_validator

from services.labeling.factory import LabelerConfig
from shared.auth import AuthConfig
from shared.config import StrictModel
from shared.tgi import TgiConfig
from shared.training import OptimConfig


def _optim(**kwargs) -> OptimConfig:
    return OptimConfig.model_validate(kwargs)


class PretrainStage(StrictModel):
    base_model: str = Field("", description="a causal LM to start from; empty = build the tiny built-in one")
    steps: int = Field(300, ge=0, description="next-token training steps on the built-in corpus (tiny model only)")


class SFTStage(StrictModel):
    demonstrations: int = Field(2000, ge=10, description="prompt/completion rows generated from the task")
    optim: OptimConfig = Field(
        default_factory=lambda: _optim(
            learning_rate=2e-3, batch_size=32, micro_batch_size=32, epochs=1.0, eval_fraction=0.1, log_every=20
        )
    )


class CandidateSource(enum.StrEnum):
    GENERATION = "generation"  # a generation service the pipeline starts on the SFT model
    TGI = "tgi"  # a running TGI server (tgi.url), e.g. one serving the SFT model or a stronger one


class PreferenceStage(StrictModel):
    prompts: int = Field(600, ge=10, description="training prompts to sample candidates for")
    samples_per_prompt: int = Field(4, ge=2, description="candidates per prompt; every pair of them is labelled")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    labeler_temperature: float = Field(
        1.0, gt=0, description="simulated labeler noise: P(a) = sigmoid((gold_a - gold_b) / T)"
    )
    source: CandidateSource = Field(CandidateSource.GENERATION, description="where candidates are sampled")
    tgi: TgiConfig = Field(default_factory=TgiConfig, description="the TGI server, when source is tgi")
    auth: AuthConfig = Field(
        default_factory=AuthConfig,
        description="peer_token_files[tgi.token_role]: the token presented to the TGI server",
    )

    @model_validator(mode="after")
    def _tgi_url(self):
        if self.source is CandidateSource.TGI and not self.tgi.url:
            raise ValueError("tgi.url: required when source is tgi")
        return self


class RewardModelStage(StrictModel):
    optim: OptimConfig = Field(
        default_factory=lambda: _optim(
            learning_rate=1e-3, batch_size=8, micro_batch_size=8, epochs=2.0, eval_fraction=0.15, log_every=20
        )
    )


class PPOStage(StrictModel):
    iterations: int = Field(40, ge=1)
    prompts_per_iteration: int = Field(32, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    ppo: dict = Field(
        default_factory=lambda: {
            "learning_rate": 3e-4,
            "ppo_epochs": 4,
            "minibatch_size": 16,
            "micro_batch_size": 16,
            "kl": {"mode": "adaptive", "init_coef": 0.2, "target": 4.0, "horizon": 256},
            # The update stops at a minibatch whose approx_kl passes 0.075 (per token): without it one seed's step
            # moved 3.5 and the policy diverged (README, "Results over seeds"); healthy steps move 0.001-0.01.
            "target_kl": 0.05,
        },
        description="the trainer's ppo section (services.trainer.config.PPOConfig)",
    )
    without_kl: bool = Field(
        False, description="also run PPO with beta = 0, to show reward hacking (proxy up, gold behind)"
    )


class DPOStage(StrictModel):
    beta: float = Field(
        0.5,
        gt=0,
        description="0.5, not the paper's 0.1: at 0.1 this task's DPO drifted 8-140 nats from SFT into long responses "
        "without EOS on 4 of 5 seeds (README, 'Results over seeds')",
    )
    nll_coef: float = Field(
        0.2,
        ge=0,
        description="RPO's NLL term on the chosen responses (DPOJobConfig.nll_coef): without it, beta 0.5 still "
        "drifted 12-25 nats on 2 of 5 seeds of the reduced config",
    )
    optim: OptimConfig = Field(
        default_factory=lambda: _optim(
            learning_rate=5e-4, batch_size=8, micro_batch_size=8, epochs=3.0, eval_fraction=0.1, log_every=20
        )
    )


class EvaluationStage(StrictModel):
    prompts: int = Field(256, ge=10, description="held-out prompts (never used in training)")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    examples: int = Field(6, ge=0, description="prompts whose generations the report shows side by side")


class PipelineConfig(StrictModel):
    run_id: str = Field("", description="empty = generated from the time")
    runs_dir: str = Field("runs", description="everything goes to runs_dir/<run-id>/")
    seed: int = 0
    cpu_threads: int = Field(1, ge=0, description="torch CPU threads per process (see ModelConfig.cpu_threads)")
    pretrain: PretrainStage = Field(default_factory=PretrainStage)
    sft: SFTStage = Field(default_factory=SFTStage)
    preferences: PreferenceStage = Field(default_factory=PreferenceStage)
    reward_model: RewardModelStage = Field(default_factory=RewardModelStage)
    ppo: PPOStage = Field(default_factory=PPOStage)
    dpo: DPOStage = Field(default_factory=DPOStage)
    evaluation: EvaluationStage = Field(default_factory=EvaluationStage)


class RoundsStage(StrictModel):
    rounds: int = Field(3, ge=1, description="sample -> label -> reward model -> PPO -> evaluate, this many times")
    prompts_per_round: int = Field(
        200, ge=10, description="fresh training prompts whose candidates are labelled in each round"
    )
    holdout_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of a round's prompts whose pairs are never trained on: the reward model's accuracy on "
        "fresh on-policy pairs is measured on them, before and after retraining",
    )


class IterateConfig(StrictModel):
    """``rlhf iterate``: SFT once, then rounds of on-policy preference collection, reward-model retraining and
    PPO from the current policy (InstructGPT's iterated loop)."""

    run_id: str = Field("", description="empty = generated from the time")
    runs_dir: str = Field("runs", description="everything goes to runs_dir/<run-id>/")
    seed: int = 0
    cpu_threads: int = Field(1, ge=0, description="torch CPU threads per process (see ModelConfig.cpu_threads)")
    pretrain: PretrainStage = Field(default_factory=PretrainStage)
    sft: SFTStage = Field(default_factory=SFTStage)
    preferences: PreferenceStage = Field(
        default_factory=PreferenceStage,
        description="how candidates are sampled each round (prompts: see rounds.prompts_per_round)",
    )
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    rounds: RoundsStage = Field(default_factory=RoundsStage)
    reward_model: RewardModelStage = Field(default_factory=RewardModelStage)
    ppo: PPOStage = Field(default_factory=lambda: PPOStage(iterations=20), description="the PPO run of each round")
    evaluation: EvaluationStage = Field(default_factory=EvaluationStage)
