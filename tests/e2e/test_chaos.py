"""Every process of a run killed (SIGKILL) once at a random moment and restarted on its address: nothing is lost.

Generation, reward, reference, trainer, orchestrator and Redis each die once during one run; the run completes
every iteration, versions 1..N once each, and its prompts, samples, rewards, iteration records and final policy
weights equal those of the same run (same seed) without kills. ``make chaos`` does the same with many kills.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from shared.tiny_models import prompts
from tests import chaos

pytestmark = pytest.mark.e2e

ITERATIONS = 20  # kills in the first half: 10 iterations of 0.1 s on the tiny models, and restarts of seconds


def test_a_run_survives_each_process_dying_and_loses_nothing(pretrained_tied_policy_dir, tmp_path):
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1000)))
    print(f"chaos seed {seed} (CHAOS_SEED={seed} repeats this test's kill order and moments)")
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(128)))
    reference = chaos.run(tmp_path / "reference", pretrained_tied_policy_dir, dataset, ITERATIONS, [], seed=7)
    rng = random.Random(seed)
    kills = list(chaos.TARGETS)
    rng.shuffle(kills)
    interrupted = chaos.run(
        tmp_path / "interrupted", pretrained_tied_policy_dir, dataset, ITERATIONS, kills, seed=7, rng=rng
    )
    result = chaos.compare(reference, interrupted)
    print(f"kills: {interrupted.kills}; {result}")
    assert sorted(target for target, _ in interrupted.kills) == sorted(chaos.TARGETS)
    assert result["state"] == "completed", result["error"]
    assert result["versions"] == list(range(1, ITERATIONS + 1))
    assert result["records_differing"] == []
    assert result["samples_equal"] and result["samples"] == ITERATIONS * 8
    assert result["weight_names_equal"] and result["largest_weight_difference"] == 0.0
