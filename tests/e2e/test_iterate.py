"""``rlhf iterate`` on a reduced config: three rounds of sampling from the current policy -> simulated labels ->
reward model on every preference so far -> PPO from the current policy -> evaluation, and the per-round report."""

from __future__ import annotations

import itertools
import json

import pytest

from services.pipeline.config import IterateConfig
from services.pipeline.iterate import run_iterate

pytestmark = pytest.mark.e2e

ROUNDS = 3


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    root = tmp_path_factory.mktemp("iterate")
    config = IterateConfig.model_validate(
        {
            "run_id": "reduced",
            "runs_dir": str(root),
            "sft": {"demonstrations": 1000},
            "rounds": {"rounds": ROUNDS, "prompts_per_round": 60},
            "ppo": {"iterations": 8},
            "evaluation": {"prompts": 120, "examples": 0},
        }
    )
    result = run_iterate(config)
    result["_root"] = root / "reduced"
    return result


def test_every_round_is_reported(summary):
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))  # round 0 is the SFT model
    report = (summary["_root"] / "iterate_report.md").read_text()
    for r in rounds:
        assert f"| {r['round']} | {r['policy']} |" in report
        evaluation = r["evaluation"]
        assert evaluation["prompts"] == 120
        for key in ("gold_reward_mean", "gold_reward_ci95", "proxy_reward_mean", "kl_to_sft"):
            assert isinstance(evaluation[key], float), (r["round"], key)
    on_disk = json.loads((summary["_root"] / "summary.json").read_text())
    assert on_disk["rounds"] == json.loads(json.dumps(rounds))


def test_the_reward_model_is_measured_on_fresh_pairs_before_and_after_retraining(summary):
    for r in summary["rounds"][1:]:
        assert r["pairs_held_out"] > 0 and r["pairs_labelled"] > r["pairs_held_out"]
        after = r["rm_accuracy_after"]
        assert 0.0 <= after["vs_gold"] <= 1.0 and 0.0 <= after["vs_labels"] <= 1.0
        assert after["pairs"] == r["pairs_held_out"]
        if r["round"] == 1:
            assert r["rm_accuracy_before"] is None  # no reward model before the first round
        else:
            assert 0.0 <= r["rm_accuracy_before"]["vs_gold"] <= 1.0


def test_each_round_trains_on_every_preference_so_far_and_starts_from_the_last_policy(summary):
    root = summary["_root"]
    previous: list[dict] = []
    for r in summary["rounds"][1:]:
        rows = [json.loads(line) for line in (root / "data" / f"round{r['round']}_preferences.jsonl").open()]
        assert rows[: len(previous)] == previous  # the earlier rounds' rows, unchanged, then the new ones
        assert {row["round"] for row in rows[len(previous) :]} == {r["round"]}
        assert len(rows) == r["preferences_total"]
        previous = rows
        # Held-out pairs are never trained on.
        labels = [json.loads(line) for line in (root / "data" / f"round{r['round']}_labels.jsonl").open()]
        held_out = {(x["prompt"]) for x in labels if x["held_out"]}
        assert held_out and not held_out & {row["prompt"] for row in rows}
    # Round 1 starts from SFT, round r from round r-1's PPO policy; every round's PPO ran its iterations.
    rounds = summary["rounds"]
    assert rounds[1]["policy_start"] == str(root / "sft")
    for before, after in itertools.pairwise(rounds[1:]):
        assert after["policy_start"] == before["policy_final"] != after["policy_final"]
    assert summary["final_policy"] == rounds[-1]["policy_final"]
    assert [r["ppo"]["iterations"] for r in rounds[1:]] == [8] * ROUNDS


def test_the_iterated_policy_beats_sft_on_gold_reward_beyond_the_intervals(summary):
    sft, last = summary["rounds"][0]["evaluation"], summary["rounds"][-1]["evaluation"]
    assert last["gold_reward_mean"] - last["gold_reward_ci95"] > sft["gold_reward_mean"] + sft["gold_reward_ci95"]
