"""Typed config of the reward service."""

from __future__ import annotations

from pydantic import Field, model_validator

from shared.auth import AuthConfig
from shared.config import StrictModel
from shared.modeling import ModelConfig
from shared.server import ServerConfig


class BatchingConfig(StrictModel):
    """How concurrent requests (gRPC and REST alike) are merged into one model call."""

    max_pairs: int = Field(
        256,
        ge=1,
        description="most pairs merged into one model call (a larger request runs alone); the model runs them in "
        "micro-batches anyway, a bigger merge gains little and keeps a request that arrives meanwhile waiting longer",
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="once a request is taken, wait up to this long for others to merge with it; 0 merges only what "
        "is already queued, which under load is everything that arrived while the previous call ran",
    )


class RewardConfig(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig, description="tokens and TLS (shared.auth)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    function: str = Field(
        "",
        description="a rule-based reward 'module:function' used instead of a model; "
        "called as function(prompts, responses) -> list of floats",
    )
    served_model_name: str = Field(
        "reward",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the model's name in the REST API (KServe /v2/models/{name}; the 'model' /classify answers with "
        "when the request names none)",
    )
    micro_batch_size: int = Field(32, ge=1, description="pairs per forward pass")
    max_batch: int = Field(4096, ge=1, description="most pairs accepted in one request")
    max_text_chars: int = Field(
        100_000,
        ge=1,
        description="most characters in one prompt (a conversation: its turns together) or one response, per request",
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
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
