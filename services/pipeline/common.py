"""What both pipelines (the built-in task and the real one) share: stage banners, data files, the summary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DEFINITIONS = {
    "gold_reward_ci95": "half-width of the 95% interval of the mean (1.96 standard errors)",
    "proxy_reward": "the trained reward model's score, normalised by its training mean/std",
    "kl_to_sft": "nats per sequence: sum over response tokens of log pi - log pi_sft on the policy's own samples "
    "(k1), mean over prompts",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stage(name: str) -> float:
    """Prints a stage banner; returns its start time."""
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def summary(
    run_id: str, task: str, results: dict, seconds: dict, evaluations: dict, config, definitions: dict | None = None
) -> dict:
    """The summary.json both pipelines write: the reward model's accuracy, every policy's evaluation, the stages."""
    return {
        "run_id": run_id,
        "task": task,
        "reward_model_pair_accuracy": results["reward_model"]["pair_accuracy"],
        "reward_model_pair_accuracy_before_training": results["reward_model"].get("pair_accuracy_first"),
        "policies": {name: e.as_dict() for name, e in evaluations.items()},
        "stages": results,
        "seconds": seconds,
        "definitions": {**DEFINITIONS, **(definitions or {})},
        "config": config.model_dump(mode="json"),
    }


def write_summary(root: Path, content: dict) -> None:
    """summary.json, written atomically (a reader sees the old file or the new one)."""
    tmp = root / "summary.json.tmp"
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, root / "summary.json")
