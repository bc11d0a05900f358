"""The orchestrator's Prometheus metrics (served on the control API's /metrics)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

ITERATION = Gauge("rlhf_iteration", "Iterations completed in the current run.", ["run_id"])
# For "no progress" alerts and GET /readyz: time() minus it is how long the run has gone without an iteration.
LAST_PROGRESS = Gauge(
    "rlhf_last_progress_timestamp_seconds",
    "Unix time the run last completed an iteration (the loop's start until one completes), seconds.",
    ["run_id"],
)
SAMPLES = Counter("rlhf_samples_total", "Samples generated and trained on.", ["run_id"])
REWARD_MEAN = Gauge("rlhf_reward_mean", "Mean score of the last iteration's samples.", ["run_id"])
REWARD_STD = Gauge("rlhf_reward_std", "Standard deviation of the scores of the last iteration's samples.", ["run_id"])
REWARD_MIN = Gauge("rlhf_reward_min", "Lowest score of the last iteration's samples.", ["run_id"])
REWARD_MAX = Gauge("rlhf_reward_max", "Highest score of the last iteration's samples.", ["run_id"])
KL = Gauge(
    "rlhf_kl",
    "KL(pi_old || pi_ref) per sequence (sum over response tokens, batch mean), nats, last iteration.",
    ["run_id"],
)
KL_COEF = Gauge("rlhf_kl_coef", "KL coefficient beta used in the last iteration.", ["run_id"])
POLICY_VERSION = Gauge("rlhf_policy_version", "Policy version after the last iteration.", ["run_id"])
RESPONSE_LENGTH = Gauge(
    "rlhf_response_length_tokens", "Mean response length of the last iteration, tokens.", ["run_id"]
)
PHASE_SECONDS = Histogram(
    "rlhf_phase_seconds",
    "Wall time of each phase of an iteration, seconds.",
    ["run_id", "phase"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
WEIGHT_SYNC_BYTES = Counter(
    "rlhf_weight_sync_bytes_total", "Weight payload bytes moved to the generation replicas.", ["run_id"]
)
RPC_RETRIES = Counter(
    "rlhf_rpc_retries_total", "RPC attempts retried after UNAVAILABLE or DEADLINE_EXCEEDED.", ["peer", "method"]
)
WAITING = Gauge(
    "rlhf_waiting_for_peer",
    "1 while the run waits for this peer (down or too slow: retried within rpc.outage_budget_s), else 0.",
    ["peer"],
)
_WAITING: dict[str, int] = {}  # peer -> calls waiting for it now


@contextlib.contextmanager
def waiting(peer: str):
    """Marks ``peer`` as waited for (``waiting_for()``, the run's status, ``rlhf_waiting_for_peer``) meanwhile."""
    _WAITING[peer] = _WAITING.get(peer, 0) + 1
    WAITING.labels(peer).set(1)
    try:
        yield
    finally:
        _WAITING[peer] -= 1
        if not _WAITING[peer]:
            del _WAITING[peer]
            WAITING.labels(peer).set(0)


def waiting_for() -> set[str]:
    """The peers some call is waiting for now."""
    return set(_WAITING)


REPLAYED_ITERATIONS = Counter(
    "rlhf_replayed_iterations_total",
    "Stored steps sent to the trainer again because its state went back (a restart from an older checkpoint).",
    ["run_id"],
)
RESUMED_RUNS = Counter("rlhf_resumed_runs_total", "Runs resumed from the store when the orchestrator started.")
RPC_FAILURES = Counter("rlhf_rpc_failures_total", "RPCs that failed for good.", ["peer", "method", "code"])
GENERATION_REPLICAS = Gauge(
    "rlhf_generation_replicas",
    "Generation replicas known to the orchestrator, by state (new, syncing, ready, failed).",
    ["state"],
)
GENERATION_RESHARES = Counter(
    "rlhf_generation_reshares_total",
    "Shares of a Generate batch re-sent to other replicas, by reason (failed, gone, stale).",
    ["reason"],
)
