"""One log format for every process: time, level, process role, logger, message."""

from __future__ import annotations

import logging
import sys


def setup_logging(role: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("httpx", "urllib3", "transformers.generation"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
