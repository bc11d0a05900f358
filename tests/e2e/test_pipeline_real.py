"""``rlhf pipeline-real`` end to end on tiny settings: SmolLM2 from the package, the rated snippets, a MiniLM reward
model, one LoRA PPO iteration through the service processes, evaluation against VADER, report and summary.

A smoke test of the wiring (the figures of ``make demo-real`` come from its full settings, in the README).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.pipeline.real import run_real_pipeline
from services.pipeline.real_config import RealPipelineConfig

pytestmark = pytest.mark.e2e


def test_the_real_pipeline_runs_every_stage_on_tiny_settings(smollm2_path, tmp_path):
    config = RealPipelineConfig.model_validate(
        {
            "run_id": "smoke",
            "runs_dir": str(tmp_path),
            "data": {"ppo_prompts": 8, "evaluation_prompts": 10},
            "reward_model": {"pairs": 40, "optim": {"batch_size": 4, "micro_batch_size": 4, "epochs": 1.0}},
            "ppo": {
                "iterations": 1,
                "prompts_per_iteration": 2,
                "max_new_tokens": 4,
                "ppo": {"ppo_epochs": 1, "minibatch_size": 2, "micro_batch_size": 2},
                "critic_layers": 1,
                "without_kl": False,
            },
            "evaluation": {"max_new_tokens": 4, "examples": 2},
        }
    )
    summary = run_real_pipeline(config)
    root = tmp_path / "smoke"
    assert json.loads((root / "summary.json").read_text())["run_id"] == "smoke"
    assert (root / "report.md").is_file()
    assert set(summary["policies"]) == {"sft", "ppo"}
    for evaluation in summary["policies"].values():
        assert evaluation["prompts"] == 10
        assert -1 <= evaluation["gold_reward_mean"] <= 1  # VADER's compound score
    assert 0 <= summary["reward_model_pair_accuracy"] <= 1
    # The LoRA run's checkpoint: the adapter and the merged model that evaluation loaded.
    checkpoint = Path(json.loads((root / "ppo" / "summary.json").read_text())["checkpoint"])
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()
    assert (checkpoint / "policy" / "config.json").is_file()
