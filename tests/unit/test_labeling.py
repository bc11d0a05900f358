"""Preference labelling: the simulated labeller's choice frequencies against the Bradley-Terry probability."""

from __future__ import annotations

import asyncio
import math

import pytest

from services.labeling import Choice, Comparison, Labeler, SimulatedLabeler, Verdict, preference_rows

GOLD = {"great": 2.0, "fine": 1.0, "poor": -0.5}


def gold(prompt: str, response: str) -> float:
    return GOLD[response]


def test_share_of_a_matches_the_bradley_terry_probability():
    draws = 4000
    for response_a, response_b, temperature in [("great", "fine", 1.0), ("fine", "poor", 0.5), ("poor", "great", 2.0)]:
        labeler = SimulatedLabeler(gold, seed=3, temperature=temperature)
        choices = labeler.choose([Comparison("p", response_a, response_b)] * draws)
        expected = 1 / (1 + math.exp(-(GOLD[response_a] - GOLD[response_b]) / temperature))
        standard_error = math.sqrt(expected * (1 - expected) / draws)
        share = choices.count(Choice.A) / draws
        assert abs(share - expected) < 3 * standard_error, (response_a, response_b, temperature, share, expected)


def test_same_seed_same_choices_and_another_seed_differs():
    comparisons = [Comparison("p", "great", "fine"), Comparison("q", "fine", "poor")] * 50
    first = SimulatedLabeler(gold, seed=7).choose(comparisons)
    assert SimulatedLabeler(gold, seed=7).choose(comparisons) == first
    assert SimulatedLabeler(gold, seed=8).choose(comparisons) != first


def test_temperature_to_zero_always_picks_the_better_response():
    comparisons = [Comparison("p", "great", "fine"), Comparison("p", "poor", "fine")] * 100
    expected = [Choice.A, Choice.B] * 100
    for temperature in (1e-6, 0.0):
        assert SimulatedLabeler(gold, seed=0, temperature=temperature).choose(comparisons) == expected
    tie = SimulatedLabeler(gold, seed=0, temperature=0.0).choose([Comparison("p", "fine", "fine")] * 400)
    assert 150 < tie.count(Choice.A) < 250  # a tie at temperature 0 is a fair coin
    with pytest.raises(ValueError, match="temperature"):
        SimulatedLabeler(gold, seed=0, temperature=-1.0)


def test_preference_rows_put_the_chosen_response_first():
    comparisons = [Comparison("p1", "x", "y"), Comparison("p2", "u", "v")]
    rows = preference_rows(comparisons, [Choice.A, Choice.B])
    assert rows == [
        {"prompt": "p1", "chosen": "x", "rejected": "y"},
        {"prompt": "p2", "chosen": "v", "rejected": "u"},
    ]
    assert [list(row) for row in rows] == [["prompt", "chosen", "rejected"]] * 2
    assert isinstance(SimulatedLabeler(gold, seed=0), Labeler)
    with pytest.raises(ValueError, match="2 comparisons but 1 verdicts"):
        preference_rows(comparisons, [Choice.A])


def test_ties_and_both_bad_give_no_row_and_soft_labels_keep_their_probability():
    comparisons = [
        Comparison("p", "x", "y"),
        Comparison("q", "u", "v"),
        Comparison("r", "m", "n"),
        Comparison("s", "k", "j"),
    ]
    verdicts = [
        Verdict(Choice.TIE),
        Verdict(Choice.BOTH_BAD),
        Verdict(Choice.B, probability_a=0.2, labeler="llm-judge"),
        Verdict(Choice.A, probability_a=0.9),
    ]
    assert preference_rows(comparisons, verdicts) == [
        {"prompt": "r", "chosen": "n", "rejected": "m", "chosen_probability": pytest.approx(0.8)},
        {"prompt": "s", "chosen": "k", "rejected": "j", "chosen_probability": 0.9},
    ]
    with pytest.raises(ValueError, match="probability_a"):
        Verdict(Choice.A, probability_a=1.5)


def test_the_simulated_labeler_speaks_the_labeler_protocol():
    comparisons = [Comparison("p", "great", "fine"), Comparison("q", "fine", "poor")] * 20
    verdicts = asyncio.run(SimulatedLabeler(gold, seed=7).label(comparisons))
    assert [v.choice for v in verdicts] == SimulatedLabeler(gold, seed=7).choose(comparisons)
    assert {v.labeler for v in verdicts} == {"simulated"} and all(v.probability_a is None for v in verdicts)
