"""A reward function that takes its time, so a test can send SIGTERM while a Score call is in flight."""

from __future__ import annotations

import time


def slow_length(prompts: list[str], responses: list[str]) -> list[float]:
    time.sleep(2.0)
    return [float(len(r)) for r in responses]
