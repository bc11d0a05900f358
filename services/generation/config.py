"""Typed config of the generation service."""

from __future__ import annotations

from pydantic import Field

from shared.auth import AuthConfig
from shared.config import StrictModel
from shared.modeling import ModelConfig
from shared.server import ServerConfig


class GenerationConfig(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig, description="tokens and TLS (shared.auth)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    max_new_tokens_limit: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask for")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt accepted, in tokens")
    max_samples: int = Field(1024, ge=1, description="most samples (prompts x samples_per_prompt) in one request")
    max_samples_per_prompt: int = Field(64, ge=1, description="largest samples_per_prompt accepted")
    trainer_addresses: list[str] = Field(
        default_factory=list,
        description="host:port of the trainers PullWeights may dial (a request naming another is refused); "
        "a request with no address pulls from the first",
    )
    micro_batch_size: int = Field(64, ge=1, description="sequences sampled together in one generate() call")
