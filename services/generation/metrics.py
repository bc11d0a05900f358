"""The generation service's own Prometheus metrics (the ones every model service has are in ``shared.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared import metrics
from shared.types import FinishReason, Sample

ROLE = "generation"

GENERATED_TOKENS = Counter("rlhf_generation_tokens_total", "Response tokens generated.")
RESPONSE_LENGTH = Histogram(
    "rlhf_generation_response_length_tokens", "Response length per sample, tokens.", buckets=metrics.COUNT_BUCKETS
)
FINISHED = Counter("rlhf_generation_finished_total", "Samples by finish reason (eos, length).", ["reason"])
for _reason in FinishReason:  # both series from the first scrape
    FINISHED.labels(_reason.value)


def observe_generate(samples: list[Sample], seconds: float) -> None:
    """Records one generate call on the model thread: its samples, their tokens and the wall time."""
    response_lengths = [int(s.response_ids.numel()) for s in samples]
    prompt_tokens = sum(int(s.prompt_ids.numel()) for s in samples)
    metrics.observe_model_call(ROLE, len(samples), prompt_tokens + sum(response_lengths), seconds)
    GENERATED_TOKENS.inc(sum(response_lengths))
    for sample, length in zip(samples, response_lengths, strict=True):
        RESPONSE_LENGTH.observe(length)
        FINISHED.labels(sample.finish_reason.value).inc()
