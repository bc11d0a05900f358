"""``open_labeler``: the labeller a round of ``rlhf iterate`` uses, chosen by config. For an AI judge with
``judge_service`` it starts the judge's service as a real process on loopback (a reward service on a reward
function, or a generation service's TGI routes on a tiny model), labels through it, and stops it."""

from __future__ import annotations

import math

import pytest

from services.labeling import Choice, Comparison
from services.labeling.factory import LabelerConfig, open_labeler
from services.labeling.labelers import sigmoid
from services.pipeline.task import gold_reward

COMPARISONS = [
    Comparison("the park was", " happy and warm today.", " sad."),
    Comparison("my friend said", " awful awful awful.", " lovely and kind."),
    Comparison("the day felt", " fine.", " fine."),
]


async def test_a_reward_judge_on_a_started_reward_service_answers_with_the_bradley_terry_probability(tmp_path):
    config = LabelerConfig.model_validate(
        {
            "kind": "judge",
            "judge": {"kind": "reward", "reward": {"temperature": 2.0}},
            "judge_service": {"function": "services.pipeline.task:gold_rewards"},
        }
    )
    async with open_labeler(config, seed=0, batch="round1", root=tmp_path) as labeler:
        verdicts = await labeler.label(COMPARISONS)
        process_dir = tmp_path / "processes" / "round1-judge"
        assert (process_dir / "judge-reward.yaml").exists()
    for comparison, verdict in zip(COMPARISONS, verdicts, strict=True):
        margin = gold_reward(comparison.prompt, comparison.response_a) - gold_reward(
            comparison.prompt, comparison.response_b
        )
        assert verdict.probability_a == pytest.approx(sigmoid(margin / 2.0), abs=1e-6)
        assert verdict.labeler == "reward-judge"
    assert [v.choice for v in verdicts] == [Choice.A, Choice.B, Choice.TIE]


async def test_an_llm_judge_on_a_started_generation_service_is_position_symmetric(tmp_path, tiny_policy_dir):
    """A tiny random model's verdicts mean nothing: this checks the mechanics (a started service, both orders)."""
    config = LabelerConfig.model_validate(
        {"kind": "judge", "judge": {"kind": "llm", "llm": {}}, "judge_service": {"model": str(tiny_policy_dir)}}
    )
    swapped = [Comparison(c.prompt, c.response_b, c.response_a) for c in COMPARISONS]
    async with open_labeler(config, seed=0, batch="round2", root=tmp_path) as labeler:
        verdicts = await labeler.label(COMPARISONS + swapped)
    forward, backward = verdicts[: len(COMPARISONS)], verdicts[len(COMPARISONS) :]
    for f, b in zip(forward, backward, strict=True):
        assert 0.0 < f.probability_a < 1.0 and math.isfinite(f.probability_a)
        assert f.probability_a + b.probability_a == pytest.approx(1.0, abs=1e-5)
    assert forward[2].choice is Choice.TIE  # identical responses: 0.5 whatever the position bias


def test_a_judge_labeler_needs_its_section_and_a_function_only_for_a_reward_judge():
    with pytest.raises(ValueError, match="judge: required when kind is judge"):
        LabelerConfig.model_validate({"kind": "judge"})
    with pytest.raises(ValueError, match="only a reward judge"):
        LabelerConfig.model_validate(
            {"kind": "judge", "judge": {"kind": "llm", "llm": {}}, "judge_service": {"function": "m:f"}}
        )
    with pytest.raises(ValueError, match="exactly one of model and function"):
        LabelerConfig.model_validate({"kind": "judge", "judge": {"kind": "reward", "reward": {}}, "judge_service": {}})
