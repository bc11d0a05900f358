"""Typed config of the reference service."""

from __future__ import annotations

import enum

from pydantic import Field, model_validator

from shared.auth import AuthConfig
from shared.config import StrictModel
from shared.modeling import ModelConfig
from shared.server import ServerConfig
from shared.tgi import TgiConfig


class ReferenceBackendKind(enum.StrEnum):
    LOCAL = "local"  # the model at model.path, in this process
    TGI = "tgi"  # prefill log-probs from a TGI server (tgi.url) serving the same model; only the tokenizer loads here


class ReferenceConfig(StrictModel):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig, description="tokens and TLS (shared.auth)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    max_batch: int = Field(1024, ge=1, description="most samples accepted in one request")
    max_tokens_per_sample: int = Field(4096, ge=1, description="longest prompt + response accepted")
    backend: ReferenceBackendKind = Field(
        ReferenceBackendKind.LOCAL,
        description="local: load model.path here; tgi: ask the TGI server at tgi.url (model.path or model.tokenizer "
        "then names its tokenizer; temperature 1 only)",
    )
    tgi: TgiConfig = Field(default_factory=TgiConfig, description="the TGI server, when backend is tgi")

    @model_validator(mode="after")
    def _tgi_url(self):
        if self.backend is ReferenceBackendKind.TGI and not self.tgi.url:
            raise ValueError("tgi.url: required when backend is tgi")
        return self
