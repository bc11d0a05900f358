"""Typed config of the orchestrator and of one run."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from shared.auth import AuthConfig
from shared.config import ConfigError, StrictModel
from shared.store import StoreConfig


class DiscoveryMode(enum.StrEnum):
    STATIC = "static"  # peers.generation, fixed for the orchestrator's lifetime
    KUBERNETES = "kubernetes"  # the ready endpoints of a Service, watched through the Kubernetes API


class GenerationDiscovery(StrictModel):
    """Where the generation replicas are. In Kubernetes: the EndpointSlices of the generation Service."""

    mode: DiscoveryMode = Field(DiscoveryMode.STATIC, description="static: peers.generation; kubernetes: a Service")
    service: str = Field("", description="kubernetes: name of the generation Service (its EndpointSlices are watched)")
    namespace: str = Field(
        "",
        description="kubernetes: namespace of the Service; empty = the orchestrator's own (in a pod: its service "
        "account's namespace; with a kubeconfig: its current context's)",
    )
    port_name: str = Field("grpc", description="kubernetes: name of the Service port that serves gRPC")
    kubeconfig: str = Field("", description="kubernetes: kubeconfig file; empty = in-cluster config (service account)")
    watch_timeout_s: int = Field(
        300, ge=1, description="kubernetes: server-side timeout of one watch; the slices are then listed again"
    )

    @model_validator(mode="after")
    def _kubernetes_needs_a_service(self):
        if self.mode is DiscoveryMode.KUBERNETES and not self.service:
            raise ValueError("service is required when mode is kubernetes")
        return self


class PeersConfig(StrictModel):
    generation: list[str] = Field(
        default_factory=list, description="host:port of each generation replica (generation_discovery.mode static)"
    )
    generation_discovery: GenerationDiscovery = Field(default_factory=GenerationDiscovery)
    reward: str = Field("", description="host:port of the reward service")
    reference: str = Field("", description="host:port of the reference service")
    trainer: str = Field("", description="host:port of the trainer service")
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="gRPC message limit on the channels")
    lb_policy: Literal["round_robin", "pick_first"] = Field(
        "round_robin",
        description="gRPC load balancing over the addresses a peer's name resolves to: round_robin spreads the "
        "calls over every pod behind a headless Service (dns:///reward-pods:50052); one address is one either way",
    )

    @field_validator("generation", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    def require_addresses(self) -> None:
        """Raises ConfigError naming the first peer a gRPC run lacks (in-process runs need none, so this is not
        checked when the config is parsed)."""
        if self.generation_discovery.mode is DiscoveryMode.STATIC and not self.generation:
            raise ConfigError(
                "peers.generation: at least one generation replica address is required "
                "(or peers.generation_discovery.mode: kubernetes)"
            )
        for role in ("reward", "reference", "trainer"):
            if not getattr(self, role):
                raise ConfigError(f"peers.{role}: address required")


class RpcConfig(StrictModel):
    generate_timeout_s: float = Field(300.0, gt=0, description="deadline of a Generate call, seconds")
    score_timeout_s: float = Field(120.0, gt=0, description="deadline of a Score call")
    logprobs_timeout_s: float = Field(120.0, gt=0, description="deadline of a LogProbs call")
    train_timeout_s: float = Field(600.0, gt=0, description="deadline of a TrainStep call")
    weights_timeout_s: float = Field(300.0, gt=0, description="deadline of a weight sync")
    outage_budget_s: float = Field(
        600.0,
        gt=0,
        description="how long a run waits for a peer that is down (UNAVAILABLE) or too slow (deadline exceeded), "
        "retrying with backoff and jitter, before it fails: long enough for a pod to restart and load its model",
    )
    initial_backoff_s: float = Field(0.5, gt=0, description="first retry delay; doubles each retry")
    max_backoff_s: float = Field(10.0, gt=0, description="longest retry delay")
    wait_ready_s: float = Field(
        300.0,
        ge=0,
        description="how long to wait for every peer's health to be SERVING at the start of a run",
    )


class SamplingConfig(StrictModel):
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    samples_per_prompt: int = Field(1, ge=1)


class RunConfig(StrictModel):
    """One RLHF run: what the control API's POST /runs takes."""

    dataset: str = Field("", description='JSONL file of {"prompt": ...} rows')
    iterations: int = Field(10, ge=1, description="PPO iterations (one TrainStep each)")
    prompts_per_iteration: int = Field(16, ge=1, description="prompts drawn from the dataset per iteration")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    seed: int = Field(0, description="dataset shuffling and sampling seeds derive from it")
    runs_dir: str = Field("runs", description="run outputs go to runs_dir/<run-id>/")
    run_id: str = Field("", description="empty = generated from the time")
    checkpoint_at_end: bool = Field(False, description="ask the trainer to save a checkpoint after the last iteration")
    record_rollouts: bool = Field(
        False, description="write every sample (prompt, response, score) to runs_dir/<run-id>/rollouts.jsonl"
    )
    asynchronous: bool = Field(
        False,
        description="sample the next iterations' batches (generate, score, reference) while the trainer trains on "
        "this one: off-policy by up to max_staleness versions; false = the synchronous loop",
    )
    max_staleness: int = Field(
        1,
        ge=0,
        description="asynchronous: how many policy versions the weights that sampled a batch may be behind the "
        "trainer's when it trains on it (0 = on-policy, the synchronous loop's result)",
    )


class ApiConfig(StrictModel):
    """The control API. Its token is ``auth.token_file``; paths a request names are confined under the roots."""

    host: str = Field("127.0.0.1", description="control API address")
    port: int = Field(8080, ge=0, le=65535, description="control API port (0 = a free one)")
    datasets_root: str = Field(
        "",
        description="a POST /runs body's dataset is a relative path under this directory; "
        "empty = the directory of run.dataset (the current directory when that is unset)",
    )
    runs_root: str = Field(
        "", description="a POST /runs body's runs_dir is a relative path under this directory; empty = run.runs_dir"
    )
    stall_limit_s: float = Field(
        900.0, gt=0, description="GET /readyz answers 503 while an active run has completed no iteration for this long"
    )


class OrchestratorConfig(StrictModel):
    auth: AuthConfig = Field(
        default_factory=AuthConfig,
        description="token_file: the control API's tokens; peer_token_files: the token for each service; tls",
    )
    peers: PeersConfig = Field(default_factory=PeersConfig)
    rpc: RpcConfig = Field(default_factory=RpcConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    store: StoreConfig = Field(
        default_factory=StoreConfig, description="where runs are kept (run state, iteration records, pending steps)"
    )
    run: RunConfig = Field(default_factory=RunConfig)
