"""Typed config of the trainer service."""

from __future__ import annotations

from pydantic import Field

from services.trainer.backend import CriticConfig, PPOConfig
from shared.config import StrictModel
from shared.modeling import ModelConfig
from shared.server import ServerConfig


class TrainerConfig(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    policy: ModelConfig = Field(default_factory=ModelConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    max_batch: int = Field(4096, ge=1, description="most samples accepted in one TrainStep")
    resume_from: str = Field("", description="checkpoint directory to load at start-up (empty = none)")
