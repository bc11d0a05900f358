"""Typed config of ``rlhf pipeline-real``: the pipeline on a real model and real human ratings. The defaults are
``make demo-real``'s settings, sized to about 15 minutes on 2 CPU cores."""

from __future__ import annotations

from pydantic import Field

from shared.config import StrictModel
from shared.training import OptimConfig


class DataStage(StrictModel):
    ppo_prompts: int = Field(1024, ge=1, description="snippets whose openings are the PPO prompts")
    evaluation_prompts: int = Field(128, ge=10, description="held-out snippets whose openings evaluate every policy")


class RealRewardModelStage(StrictModel):
    pairs: int = Field(800, ge=10, description="preference pairs kept (snippets sharing an opening)")
    margin: float = Field(1.0, ge=0, description="least difference of the two snippets' mean ratings (-4..+4)")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig.model_validate(
            {
                "learning_rate": 5e-5,
                "batch_size": 8,
                "micro_batch_size": 8,
                "epochs": 1.0,
                "warmup_steps": 10,
                "eval_fraction": 0.15,
                "log_every": 10,
                "max_length": 64,
            }
        ),
        description="batch sizes count openings (a prompt and all its pairs)",
    )


class RealPPOStage(StrictModel):
    iterations: int = Field(15, ge=1)
    prompts_per_iteration: int = Field(16, ge=1)
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, gt=0)
    ppo: dict = Field(
        default_factory=lambda: {
            "learning_rate": 1e-3,  # LoRA adapters; at 3e-4 the policy moved ~0.0005 nats per step
            "ppo_epochs": 2,
            "minibatch_size": 8,
            "micro_batch_size": 8,
            "kl": {"mode": "fixed", "init_coef": 0.1},
        },
        description="the trainer's ppo section (services.trainer.config.PPOConfig)",
    )
    lora: dict | None = Field(
        default_factory=lambda: {
            "rank": 16,
            "alpha": 32,
            "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        description="the trainer's lora section; none = full fine-tuning",
    )
    critic_layers: int = Field(
        2,
        ge=0,
        description="the critic is the policy's first N transformer layers with a value head (0 = the whole "
        "policy, which doubles the trainer's work)",
    )
    without_kl: bool = Field(True, description="also run PPO with beta = 0 (proxy and gold reward may part ways)")


class RealEvaluationStage(StrictModel):
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, gt=0)
    examples: int = Field(6, ge=0, description="prompts whose generations the report shows side by side")


class RealPipelineConfig(StrictModel):
    run_id: str = Field("", description="empty = generated from the time")
    runs_dir: str = Field("runs", description="everything goes to runs_dir/<run-id>/")
    cache_dir: str = Field(
        "", description="converted models and downloaded data; empty = $RLHF_CACHE or ~/.cache/rlhf-services/models"
    )
    seed: int = 0
    cpu_threads: int = Field(1, ge=0, description="torch CPU threads per process (see ModelConfig.cpu_threads)")
    data: DataStage = Field(default_factory=DataStage)
    reward_model: RealRewardModelStage = Field(default_factory=RealRewardModelStage)
    ppo: RealPPOStage = Field(default_factory=RealPPOStage)
    evaluation: RealEvaluationStage = Field(default_factory=RealEvaluationStage)
