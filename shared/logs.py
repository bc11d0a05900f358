"""One log format for every process: time, level, role, run id, iteration, logger, message.

The run id and iteration come from context variables: the orchestrator's loop sets them for each iteration and
sends them to the services as gRPC metadata (``x-rlhf-run-id``, ``x-rlhf-iteration``); the services' interceptor
sets them for the RPC it handles, so a service's log line says which run and iteration it served.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys

RUN_ID: contextvars.ContextVar[str] = contextvars.ContextVar("rlhf_run_id", default="-")
ITERATION: contextvars.ContextVar[str] = contextvars.ContextVar("rlhf_iteration", default="-")
METADATA_RUN_ID = "x-rlhf-run-id"
METADATA_ITERATION = "x-rlhf-iteration"

FORMAT = "%(asctime)s %(levelname)s {role} run=%(run_id)s iter=%(iteration)s %(name)s: %(message)s"


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = RUN_ID.get()
        record.iteration = ITERATION.get()
        return True


def setup_logging(role: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT.format(role=role)))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "transformers.generation"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def log_context(run_id: str | None = None, iteration: int | str | None = None):
    """Sets the run id and/or iteration for log lines written inside the block (this task or thread)."""
    tokens = []
    if run_id is not None:
        tokens.append((RUN_ID, RUN_ID.set(str(run_id))))
    if iteration is not None:
        tokens.append((ITERATION, ITERATION.set(str(iteration))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def context_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current run id and iteration to a service (empty when unset)."""
    pairs = []
    if RUN_ID.get() != "-":
        pairs.append((METADATA_RUN_ID, RUN_ID.get()))
    if ITERATION.get() != "-":
        pairs.append((METADATA_ITERATION, ITERATION.get()))
    return tuple(pairs)
