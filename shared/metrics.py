"""The Prometheus metrics every model service shares, labelled by ``role`` (generation, reward, reference, trainer).

Names, types and labels are the README's "Metrics" table (tests/service/test_metrics_naming.py holds the processes
to it). Role-specific metrics live beside their service (``services/<role>/metrics.py``), so that a process only
exposes what it measures. No torch at import: the device-memory reading imports it only for a CUDA device.
"""

from __future__ import annotations

import os
import sys

from prometheus_client import Counter, Gauge, Histogram

# From a 1 ms forward on a tiny model to a 2-minute train step on a large one.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Batch sizes and sequence lengths: powers of two up to 4096.
COUNT_BUCKETS = tuple(2**i for i in range(13))

BATCH_SIZE = Histogram(
    "rlhf_batch_size", "Items (samples, pairs, sequences) per model call.", ["role"], buckets=COUNT_BUCKETS
)
ITEMS = Counter(
    "rlhf_items_processed_total", "Items processed: samples generated or scored, sequences trained on.", ["role"]
)
TOKENS = Counter("rlhf_tokens_processed_total", "Tokens through the model (prompt + response).", ["role"])
FORWARD_SECONDS = Histogram(
    "rlhf_model_forward_seconds",
    "Wall time of one model call (a batch: generate, score, log-probs, train step), seconds.",
    ["role"],
    buckets=SECONDS_BUCKETS,
)
QUEUE_DEPTH = Gauge("rlhf_model_queue_depth", "Model calls waiting for or running on the model thread.", ["role"])
WEIGHTS_VERSION = Gauge(
    "rlhf_weights_version", "Policy version the process holds (generation: served; trainer: trained).", ["role"]
)
DEVICE_MEMORY = Gauge(
    "rlhf_device_memory_bytes",
    "Memory of the model's device, bytes: allocated and reserved by the CUDA allocator, or the process's resident "
    "set on the CPU.",
    ["role", "device", "kind"],
)
WEIGHT_UPDATES = Counter(
    "rlhf_weight_updates_total", "Weight updates applied (generation) or streamed (trainer).", ["role"]
)
WEIGHT_UPDATE_BYTES = Counter(
    "rlhf_weight_update_bytes_total", "Weight payload bytes received (generation) or sent (trainer).", ["role"]
)
WEIGHT_UPDATE_SECONDS = Histogram(
    "rlhf_weight_update_seconds",
    "Time to receive or stream one weight update (and swap it in), seconds.",
    ["role"],
    buckets=SECONDS_BUCKETS,
)


def register_role(role: str, holds_weights: bool = False) -> None:
    """Creates the role's series at zero, so that they exist from the first scrape, before any model call.

    ``holds_weights``: the role holds a policy version and moves weights (generation, trainer).
    """
    for metric in (BATCH_SIZE, ITEMS, TOKENS, FORWARD_SECONDS, QUEUE_DEPTH):
        metric.labels(role)
    if holds_weights:
        WEIGHTS_VERSION.labels(role).set(0)
        for metric in (WEIGHT_UPDATES, WEIGHT_UPDATE_BYTES, WEIGHT_UPDATE_SECONDS):
            metric.labels(role)


def observe_model_call(role: str, items: int, tokens: int, seconds: float) -> None:
    """Records one model call: a batch of ``items`` with ``tokens`` through the model in ``seconds``."""
    BATCH_SIZE.labels(role).observe(items)
    ITEMS.labels(role).inc(items)
    TOKENS.labels(role).inc(tokens)
    FORWARD_SECONDS.labels(role).observe(seconds)


def observe_weight_update(role: str, payload_bytes: int, seconds: float) -> None:
    """Records one complete weight update, received and swapped in (generation) or streamed (trainer)."""
    WEIGHT_UPDATES.labels(role).inc()
    WEIGHT_UPDATE_BYTES.labels(role).inc(payload_bytes)
    WEIGHT_UPDATE_SECONDS.labels(role).observe(seconds)


def track_device_memory(role: str, device) -> None:
    """Reports the memory of ``device`` (a ``torch.device`` or its name) at every scrape: the CUDA allocator's
    allocated and reserved bytes on a GPU, the process's resident set anywhere else."""
    if str(device).startswith("cuda"):
        import torch

        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        name = f"cuda:{index}"
        DEVICE_MEMORY.labels(role, name, "allocated").set_function(lambda: torch.cuda.memory_allocated(index))
        DEVICE_MEMORY.labels(role, name, "reserved").set_function(lambda: torch.cuda.memory_reserved(index))
    else:
        DEVICE_MEMORY.labels(role, "cpu", "resident").set_function(resident_bytes)


def resident_bytes() -> int:
    """The process's resident set size: /proc/self/statm on Linux; elsewhere the peak, from getrusage."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
