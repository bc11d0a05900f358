"""Typed config of the reference service."""

from __future__ import annotations

from pydantic import Field

from shared.config import StrictModel
from shared.modeling import ModelConfig
from shared.server import ServerConfig


class ReferenceConfig(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    max_batch: int = Field(1024, ge=1, description="most samples accepted in one request")
    max_tokens_per_sample: int = Field(4096, ge=1, description="longest prompt + response accepted")
