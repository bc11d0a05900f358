"""The whole pipeline on a reduced config: pretrain -> SFT -> preferences through the generation service ->
reward model -> PPO through the four services and the orchestrator -> DPO -> evaluation, report and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.pipeline.config import PipelineConfig
from services.pipeline.run import run_pipeline

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    config = PipelineConfig.model_validate(
        {
            "run_id": "reduced",
            "runs_dir": str(root),
            "sft": {"demonstrations": 1000},
            "preferences": {"prompts": 300},
            "ppo": {"iterations": 20},
            "evaluation": {"prompts": 200},
        }
    )
    result = run_pipeline(config)
    result["_root"] = root / "reduced"
    return result


def test_reward_model_beats_chance_on_held_out_pairs(summary):
    assert summary["reward_model_pair_accuracy"] > 0.6
    assert summary["stages"]["reward_model"]["eval_pairs"] >= 100


@pytest.mark.parametrize("policy", ["ppo", "dpo"])
def test_ppo_and_dpo_beat_sft_on_gold_reward_beyond_the_intervals(summary, policy):
    sft, tuned = summary["policies"]["sft"], summary["policies"][policy]
    assert tuned["prompts"] == sft["prompts"] == 200
    assert tuned["gold_reward_mean"] - tuned["gold_reward_ci95"] > sft["gold_reward_mean"] + sft["gold_reward_ci95"], (
        tuned,
        sft,
    )
    assert tuned["kl_to_sft"] > sft["kl_to_sft"]  # they moved away from SFT to get there


def test_summary_and_report_are_written(summary):
    root = summary["_root"]
    on_disk = json.loads((root / "summary.json").read_text())
    for name in ("base", "sft", "ppo", "dpo"):
        for key in ("gold_reward_mean", "gold_reward_ci95", "proxy_reward_mean", "kl_to_sft"):
            assert isinstance(on_disk["policies"][name][key], float), (name, key)
    assert on_disk["reward_model_pair_accuracy"] == summary["reward_model_pair_accuracy"]
    report = (root / "report.md").read_text()
    assert "| ppo |" in report and "| dpo |" in report and "pair accuracy" in report
    for image in ("policies.png", "ppo_curves.png"):
        assert (root / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # PPO ran through the services: one policy version per iteration, a Hugging Face checkpoint at the end.
    versions = [
        json.loads(line)["policy_version"] for line in (root / "ppo" / "iterations.jsonl").read_text().splitlines()
    ]
    assert versions == list(range(1, 21))
    # The run's final checkpoint, written by the trainer under its checkpoint root (the run's summary says where).
    checkpoint = Path(json.loads((root / "ppo" / "summary.json").read_text())["checkpoint"])
    assert checkpoint.name == "ppo" and checkpoint.parent.name == "runs"
    assert (checkpoint / "policy" / "model.safetensors").exists()
