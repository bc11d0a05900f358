"""Typed config of the reward service."""

from __future__ import annotations

from pydantic import Field, model_validator

from shared.config import StrictModel
from shared.modeling import ModelConfig
from shared.server import ServerConfig


class RewardConfig(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    function: str = Field(
        "",
        description="a rule-based reward 'module:function' used instead of a model; "
        "called as function(prompts, responses) -> list of floats",
    )
    micro_batch_size: int = Field(32, ge=1, description="pairs per forward pass")
    max_batch: int = Field(4096, ge=1, description="most pairs accepted in one request")
    max_length: int = Field(1024, ge=8, description="prompt + response tokens kept (longer text is truncated)")
    normalize: bool = Field(
        True,
        description="serve (score - mean) / std with the mean and std in the model directory's "
        "reward_normalization.json (written by the reward-model job); raw scores when the file is absent",
    )

    @model_validator(mode="after")
    def _one_scorer(self):
        if bool(self.function) == bool(self.model.path):
            raise ValueError("set exactly one of model.path (a reward model) or function ('module:function')")
        return self
