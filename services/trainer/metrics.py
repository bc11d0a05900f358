"""The trainer's own Prometheus metrics (the ones every model service has are in ``shared.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared import metrics
from shared.types import RolloutBatch, TrainStats

ROLE = "trainer"

# The last TrainStep's statistics, one gauge each: (gauge, TrainStats field).
LAST_STEP = (
    (Gauge("rlhf_trainer_policy_loss", "Last TrainStep: clipped surrogate loss (token mean)."), "policy_loss"),
    (Gauge("rlhf_trainer_value_loss", "Last TrainStep: clipped value loss (token mean)."), "value_loss"),
    (
        Gauge(
            "rlhf_trainer_kl",
            "Last TrainStep: KL(pi_old || pi_ref) per sequence, nats (the estimator summed over the response, "
            "batch mean).",
        ),
        "kl_mean",
    ),
    (Gauge("rlhf_trainer_entropy", "Last TrainStep: policy entropy, nats per token."), "entropy"),
    (
        Gauge("rlhf_trainer_clip_fraction", "Last TrainStep: share of response tokens whose ratio was clipped."),
        "clip_fraction",
    ),
    (Gauge("rlhf_trainer_approx_kl", "Last TrainStep: mean 0.5 (log pi - log pi_old)^2 per token."), "approx_kl"),
    (
        Gauge("rlhf_trainer_explained_variance", "Last TrainStep: 1 - Var(returns - values) / Var(returns)."),
        "explained_variance",
    ),
    (Gauge("rlhf_trainer_kl_coef", "Last TrainStep: KL coefficient beta."), "kl_coef"),
    (Gauge("rlhf_trainer_grad_norm", "Last TrainStep: mean pre-clipping policy gradient norm."), "grad_norm"),
    (Gauge("rlhf_trainer_learning_rate", "Policy learning rate."), "learning_rate"),
)
STEP_SECONDS = Histogram(
    "rlhf_trainer_step_seconds", "Wall time of a TrainStep, seconds.", buckets=metrics.SECONDS_BUCKETS
)
TRAINED_TOKENS = Counter("rlhf_trainer_tokens_total", "Response tokens trained on.")
STEPS = Counter("rlhf_trainer_steps_total", "TrainSteps applied.")
REPLAYED_STEPS = Counter(
    "rlhf_trainer_replayed_steps_total", "TrainSteps already applied, answered with their stored result."
)
CHECKPOINTS = Counter("rlhf_trainer_checkpoints_total", "Checkpoints written under the checkpoint root.")
CHECKPOINT_FAILURES = Counter(
    "rlhf_trainer_checkpoint_failures_total", "Checkpoints under the checkpoint root that could not be written."
)


def observe_train_step(batch: RolloutBatch, stats: TrainStats, seconds: float) -> None:
    """Records one TrainStep (a model call of ``len(batch)`` sequences) and its statistics."""
    tokens = sum(int(p.numel() + r.numel()) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True))
    metrics.observe_model_call(ROLE, len(batch), tokens, seconds)
    for gauge, field in LAST_STEP:
        gauge.set(getattr(stats, field))
    STEP_SECONDS.observe(stats.step_seconds)
    TRAINED_TOKENS.inc(stats.tokens)
    STEPS.inc()
    metrics.WEIGHTS_VERSION.labels(ROLE).set(stats.policy_version)
